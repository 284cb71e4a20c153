"""Replace a bundle's label space in place, atomically: new text embeddings, class list, manifest.

The new ``.npy`` and ``.json`` files get names of their own content (``text_embeddings.<sha>.npy``,
``classes.<sha>.json``), written beside the old ones; then ``manifest.json`` is replaced in one
rename: that is the moment the bundle changes. Until then a reader, or a crash, sees the old
bundle byte for byte (new files not yet listed are removed on failure); afterwards the files the
new manifest no longer lists are deleted. The engines (ONNX, TensorRT) are not rewritten.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core import manifest as mf
from vlm_export.core.atomic import atomic_write_bytes
from vlm_export.core.errors import BundleError
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.text.class_lists import shared_class_names
from vlm_export.runtime.text.label_space import LabelSpace, label_space_meta


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


def write_label_space(bundle: Bundle, space: LabelSpace) -> dict[str, Any]:
    """Replace ``bundle``'s label space on disk with ``space``; return the new manifest.

    The manifest on disk must still be the one ``bundle`` was opened with (else BundleError:
    someone changed it meanwhile). Any failure leaves the old bundle as it was.
    """
    folder = Path(bundle.path)
    if mf.read_manifest(folder) != bundle.manifest:
        raise BundleError(f"bundle {folder} changed while its classes were computed; run again")
    text = _npy_bytes(space.text_embeddings)
    classes = json.dumps(
        {
            "classes": [{"name": name, "domain": domain} for domain, name in space.labels],
            "domains": list(space.domains),
        },
        indent=2,
    ).encode("utf-8")
    files = {
        _content_name("text_embeddings", ".npy", text): text,
        _content_name("classes", ".json", classes): classes,
    }
    manifest = mf.validate_runtime_contract(
        mf.validate_manifest(new_manifest(bundle.manifest, space, files))
    )
    created: list[Path] = []
    try:
        for name, data in files.items():
            if name not in bundle.manifest["files"]:
                created.append(folder / name)
                atomic_write_bytes(folder / name, data)
        atomic_write_bytes(
            folder / mf.MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
        )
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    for name in bundle.manifest["files"]:
        if name not in manifest["files"]:
            with contextlib.suppress(OSError):
                (folder / name).unlink()
    return manifest
