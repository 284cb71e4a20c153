"""A ladder's weights file mapped once, as one array per row of its table (name, dtype, shape,
offset): the memory every rung reads its weights from, on ONNX Runtime and on OpenVINO."""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm_export.core.errors import BundleError

if TYPE_CHECKING:
    from vlm_export.runtime.bundle import Bundle


class MappedWeights:
    """The weights file of ``weights`` (a manifest weights record) mapped, one array per row.

    Read-only by default. ``writable`` maps it copy-on-write, for libraries that take only
    writable arrays without copying them (OpenVINO's shared-memory constants): nothing writes to
    them, so the pages stay the file's and are shared with the page cache.
    """

    def __init__(self, bundle: Bundle, weights: dict[str, Any], writable: bool = False) -> None:
        table = weights.get("table") or []
        self.writable = writable
        access = mmap.ACCESS_COPY if writable else mmap.ACCESS_READ
        with open(bundle.path / weights["file"], "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=access) if table else None
        self.arrays: dict[str, np.ndarray] = {}
        for row in table:
            dtype = np.dtype(row["dtype"])
            count = int(np.prod(row["shape"], dtype=np.int64))
            offset = int(row["offset"])
            if self._map is None or offset + count * dtype.itemsize > len(self._map):
                raise BundleError(f"{weights['file']} is shorter than its table says")
            array = np.frombuffer(self._map, dtype, count, offset).reshape(row["shape"])
            self.arrays[row["name"]] = array

    def release_pages(self) -> None:
        """Drop the resident pages of the mapping (they page back in from the file if read).

        A copy-on-write mapping is dropped only while none of its pages was written to (its
        ``Private_Dirty`` in ``/proc/self/smaps`` is 0): dropping a written page would bring
        the file's bytes back in its place. Where that cannot be read, its pages stay.
        """
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        address = np.frombuffer(self._map, np.uint8).ctypes.data
        if self.writable and written_kb(address, len(self._map)) != 0:
            return
        self._map.madvise(mmap.MADV_DONTNEED)


def written_kb(address: int, length: int) -> int | None:
    """Private_Dirty (kB) summed over this process's mappings in [address, address + length):
    what was written to them; None where unknown (no /proc, or nothing mapped there)."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    total, found, inside = 0, False, False
    for line in lines:
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in head and not head.endswith(":"):
            start, _, end = head.partition("-")
            inside = int(start, 16) < address + length and address < int(end, 16)
            found = found or inside
        elif inside and head == "Private_Dirty:":
            total += int(line.split()[1])
    return total if found else None
