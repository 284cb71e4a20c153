"""One-file state: corrupt headers, folders and truncated files are StateErrors, with no leaks."""

from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from vlm_export.core.errors import StateError
from vlm_export.core.state_file import META_KEY, load_state, save_state


def _load(path: Path):
    return load_state(path, "test", 1, "fp")


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    save_state(path, "test", 1, "fp", {"w": np.arange(6.0).reshape(2, 3)}, {"note": "x"})
    arrays, meta = _load(path)
    np.testing.assert_array_equal(arrays["w"], np.arange(6.0).reshape(2, 3))
    assert meta == {"kind": "test", "schema_version": 1, "bundle": "fp", "note": "x"}


@pytest.mark.parametrize("header", [[1, 2], "text", 3, None])
def test_header_that_is_not_an_object(tmp_path: Path, header) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, w=np.zeros(2), **{META_KEY: np.array(json.dumps(header))})
    with pytest.raises(StateError, match="corrupt header"):
        _load(path)


def test_folder_is_not_a_state_file(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="is a folder, not a state file"):
        _load(tmp_path)


def test_single_array_file_is_not_a_state_file(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(StateError, match="not a state file"):
        _load(path)


@pytest.mark.parametrize("keep", [0, 0.5, 0.99])
def test_truncated_file_leaves_no_open_handle(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "s.npz"
    save_state(path, "test", 1, "fp", {"w": np.arange(1000.0)})
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(StateError, match="not a readable state file"):
            _load(path)
        gc.collect()
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, [str(w.message) for w in leaks]


@pytest.mark.parametrize("order", ["C", "F"])
def test_deferred_array_read_sparsely_is_the_stored_array_bit_for_bit(
    tmp_path: Path, order: str
) -> None:
    # columns of zeros (skipped), a -0.0 (a nonzero bit pattern), a tail shorter than a page
    array = np.zeros((700, 9), order=order)
    array[:, 2] = np.random.default_rng(0).normal(size=700)
    array[3, 7], array[-1, -1] = -0.0, 5.0
    path = tmp_path / "s.npz"
    save_state(path, "test", 1, "fp", {"w": array})
    stored = load_state(path, "test", 1, "fp", defer=("w",))[0]["w"]
    assert stored.fortran_order == (order == "F")
    read = stored.read_sparse()
    assert read.flags.f_contiguous == (order == "F") and read.dtype == array.dtype
    np.testing.assert_array_equal(read.view(np.uint64), array.view(np.uint64))
    if order == "C":
        blocks = [block for _, block in stored.blocks(256)]
        np.testing.assert_array_equal(np.concatenate(blocks), array)
    else:
        with pytest.raises(StateError, match="Fortran order"):
            next(stored.blocks(256))
