"""A ladder's weights file mapped once: rows read in place, and the resident pages handed back
only where that loses nothing (a copy-on-write mapping that was written to keeps its pages)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlm_export.runtime.engines.ladder.mapped_weights import MappedWeights, written_kb


class _Folder:
    def __init__(self, path: Path) -> None:
        self.path = path


def _weights(tmp_path: Path) -> tuple[_Folder, dict]:
    rows = np.arange(3 * 4096, dtype=np.float32)
    (tmp_path / "w.bin").write_bytes(rows.tobytes())
    table = [
        {"name": "a", "dtype": "float32", "shape": [4096], "offset": 0},
        {"name": "b", "dtype": "float32", "shape": [2, 4096], "offset": 4 * 4096},
    ]
    return _Folder(tmp_path), {"file": "w.bin", "table": table}


def test_rows_are_read_in_place_from_one_mapping(tmp_path):
    folder, record = _weights(tmp_path)
    mapped = MappedWeights(folder, record)  # type: ignore[arg-type]
    start = np.frombuffer(mapped._map, np.uint8).ctypes.data
    assert mapped.arrays["a"].ctypes.data == start
    assert mapped.arrays["b"].ctypes.data == start + 4 * 4096
    np.testing.assert_array_equal(mapped.arrays["b"][1, :3], [8192, 8193, 8194])
    assert not mapped.arrays["a"].flags.writeable
    mapped.release_pages()
    np.testing.assert_array_equal(mapped.arrays["b"][1, :3], [8192, 8193, 8194])


def test_a_written_copy_on_write_mapping_keeps_its_pages(tmp_path):
    folder, record = _weights(tmp_path)
    mapped = MappedWeights(folder, record, writable=True)  # type: ignore[arg-type]
    address, length = np.frombuffer(mapped._map, np.uint8).ctypes.data, len(mapped._map)
    assert written_kb(address, length) == 0
    mapped.release_pages()  # nothing written: dropped, the file's bytes page back in
    assert mapped.arrays["a"][5] == 5.0
    mapped.arrays["a"][5] = -1.0
    assert written_kb(address, length) > 0
    mapped.release_pages()  # written: kept, the write is not undone
    assert mapped.arrays["a"][5] == -1.0
    assert np.fromfile(tmp_path / "w.bin", np.float32)[5] == 5.0, "the file is never written"


def test_nothing_mapped_there_is_unknown():
    assert written_kb(0, 4096) is None
