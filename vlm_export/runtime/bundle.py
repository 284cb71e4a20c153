"""Open a bundle folder: validated manifest, verified files, text embeddings and class list."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vlm_export.core import manifest as mf
from vlm_export.core.errors import BundleError, UserError
from vlm_export.core.json_input import read_json
from vlm_export.core.labels import MAX_NAME_CHARS, Label
from vlm_export.core.manifest_schema import describe_value
from vlm_export.core.state_file import shape_text
from vlm_export.core.verified import verify_bundle_files, verify_mode

#: largest classes.json read (ImageNet-21k's names take about 1 MB)
MAX_CLASSES_BYTES = 64 << 20

log = logging.getLogger(__name__)


def _core_files(manifest: dict[str, Any]) -> tuple[str, str, str]:
    return manifest["engine"]["onnx"], manifest["text"]["embeddings"], manifest["labels"]["file"]


def _npy_header(handle: BinaryIO, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype a .npy file declares, read before any array memory is allocated."""
    start = handle.read(6)
    handle.seek(0)
    if start[:2] == b"PK":
        raise BundleError(f"{name} is a .npz archive saved under a .npy name, not a .npy array")
    if start != b"\x93NUMPY":
        raise BundleError(f"{name} is not a .npy array (no NumPy header)")
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise BundleError(f"{name} has a corrupt .npy header ({exc})") from None
    return shape, dtype


def _load_embeddings(path: Path, shape: list[int]) -> np.ndarray:
    """The [C, E] text embeddings: header checked against ``shape`` first, finite float rows."""
    name = path.name
    try:
        with open(path, "rb") as handle:
            declared, dtype = _npy_header(handle, name)
            if dtype.kind != "f":
                raise BundleError(f"{name} has dtype {dtype}, expected float32")
            if list(declared) != [int(v) for v in shape]:
                raise BundleError(
                    f"{name} has shape {shape_text(declared)}, manifest says {shape_text(shape)}"
                )
            data_bytes = os.fstat(handle.fileno()).st_size - handle.tell()
            if data_bytes != math.prod(declared) * dtype.itemsize:
                raise BundleError(
                    f"{name} holds {data_bytes} bytes of data, its header declares "
                    f"{math.prod(declared) * dtype.itemsize} (truncated or padded)"
                )
            handle.seek(0)
            embeddings = np.load(handle, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"{name} is not a readable .npy array ({exc})") from None
    if not isinstance(embeddings, np.ndarray) or list(embeddings.shape) != list(declared):
        raise BundleError(f"{name} is not a readable .npy array")
    finite = np.isfinite(embeddings)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        bad = embeddings[~finite]
        kinds = " and ".join(
            word
            for word, present in (("NaN", np.isnan(bad).any()), ("infinite", np.isinf(bad).any()))
            if present
        )
        raise BundleError(
            f"{name} holds {kinds} values ({int((~finite).sum())} of them, first in row {row}): "
            "the text embeddings are corrupt; re-export the bundle"
        )
    return np.ascontiguousarray(embeddings, dtype=np.float32)


def _load_classes(path: Path, expected: int) -> tuple[list[str], list[str], list[str]]:
    """classes.json: {"classes": [{"name": str, "domain": str}, ...], "domains": [str, ...]}.

    A file of more than ``expected`` class entries (the text embeddings' rows) is refused
    before its entries are built: counting its objects is a scan of the text.
    """
    # one object per class, the top object and its two lists
    most = expected + 3
    data = read_json(path, MAX_CLASSES_BYTES, BundleError, what=path.name, max_containers=most)
    if not isinstance(data, dict):
        raise BundleError(f"{path.name}: expected a JSON object, got {describe_value(data)}")
    entries, domains = data.get("classes"), data.get("domains")
    if not isinstance(entries, list):
        raise BundleError(f"{path.name}: classes: expected a list, got {describe_value(entries)}")
    if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
        raise BundleError(f"{path.name}: domains: expected a list of strings")
    names, class_domains = [], []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise BundleError(
                f"{path.name}: classes[{index}]: expected an object, got {describe_value(entry)}"
            )
        for field, values in (("name", names), ("domain", class_domains)):
            value = entry.get(field)
            if not isinstance(value, str):
                raise BundleError(
                    f"{path.name}: classes[{index}].{field}: expected a string, got "
                    f"{describe_value(value)}"
                )
            if len(value) > MAX_NAME_CHARS:
                raise BundleError(
                    f"{path.name}: classes[{index}].{field} is {len(value):,} characters, more "
                    f"than {MAX_NAME_CHARS:,}"
                )
            values.append(value)
    unknown = sorted(set(class_domains) - set(domains))
    if unknown:
        raise BundleError(f"{path.name} names classes in undeclared domains: {', '.join(unknown)}")
    return names, class_domains, domains


@dataclass
class Bundle:
    """A validated bundle: manifest, class names and domains, text embeddings [C, E] float32."""

    path: Path
    manifest: dict[str, Any]
    classes: list[str]
    class_domains: list[str]
    domains: list[str]
    text_embeddings: np.ndarray
    fingerprint: str

    @classmethod
    def open(cls, path: str | Path, verify: bool | str = True) -> Bundle:
        """Read and check a bundle folder; raise BundleError naming the first problem.

        The manifest passes ``validate_manifest`` and ``validate_runtime_contract`` (engine tensors
        consistent with batch size, preprocessing, classes and condensation).

        ``verify`` checks the size and sha256 of every file the manifest lists (catches truncated
        and tampered files): "cached" (or True) hashes only the files whose size, mtime, ctime
        or inode changed since they last matched (``core.verified``), "full" hashes them all,
        "off" (or False) skips the check. Logs a warning when the bundle holds random weights.
        """
        mode = verify_mode(verify)
        path = Path(path)
        manifest = mf.validate_runtime_contract(mf.read_manifest(path))
        listed = manifest["files"]
        unlisted = [name for name in _core_files(manifest) if name not in listed]
        if unlisted:
            raise BundleError(f"manifest does not list (and hash) {', '.join(unlisted)}")
        verify_bundle_files(path, manifest, mode)
        onnx_name, embeddings_name, classes_name = _core_files(manifest)
        if not (path / onnx_name).is_file():
            raise BundleError(f"bundle file missing: {onnx_name}")
        if (path / onnx_name).stat().st_size == 0:
            raise BundleError(f"{onnx_name} is empty (0 bytes): not an ONNX model")
        embeddings = _load_embeddings(path / embeddings_name, manifest["text"]["shape"])
        names, class_domains, domains = _load_classes(path / classes_name, embeddings.shape[0])
        if len(names) != embeddings.shape[0]:
            raise BundleError(
                f"{classes_name} has {len(names)} classes, {embeddings_name} has "
                f"{embeddings.shape[0]} rows"
            )
        bundle = cls(
            path=path,
            manifest=manifest,
            classes=names,
            class_domains=class_domains,
            domains=domains,
            text_embeddings=embeddings,
            fingerprint=mf.bundle_fingerprint(manifest),
        )
        if bundle.untrained:
            log.warning(bundle.untrained_message)
        return bundle

    @property
    def untrained(self) -> bool:
        """True when the model was exported from random (untrained) weights."""
        return bool(self.manifest["model"]["untrained"])

    @property
    def untrained_message(self) -> str:
        """The warning shown for an untrained bundle."""
        return (
            f"bundle {self.path} holds UNTRAINED (random) weights of "
            f"{self.manifest['model']['name']}: predictions are meaningless"
        )

    @property
    def method(self) -> str:
        """The method the bundle was exported for (zeroshot, tca, rail, tca+rail)."""
        return str(self.manifest["method"])

    @property
    def onnx_path(self) -> Path:
        """The image encoder's ONNX file."""
        return self.path / self.manifest["engine"]["onnx"]

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.classes)

    @property
    def labels(self) -> list[Label]:
        """(domain, class name) of every class: what adaptation states key their rows by."""
        return list(zip(self.class_domains, self.classes, strict=True))

    @property
    def engine_fingerprint(self) -> str:
        """Fingerprint of the image engine alone (unchanged when the classes change)."""
        return mf.engine_fingerprint(self.manifest)

    @property
    def class_capacity(self) -> int | None:
        """Most classes the image engine takes (condensing engines), None when unlimited."""
        return mf.class_capacity(self.manifest)

    def check_capacity(self, num_classes: int) -> None:
        """UserError if ``num_classes`` classes do not fit the engine's class capacity."""
        capacity = self.class_capacity
        if capacity is not None and num_classes > capacity:
            raise UserError(
                f"{num_classes} classes exceed the engine's class capacity of {capacity} "
                "(re-export with a larger vlm-export --max-classes)"
            )

    def with_classes(
        self, labels: Sequence[Label], text_embeddings: np.ndarray, domains: Sequence[str]
    ) -> Bundle:
        """This bundle, in memory, with another label space (the folder is not touched).

        ``labels`` [(domain, name)] and ``text_embeddings`` [C, E] row by row; ``domains`` lists
        every domain of the labels, in order. Its fingerprint is made from the new content.
        """
        text = np.ascontiguousarray(text_embeddings, dtype=np.float32)
        if text.ndim != 2 or text.shape != (len(labels), self.text_embeddings.shape[1]):
            raise ValueError(
                f"text embeddings {list(text.shape)} do not fit {len(labels)} classes of width "
                f"{self.text_embeddings.shape[1]}"
            )
        if not labels:
            raise UserError("no classes given")
        self.check_capacity(len(labels))
        manifest = copy.deepcopy(self.manifest)
        manifest["text"]["shape"] = list(text.shape)
        manifest["labels"]["num_classes"] = len(labels)
        manifest["labels"]["domains"] = list(domains)
        content = hashlib.sha256(text.tobytes())
        content.update(json.dumps([list(label) for label in labels]).encode())
        return dataclasses.replace(
            self,
            manifest=manifest,
            classes=[name for _, name in labels],
            class_domains=[domain for domain, _ in labels],
            domains=list(domains),
            text_embeddings=text,
            fingerprint=f"{self.engine_fingerprint}:{content.hexdigest()[:16]}",
        )

    def engine_io(self, kind: str) -> dict[str, dict[str, Any]]:
        """The engine's ``inputs`` or ``outputs`` records by name."""
        return {record["name"]: record for record in self.manifest["engine"][kind]}

    def domain_class_indices(self, domain: str) -> np.ndarray:
        """Indices of the classes of one domain; BundleError for an unknown domain."""
        if domain not in self.domains:
            raise BundleError(
                f"bundle has no domain {domain!r} (domains: {', '.join(self.domains)})"
            )
        return np.array(
            [i for i, name in enumerate(self.class_domains) if name == domain], dtype=np.int64
        )
