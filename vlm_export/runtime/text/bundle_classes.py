"""Replace a bundle's label space in place, atomically: new text embeddings, class list, manifest.

The new ``.npy`` and ``.json`` files get names of their own content (``text_embeddings.<sha>.npy``,
``classes.<sha>.json``), written beside the old ones; then ``manifest.json`` is replaced in one
rename: that is the moment the bundle changes. Until then a reader, or a crash, sees the old
bundle byte for byte (new files not yet listed are removed on failure); afterwards the files the
new manifest no longer lists are deleted. The engines (ONNX, TensorRT) are not rewritten.

What is written can be read back: name lengths and the sizes of classes.json and manifest.json
are checked against the loader's own limits before anything is written. A change killed
half-way (kill -9) leaves only names that the next successful change removes: content-named
files the manifest does not list, and the temporary files of such names (``stale_leftovers``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core import manifest as mf
from vlm_export.core.atomic import TEMP_MARK, atomic_write_bytes
from vlm_export.core.errors import BundleError
from vlm_export.core.paths import check_bundle_links
from vlm_export.runtime.bundle import MAX_CLASSES_BYTES, Bundle
from vlm_export.runtime.text.class_lists import (
    ClassListError,
    check_name_lengths,
    shared_class_names,
)
from vlm_export.runtime.text.label_space import LabelSpace, label_space_meta

#: the label-space files this module (and the exporter) writes, content-named or not, and their
#: temporary files: what a killed change may leave unlisted
_LABEL_FILE = r"(?:text_embeddings(?:\.[0-9a-f]{12})?\.npy|classes(?:\.[0-9a-f]{12})?\.json)"
_CONTENT_NAME = re.compile(rf"^{_LABEL_FILE}$")
_CONTENT_TEMP = re.compile(rf"^\.{_LABEL_FILE}{re.escape(TEMP_MARK)}[a-z0-9_]{{8}}$")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def _content_name(stem: str, suffix: str, data: bytes) -> str:
    return f"{stem}.{hashlib.sha256(data).hexdigest()[:12]}{suffix}"


def _record(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def new_manifest(
    manifest: dict[str, Any], space: LabelSpace, files: dict[str, bytes]
) -> dict[str, Any]:
    """The manifest of the bundle with ``space``: text and labels sections, file records."""
    (text_name, _), (classes_name, _) = files.items()
    result = copy.deepcopy(manifest)
    old = (manifest["text"]["embeddings"], manifest["labels"]["file"])
    for name in old:
        result["files"].pop(name, None)
    for name, data in files.items():
        result["files"][name] = _record(data)
    result["text"].update(
        embeddings=text_name, shape=list(space.text_embeddings.shape), **label_space_meta(space)
    )
    capacity = mf.class_capacity(manifest)
    if capacity is not None:  # bundles from before the capacity field: K = their class count
        result["condensation"]["class_capacity"] = capacity
    groups = [(d, [n for dom, n in space.labels if dom == d]) for d in space.domains]
    result["labels"].update(
        file=classes_name,
        num_classes=len(space.labels),
        domains=list(space.domains),
        shared_names=shared_class_names(groups),
    )
    return result


def classes_bytes(labels: Sequence[tuple[str, str]], domains: Sequence[str]) -> bytes:
    """classes.json of a label space ([(domain, name)], domains), as written into the bundle."""
    return json.dumps(
        {
            "classes": [{"name": name, "domain": domain} for domain, name in labels],
            "domains": list(domains),
        },
        indent=2,
    ).encode("utf-8")


def check_readable(labels: Sequence[tuple[str, str]], domains: Sequence[str]) -> bytes:
    """classes.json of the label space, after checking it against the loader's limits (names,
    file size): ClassListError, one line, when the bundle could not load it back."""
    check_name_lengths([name for _, name in labels], "new classes")
    check_name_lengths(list(domains), "new domains")
    data = classes_bytes(labels, domains)
    if len(data) > MAX_CLASSES_BYTES:
        raise ClassListError(
            f"{len(labels):,} classes make a classes.json of {len(data) / 2**20:.0f} MB, more "
            f"than the {MAX_CLASSES_BYTES >> 20} MB a bundle loads; nothing was changed"
        )
    return data


def stale_leftovers(folder: Path, manifest: dict[str, Any], before: float) -> list[Path]:
    """What killed label-space changes left in ``folder``: text-embedding and class files
    that ``manifest`` does not list and their temporary files, last changed before ``before``."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            listed = entry.name in manifest["files"]
            ours = _CONTENT_TEMP.match(entry.name) or (
                _CONTENT_NAME.match(entry.name) and not listed
            )
            with contextlib.suppress(OSError):
                if ours and entry.stat(follow_symlinks=False).st_mtime < before:
                    found.append(Path(entry.path))
    return sorted(found)


def write_label_space(bundle: Bundle, space: LabelSpace) -> dict[str, Any]:
    """Replace ``bundle``'s label space on disk with ``space``; return the new manifest.

    The manifest on disk must still be the one ``bundle`` was opened with (else BundleError:
    someone changed it meanwhile). Any failure leaves the old bundle as it was.
    """
    folder = Path(bundle.path)
    check_bundle_links("bundle", folder)  # also for library callers (the CLI checked)
    started = time.time()
    if mf.read_manifest(folder) != bundle.manifest:
        raise BundleError(f"bundle {folder} changed while its classes were computed; run again")
    classes = check_readable(space.labels, space.domains)
    text = _npy_bytes(space.text_embeddings)
    files = {
        _content_name("text_embeddings", ".npy", text): text,
        _content_name("classes", ".json", classes): classes,
    }
    manifest = mf.validate_runtime_contract(
        mf.validate_manifest(new_manifest(bundle.manifest, space, files))
    )
    manifest_text = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    if len(manifest_text) > mf.MAX_MANIFEST_BYTES:
        raise ClassListError(
            f"the new manifest would be {len(manifest_text) / 2**20:.1f} MB, more than the "
            f"{mf.MAX_MANIFEST_BYTES >> 20} MB a bundle loads (class names shared by domains "
            "are listed in it); nothing was changed"
        )
    created: list[Path] = []
    try:
        for name, data in files.items():
            if name not in bundle.manifest["files"]:
                created.append(folder / name)
                atomic_write_bytes(folder / name, data)
        atomic_write_bytes(folder / mf.MANIFEST_NAME, manifest_text)
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    old = [folder / name for name in bundle.manifest["files"] if name not in manifest["files"]]
    for path in old + stale_leftovers(folder, manifest, started):
        with contextlib.suppress(OSError):
            path.unlink()
    return manifest
