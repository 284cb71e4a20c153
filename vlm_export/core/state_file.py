"""One-file adaptation state: NumPy ``.npz`` without pickle, schema version, atomic replace.

Layout: every array of the state under its own name, plus ``__meta__``, a 0-d unicode array holding
JSON: {"kind": str, "schema_version": int, "bundle": fingerprint, ...caller's fields}. Loading never
enables pickle, checks kind, schema and bundle, and the array shapes the headers declare before
reading any array data, and names what is wrong in a StateError.

Before the archive is opened, its first bytes must be a zip's and its end record may count at
most ``MAX_MEMBERS`` members (a state holds a handful): a file of 100,000 members is refused
without reading its directory, and loading stays linear in the file.
"""

from __future__ import annotations

import contextlib
import math
import re
import struct
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vlm_export.core import json_text
from vlm_export.core.atomic import atomic_file
from vlm_export.core.errors import StateError
from vlm_export.core.json_input import parse_json
from vlm_export.core.memory import require_memory

META_KEY = "__meta__"
MAX_META_BYTES = 4 << 20  # the JSON header, as UCS-4 characters
PAGE_BYTES = 4096  # the stretch ``StoredArray.read_sparse`` writes or skips
READ_BYTES = 4 << 20  # read at a time by ``StoredArray.read_sparse``
MAX_MEMBERS = 256  # arrays in one state file (a RAIL state holds 6, an evaluation a few dozen)
_MEMBER = re.compile(r"[\w.-]{1,200}\.npy")  # what np.savez writes for an array name
_ZIP_END = b"PK\x05\x06"  # end of central directory record
_ZIP_END_BYTES = 22 + 0xFFFF  # the record and the longest comment after it


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
    try:
        payload[META_KEY] = np.array(json_text.dumps(header))
    except ValueError:
        raise StateError(f"not saving {path}: its header holds a non-finite number") from None
    with atomic_file(path, "wb") as handle:
        np.savez(handle, **payload)


@dataclass(frozen=True)
class StoredArray:
    """An array left in its state file (``defer`` in load_state), read block by block or whole."""

    path: Path
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool = False

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, the next ``rows`` rows) in order, each block a fresh array (C order only)."""
        row_shape = self.shape[1:]
        with self._data() as member:
            if self.fortran_order:
                raise ValueError(f"array {self.name!r} is stored in Fortran order, not by rows")
            for start in range(0, self.shape[0], rows):
                block = np.empty((min(rows, self.shape[0] - start), *row_shape), self.dtype)
                self._fill(member, memoryview(block.reshape(-1).view(np.uint8)))
                yield start, block

    def read_sparse(self) -> np.ndarray:
        """The whole array, in its stored order, into fresh zero memory that is written only where
        the file holds a nonzero byte (by PAGE_BYTES stretches): the all-zero stretches, such as
        the columns of classes never learned in a Fortran-ordered W, stay untouched zero pages
        that take no memory. Bit for bit the stored array."""
        order = "F" if self.fortran_order else "C"
        array = np.zeros(self.shape, self.dtype, order=order)
        target = array.reshape(-1, order=order).view(np.uint8)  # the array's memory, flat
        buffer = np.empty(min(READ_BYTES, max(len(target), 1)), np.uint8)
        with self._data() as member:
            for start in range(0, len(target), len(buffer)):
                chunk = buffer[: min(len(buffer), len(target) - start)]
                self._fill(member, memoryview(chunk))
                _copy_nonzero_pages(target[start : start + len(chunk)], chunk)
        return array

    @contextlib.contextmanager
    def _data(self) -> Iterator[BinaryIO]:
        """The member's stream, positioned at its data; read errors become StateError."""
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(f"{self.name}.npy") as member:
                _read_header(member)
                yield member
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise StateError(f"{self.path} is not a readable state file ({exc})") from None

    def _fill(self, member: BinaryIO, view: memoryview) -> None:
        filled = 0
        while filled < len(view):
            count = member.readinto(view[filled:])
            if not count:
                raise StateError(f"{self.path} is truncated (array {self.name!r})")
            filled += count


def _copy_nonzero_pages(target: np.ndarray, chunk: np.ndarray) -> None:
    """target[...] = chunk (uint8, same length), writing only the PAGE_BYTES stretches of chunk
    that hold a nonzero byte (target is zero memory)."""
    whole = len(chunk) - len(chunk) % PAGE_BYTES
    pages = chunk[:whole].reshape(-1, PAGE_BYTES)
    keep = np.flatnonzero(pages.any(axis=1))
    target[:whole].reshape(-1, PAGE_BYTES)[keep] = pages[keep]
    if chunk[whole:].any():
        target[whole:] = chunk[whole:]


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
    expected_shapes: Callable[[dict[str, Any]], Mapping[str, tuple[int, ...]]] | None = None,
    engine_fingerprint: str | None = None,
    defer: Collection[str] = (),
    allowed: Collection[str] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a state file written by ``save_state``; return (arrays, meta).

    Raises StateError for a missing or corrupt file, another kind, another schema version, or
    (when ``bundle_fingerprint`` is given) a state made with another bundle. Before any array is
    read, the shapes and dtypes its ``.npy`` headers declare are checked: no object arrays, the
    shapes ``expected_shapes(meta)`` names (when given), and the total against available memory.
    A state of another bundle fingerprint is accepted when ``engine_fingerprint`` is given, the
    state records the same ``engine`` and its ``labels`` (the same engine with other classes: the
    caller then maps the state's rows by label, see ``vlm_export.core.labels``).
    Arrays named in ``defer`` stay in the file: they come back as ``StoredArray`` (shape and
    dtype known, read block by block), so that a caller can fold a d x d matrix into another
    without holding both. Arrays other than those ``expected_shapes`` names, or outside
    ``allowed`` when given, are refused (StateError) before any is read.
    """
    path = _state_path(path)
    try:
        with open(path, "rb") as handle:
            _check_container(handle, path)
            archive = _open_archive(handle, path)
            with archive:
                headers = _declared_arrays(archive, path)
                meta = _read_meta(archive, headers, path)
                _check_meta(
                    meta, path, kind, schema_version, bundle_fingerprint, engine_fingerprint
                )
                if expected_shapes is not None:
                    expected = expected_shapes(meta)
                    _check_shapes(headers, expected, path)
                    _refuse_unknown(headers, expected, path)
                if allowed is not None:
                    _refuse_unknown(headers, allowed, path)
                loaded = [name for name in headers if name != META_KEY and name not in defer]
                require_memory(
                    f"state file {path}", sum(_nbytes(*headers[name]) for name in loaded)
                )
                arrays = {
                    name: _stored(path, archive.zip, name) if name in defer else archive[name]
                    for name in headers
                    if name != META_KEY
                }
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise StateError(f"{path} is not a readable state file ({exc})") from None
    return arrays, meta


def read_meta(path: str | Path) -> dict[str, Any]:
    """The JSON header of a state file (no array read); StateError if it cannot be read."""
    path = _state_path(path)
    try:
        with open(path, "rb") as handle:
            _check_container(handle, path)
            with _open_archive(handle, path) as archive:
                return _read_meta(archive, _declared_arrays(archive, path), path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise StateError(f"{path} is not a readable state file ({exc})") from None


def _state_path(path: str | Path) -> Path:
    """``path`` if it is a regular file; StateError for a folder, a missing file, a device, FIFO
    or socket (never opened: a FIFO would block the open until a writer came)."""
    path = Path(path)
    if path.is_dir():
        raise StateError(f"{path} is a folder, not a state file")
    if path.exists() and not path.is_file():
        raise StateError(f"{path} is not a regular file (a device, FIFO or socket)")
    if not path.is_file():
        raise StateError(f"state file not found: {path}")
    return path


def _check_container(handle: BinaryIO, path: Path) -> None:
    """Refuse what is not a zip archive of at most MAX_MEMBERS members, from its first bytes
    and its end record (the directory itself is not read)."""
    start = handle.read(4)
    if len(start) < 4:
        raise StateError(f"{path} is not a readable state file (empty or truncated)")
    if start == b"\x93NUM":  # the magic of a .npy file
        raise StateError(f"{path} is not a state file (a single .npy array, not .npz)")
    if start not in (b"PK\x03\x04", _ZIP_END):
        what = "JSON" if start[:1] in (b"{", b"[") else "text or other data"
        raise StateError(
            f"{path} is not a readable state file: it holds {what}, not a .npz archive"
        )
    size = handle.seek(0, 2)
    handle.seek(max(size - _ZIP_END_BYTES, 0))
    tail = handle.read()
    at = tail.rfind(_ZIP_END)
    if at < 0 or len(tail) - at < 22:
        raise StateError(f"{path} is not a readable state file (truncated: no zip directory)")
    disk_entries, entries = struct.unpack("<HH", tail[at + 8 : at + 12])
    if max(disk_entries, entries) > MAX_MEMBERS:
        count = "65,535 or more" if entries == 0xFFFF else f"{entries:,}"
        raise StateError(
            f"{path} holds {count} members; a state file holds at most {MAX_MEMBERS} arrays"
        )
    handle.seek(0)


def _refuse_unknown(headers: Mapping[str, object], known: Collection[str], path: Path) -> None:
    unknown = sorted(name for name in headers if name != META_KEY and name not in known)
    if unknown:
        names = ", ".join(repr(name[:80]) for name in unknown[:5])
        raise StateError(f"{path} holds arrays this state does not have: {names}")


def shape_text(shape: Sequence[object], most: int = 6) -> str:
    """A shape for a message, at most ``most`` dimensions spelled out (each cut to 20 chars)."""
    dims = [str(dim)[:20] for dim in shape[:most]]
    if len(shape) <= most:
        return f"[{', '.join(dims)}]"
    return f"[{', '.join(dims)}, ...] ({len(shape)} dimensions)"


def _open_archive(handle: BinaryIO, path: Path) -> np.lib.npyio.NpzFile:
    """The lazy ``.npz`` reader of an open file (no pickle); StateError for a plain ``.npy``.

    The file is opened by the caller and handed to ``np.load`` as an open file, so it is closed
    on every path: ``np.load`` given a file name leaks its handle when the zip directory is
    unreadable (a truncated file), which Python reports as an "unclosed file" ResourceWarning.
    """
    data = np.load(handle, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise StateError(f"{path} is not a state file (a single .npy array, not .npz)")
    return data


def _declared_arrays(
    archive: np.lib.npyio.NpzFile, path: Path
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array, from its ``.npy`` header (no array data is read)."""
    headers = {}
    members = archive.zip.namelist()
    strange = [member for member in members if not _MEMBER.fullmatch(member)]
    if strange:
        raise StateError(
            f"{path} holds a member that is not an array of a state: {strange[0][:80]!r}"
        )
    for member in members:
        name = member[: -len(".npy")]
        with archive.zip.open(member) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        if dtype.hasobject:
            raise StateError(f"{path}: array {name!r} has dtype object (would need pickle)")
        headers[name] = (tuple(shape), dtype)
    return headers


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _read_meta(
    archive: np.lib.npyio.NpzFile, headers: dict[str, tuple[tuple[int, ...], np.dtype]], path: Path
) -> dict[str, Any]:
    if META_KEY not in headers:
        raise StateError(f"{path} is not a vlm-export state file (no {META_KEY})")
    shape, dtype = headers[META_KEY]
    if shape != () or dtype.kind != "U" or _nbytes(shape, dtype) > MAX_META_BYTES:
        raise StateError(f"{path} has a corrupt header (not a JSON string)")
    meta = parse_json(str(archive[META_KEY]), f"{path} header", StateError)
    if not isinstance(meta, dict):
        raise StateError(f"{path} has a corrupt header (not a JSON object)")
    return meta


def _check_meta(
    meta: dict[str, Any],
    path: Path,
    kind: str,
    schema_version: int,
    bundle_fingerprint: str | None,
    engine_fingerprint: str | None,
) -> None:
    if meta.get("kind") != kind:
        raise StateError(f"{path} holds a {meta.get('kind')!r} state, expected {kind!r}")
    if meta.get("schema_version") != schema_version:
        raise StateError(
            f"{path} has {kind} schema {meta.get('schema_version')!r}, this version reads "
            f"{schema_version!r}"
        )
    same_engine = (
        engine_fingerprint is not None
        and meta.get("engine") == engine_fingerprint
        and "labels" in meta
    )
    if (
        bundle_fingerprint is not None
        and meta.get("bundle") != bundle_fingerprint
        and not same_engine
    ):
        raise StateError(
            f"{path} was made with another bundle (fingerprint {meta.get('bundle')}, this bundle "
            f"is {bundle_fingerprint}): other model or class list"
        )


def _check_shapes(
    headers: dict[str, tuple[tuple[int, ...], np.dtype]],
    expected: Mapping[str, tuple[int, ...]],
    path: Path,
) -> None:
    for name, shape in expected.items():
        if name not in headers:
            raise StateError(f"{path} has no array {name!r}")
        declared = headers[name][0]
        if declared != tuple(shape):
            raise StateError(
                f"{path}: array {name!r} is declared {shape_text(declared)}, expected "
                f"{shape_text(tuple(shape))}"
            )


def _stored(path: Path, archive: zipfile.ZipFile, name: str) -> StoredArray:
    """A StoredArray for member ``name`` (its header read, not its data)."""
    with archive.open(f"{name}.npy") as member:
        shape, fortran_order, dtype = _read_header(member)
    return StoredArray(path, name, tuple(shape), dtype, bool(fortran_order))
