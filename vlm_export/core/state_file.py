"""One-file adaptation state: NumPy ``.npz`` without pickle, schema version, atomic replace.

Layout: every array of the state under its own name, plus ``__meta__``, a 0-d unicode array holding
JSON: {"kind": str, "schema_version": int, "bundle": fingerprint, ...caller's fields}. Loading never
enables pickle, checks kind, schema and bundle, and names what is wrong in a StateError.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.atomic import atomic_file
from vlm_export.core.errors import StateError

META_KEY = "__meta__"


def save_state(
    path: str | Path,
    kind: str,
    schema_version: int,
    bundle_fingerprint: str,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a state file atomically: the previous file stays intact if anything fails."""
    if META_KEY in arrays:
        raise ValueError(f"{META_KEY} is reserved")
    header = {"kind": kind, "schema_version": schema_version, "bundle": bundle_fingerprint}
    header.update(meta or {})
    payload = {name: np.asarray(value) for name, value in arrays.items()}
    for name, value in payload.items():
        if value.dtype == object:
            raise ValueError(f"state array {name!r} has dtype object (would need pickle)")
    payload[META_KEY] = np.array(json.dumps(header))
    with atomic_file(path, "wb") as handle:
        np.savez(handle, **payload)


@dataclass(frozen=True)
class StoredArray:
    """A C-ordered array left in its state file, read block by block (``defer`` in load_state)."""

    path: Path
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, the next ``rows`` rows) in order, each block a fresh array."""
        row_shape = self.shape[1:]
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(f"{self.name}.npy") as member:
                _read_header(member)
                for start in range(0, self.shape[0], rows):
                    block = np.empty((min(rows, self.shape[0] - start), *row_shape), self.dtype)
                    view = memoryview(block.reshape(-1).view(np.uint8))
                    filled = 0
                    while filled < len(view):
                        count = member.readinto(view[filled:])
                        if not count:
                            raise StateError(f"{self.path} is truncated (array {self.name!r})")
                        filled += count
                    yield start, block
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise StateError(f"{self.path} is not a readable state file ({exc})") from None


def _read_header(member: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    return np.lib.format.read_array_header_2_0(member)


def load_state(
    path: str | Path,
    kind: str,
    schema_version: int,
    bundle_fingerprint: str | None,
    defer: Collection[str] = (),
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a state file written by ``save_state``; return (arrays, meta).

    Arrays named in ``defer`` stay in the file: they come back as ``StoredArray`` (shape and
    dtype known, read block by block), so that a caller can fold a d x d matrix into another
    without holding both. Raises StateError for a missing or corrupt file, another kind, another
    schema version, or (when ``bundle_fingerprint`` is given) a state made with another bundle.
    """
    path = Path(path)
    if path.is_dir():
        raise StateError(f"{path} is a folder, not a state file")
    if not path.is_file():
        raise StateError(f"state file not found: {path}")
    arrays = _read_arrays(path, defer)
    if META_KEY not in arrays:
        raise StateError(f"{path} is not a vlm-export state file (no {META_KEY})")
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
    except json.JSONDecodeError:
        raise StateError(f"{path} has a corrupt header") from None
    if not isinstance(meta, dict):
        raise StateError(f"{path} has a corrupt header (not a JSON object)")
    if meta.get("kind") != kind:
        raise StateError(f"{path} holds a {meta.get('kind')!r} state, expected {kind!r}")
    if meta.get("schema_version") != schema_version:
        raise StateError(
            f"{path} has {kind} schema {meta.get('schema_version')}, this version reads "
            f"{schema_version}"
        )
    if bundle_fingerprint is not None and meta.get("bundle") != bundle_fingerprint:
        raise StateError(
            f"{path} was made with another bundle (fingerprint {meta.get('bundle')}, this bundle "
            f"is {bundle_fingerprint}): other model or class list"
        )
    return arrays, meta


def _read_arrays(path: Path, defer: Collection[str] = ()) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, no pickle; StateError if it cannot be read.

    The file is opened here and handed to ``np.load`` as an open file, so it is closed on every
    path: ``np.load`` given a file name leaks its handle when the zip directory is unreadable
    (a truncated file), which Python reports as an "unclosed file" ResourceWarning.
    """
    try:
        with open(path, "rb") as handle:
            data = np.load(handle, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise StateError(f"{path} is not a state file (a single .npy array, not .npz)")
            with data:
                return {
                    name: _stored(path, data.zip, name) if name in defer else data[name]
                    for name in data.files
                }
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise StateError(f"{path} is not a readable state file ({exc})") from None


def _stored(path: Path, archive: zipfile.ZipFile, name: str) -> StoredArray | np.ndarray:
    """A StoredArray for member ``name`` (loaded whole if it is not C-ordered)."""
    with archive.open(f"{name}.npy") as member:
        shape, fortran_order, dtype = _read_header(member)
    if fortran_order or dtype.hasobject:
        with archive.open(f"{name}.npy") as member:
            return np.lib.format.read_array(member, allow_pickle=False)
    return StoredArray(path, name, tuple(shape), dtype)
