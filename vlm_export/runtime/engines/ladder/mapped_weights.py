"""A ladder's weights file mapped once, as one array per row of its table (name, dtype, shape,
offset): the memory every rung reads its weights from, on ONNX Runtime and on OpenVINO."""

from __future__ import annotations

import contextlib
import mmap
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm_export.core.errors import BundleError

if TYPE_CHECKING:
    from vlm_export.runtime.bundle import Bundle


#: madvise(2)'s MADV_PAGEOUT (Linux 5.4+; Python's mmap names it from 3.13 where the headers do)
MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21 if sys.platform == "linux" else None)


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
        """Hand the resident pages of the mapping back (they page back in from the file if read).

        A read-only mapping drops them (``MADV_DONTNEED``). A copy-on-write mapping is paged out
        instead (``MADV_PAGEOUT``), which keeps a page that was written to: dropping it would
        bring the file's bytes back in its place. Where the kernel has no MADV_PAGEOUT, the
        pages of a copy-on-write mapping stay.
        """
        if self._map is None:
            return
        advice = MADV_PAGEOUT if self.writable else getattr(mmap, "MADV_DONTNEED", None)
        if advice is None:
            return
        with contextlib.suppress(OSError):  # an older kernel: the pages stay, nothing is lost
            self._map.madvise(advice)
