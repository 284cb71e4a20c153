"""A ladder's weights file mapped once, as one array per row of its table (name, dtype, shape,
offset): the memory every rung reads its weights from, on ONNX Runtime and on OpenVINO."""

from __future__ import annotations

import mmap
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
        """Drop the resident pages of the mapping (they page back in from the file if read)."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)
