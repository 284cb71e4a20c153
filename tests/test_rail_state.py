"""RAIL learner / inference state files: round trips, refusals, atomicity, and merging devices."""

import re
import subprocess
import sys

import numpy as np
import pytest

from vlm_export.core import state_file
from vlm_export.core.atomic import WriteError
from vlm_export.core.errors import StateError, UserError
from vlm_export.runtime.rail import (
    DualAdapter,
    PrimalAdapter,
    PrimalPredictor,
    RailError,
    load_inference_state,
    load_learner_state,
    merge_learner_states,
    save_inference_state,
    save_learner_state,
    to_inference,
)
from vlm_export.runtime.rail import state as rail_state
from vlm_export.runtime.rail.state import (
    INFERENCE_KIND,
    LEARNER_KIND,
    SCHEMA_VERSION,
    merge_learner_files,
)

IN_DIM, CLASSES, HIDDEN = 10, 7, 24
BUNDLE, OTHER_BUNDLE = "a1b2c3d4e5f60718", "ffffffffffffffff"


def data(seed, count=60):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, IN_DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, rng.integers(0, CLASSES, count)


def literal_joint(x, labels, seed, hidden=HIDDEN, ridge=0.1):
    bound = 1 / np.sqrt(IN_DIM)
    projection = np.random.default_rng(seed).uniform(-bound, bound, size=(IN_DIM, hidden))
    phi = np.maximum(x @ projection, 0)
    return np.linalg.solve(phi.T @ phi + ridge * np.eye(hidden), phi.T @ np.eye(CLASSES)[labels])


def rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def learners():
    return {
        "cholesky": PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=3, route="cholesky"),
        "woodbury": PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=3, route="woodbury"),
        "no-rhl": PrimalAdapter(IN_DIM, CLASSES, 0, seed=3),
        "dual": DualAdapter(IN_DIM, CLASSES),
    }


@pytest.mark.parametrize("name", ["cholesky", "woodbury", "no-rhl", "dual"])
def test_learner_round_trip_then_keep_learning(tmp_path, name):
    x, labels = data(0)
    saved, uninterrupted = learners()[name], learners()[name]
    saved.partial_fit(x[:30], labels[:30])
    uninterrupted.partial_fit(x[:30], labels[:30])
    path = tmp_path / "learner.npz"
    save_learner_state(path, saved, BUNDLE)
    loaded = load_learner_state(path, BUNDLE)
    assert type(loaded) is type(saved)
    np.testing.assert_array_equal(loaded.learned_mask, saved.learned_mask)
    assert loaded.num_samples == 30
    np.testing.assert_array_equal(loaded.predict(x[40:]), saved.predict(x[40:]))
    loaded.partial_fit(x[30:], labels[30:])
    uninterrupted.partial_fit(x[30:], labels[30:])
    np.testing.assert_allclose(loaded.predict(x), uninterrupted.predict(x), rtol=0, atol=1e-12)


def test_state_of_the_earlier_layout_loads_and_keeps_learning(tmp_path):
    # earlier versions kept W and B C-ordered: such a file loads into Fortran order, unchanged
    x, labels = data(0)
    learner = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=3)
    learner.partial_fit(x[:30], labels[:30])
    learner.finalize()
    weights, cross = learner.weights.copy(), learner.cross.copy()
    learner.weights, learner.cross = np.ascontiguousarray(weights), np.ascontiguousarray(cross)
    path = tmp_path / "earlier.npz"
    save_learner_state(path, learner, BUNDLE)
    with np.load(path) as stored:
        assert stored["weights"].flags.c_contiguous and not stored["weights"].flags.f_contiguous
    loaded = load_learner_state(path, BUNDLE)
    assert loaded.weights.flags.f_contiguous and loaded.cross.flags.f_contiguous
    np.testing.assert_array_equal(loaded.weights, weights)
    np.testing.assert_array_equal(loaded.cross, cross)
    loaded.partial_fit(x[30:], labels[30:])
    loaded.finalize()
    assert rel(loaded.weights, literal_joint(x, labels, 3)) < 1e-9


@pytest.mark.parametrize("name", ["cholesky", "woodbury", "no-rhl", "dual"])
def test_inference_state_round_trip(tmp_path, name):
    x, labels = data(1)
    learner = learners()[name]
    learner.partial_fit(x, labels)
    path = tmp_path / "inference.npz"
    save_inference_state(path, learner, BUNDLE)
    predictor = load_inference_state(path, BUNDLE)
    np.testing.assert_array_equal(predictor.learned_mask, learner.learned_mask)
    expected = learner.predict(x[:8])
    tolerance = 1e-5 * np.abs(expected).max()
    np.testing.assert_allclose(predictor.predict(x[:8]), expected, atol=tolerance)
    np.testing.assert_array_equal(predictor.predict(x[:8]), to_inference(learner).predict(x[:8]))
    assert "gram" not in np.load(path).files and "inverse" not in np.load(path).files
    if isinstance(predictor, PrimalPredictor):
        assert predictor.weights.dtype == np.float32


def test_inference_state_is_smaller_than_learner_state(tmp_path):
    learner = PrimalAdapter(IN_DIM, CLASSES, 200, seed=0)
    learner.partial_fit(*data(2))
    save_learner_state(tmp_path / "l.npz", learner, BUNDLE)
    save_inference_state(tmp_path / "i.npz", learner, BUNDLE)
    assert (tmp_path / "i.npz").stat().st_size * 10 < (tmp_path / "l.npz").stat().st_size


def test_refusals(tmp_path):
    learner = learners()["cholesky"]
    learner.partial_fit(*data(3))
    path = tmp_path / "learner.npz"
    save_learner_state(path, learner, BUNDLE)
    with pytest.raises(StateError, match="another bundle"):
        load_learner_state(path, OTHER_BUNDLE)
    with pytest.raises(StateError, match="expected 'rail-inference'"):
        load_inference_state(path, BUNDLE)
    # an older schema
    old = tmp_path / "old.npz"
    state_file.save_state(old, LEARNER_KIND, SCHEMA_VERSION - 1, BUNDLE, {"w": np.zeros(2)})
    with pytest.raises(StateError, match="schema"):
        load_learner_state(old, BUNDLE)
    # garbage and a truncated file
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(StateError, match="not a readable state"):
        load_learner_state(tmp_path / "garbage.npz", BUNDLE)
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StateError):
        load_learner_state(tmp_path / "cut.npz", BUNDLE)
    # right kind and schema, but an array missing / of the wrong shape
    arrays, meta = state_file.load_state(path, LEARNER_KIND, SCHEMA_VERSION, BUNDLE)
    for name, value in (("gram", None), ("cross", np.zeros((HIDDEN, CLASSES + 1)))):
        broken = {k: v for k, v in arrays.items() if k != name}
        if value is not None:
            broken[name] = value
        header = ("kind", "schema_version", "bundle")
        meta_fields = {k: v for k, v in meta.items() if k not in header}
        state_file.save_state(
            tmp_path / "b.npz", LEARNER_KIND, SCHEMA_VERSION, BUNDLE, broken, meta_fields
        )
        with pytest.raises(StateError, match=f"array '{name}'"):
            load_learner_state(tmp_path / "b.npz", BUNDLE)
    assert issubclass(StateError, UserError) and issubclass(RailError, UserError)


def test_failed_save_leaves_previous_file_byte_identical(tmp_path, monkeypatch):
    learner = learners()["cholesky"]
    learner.partial_fit(*data(4))
    path = tmp_path / "learner.npz"
    save_learner_state(path, learner, BUNDLE)
    before = path.read_bytes()
    learner.partial_fit(*data(5))

    def disk_full(handle, **arrays):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_file.np, "savez", disk_full)
    with pytest.raises(WriteError, match=r"cannot write .*learner.npz: No space"):
        save_learner_state(path, learner, BUNDLE)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["learner.npz"]


@pytest.mark.parametrize("name", ["cholesky", "woodbury", "dual"])
def test_failed_update_leaves_state_file_and_learner_intact(tmp_path, name):
    learner = learners()[name]
    x, labels = data(6)
    learner.partial_fit(x, labels)
    path = tmp_path / "learner.npz"
    save_learner_state(path, learner, BUNDLE)
    before = path.read_bytes()
    loaded = load_learner_state(path, BUNDLE)
    expected = loaded.predict(x)
    bad = np.full((3, IN_DIM), np.nan) if name == "dual" else x[:3] * 1e160
    with pytest.raises(RailError):  # what a `learn` command sees before it would save
        loaded.partial_fit(bad, labels[:3])
        save_learner_state(path, loaded, BUNDLE)
    assert path.read_bytes() == before
    np.testing.assert_array_equal(loaded.predict(x), expected)


def test_merging_two_devices_equals_joint_training(tmp_path):
    x, labels = data(7, 90)
    paths = []
    for device, rows in enumerate((slice(0, 35), slice(35, 90))):
        learner = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=11)
        for start in range(rows.start, rows.stop, 9):  # each device learns in its own batches
            stop = min(start + 9, rows.stop)
            learner.partial_fit(x[start:stop], labels[start:stop])
        paths.append(tmp_path / f"device{device}.npz")
        save_learner_state(paths[-1], learner, BUNDLE)
    states = [load_learner_state(path, BUNDLE) for path in paths]
    grams = [state.gram.copy() for state in states]
    merged = merge_learner_states(states)
    assert rel(merged.weights, literal_joint(x, labels, seed=11)) < 1e-9
    assert merged.num_samples == 90
    np.testing.assert_array_equal(merged.learned_mask, np.isin(np.arange(CLASSES), labels))
    for state, gram in zip(states, grams, strict=True):
        np.testing.assert_array_equal(state.gram, gram)  # inputs untouched
    save_learner_state(tmp_path / "merged.npz", merged, BUNDLE)
    assert load_learner_state(tmp_path / "merged.npz", BUNDLE).solved
    # a generator that loads each file as it is needed gives the same joint learner
    loaded: list[str] = []

    def lazily():
        for path in paths:
            loaded.append(path.name)
            yield load_learner_state(path, BUNDLE)

    streamed = merge_learner_states(lazily())
    assert loaded == [path.name for path in paths]
    np.testing.assert_array_equal(streamed.weights, merged.weights)


def test_merging_dual_devices_equals_joint_solve():
    x, labels = data(8, 50)
    devices = [DualAdapter(IN_DIM, CLASSES) for _ in range(3)]
    for device, rows in zip(devices, (slice(0, 10), slice(10, 31), slice(31, 50)), strict=True):
        device.partial_fit(x[rows], labels[rows])
    merged = merge_learner_states(devices)
    kernel = np.exp(-0.1 * ((x[:, None] - x[None]) ** 2).sum(-1))
    alpha = np.linalg.solve(kernel + 1e-3 * np.eye(50), np.eye(CLASSES)[labels])
    assert rel(merged.coef, alpha) < 1e-7
    assert devices[0].num_samples == 10


def test_merge_refuses_mismatches():
    x, labels = data(9)
    base = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=1)
    others = {
        "seed": PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=2),
        "hidden_dim": PrimalAdapter(IN_DIM, CLASSES, HIDDEN + 1, seed=1),
        "num_classes": PrimalAdapter(IN_DIM, CLASSES + 1, HIDDEN, seed=1),
        "ridge": PrimalAdapter(IN_DIM, CLASSES, HIDDEN, ridge=0.2, seed=1),
        "woodbury": PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=1, route="woodbury"),
        "primal and dual": DualAdapter(IN_DIM, CLASSES),
    }
    for message, other in others.items():
        with pytest.raises(StateError, match=message):
            merge_learner_states([base, other])
    tampered = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=1)
    tampered.projection = tampered.projection + 1e-9
    with pytest.raises(StateError, match="W_r"):
        merge_learner_states([base, tampered])
    with pytest.raises(StateError, match="gamma"):
        merge_learner_states([DualAdapter(IN_DIM, CLASSES), DualAdapter(IN_DIM, CLASSES, 0.2)])
    with pytest.raises(StateError, match="no learner"):
        merge_learner_states([])


def test_rail_imports_without_torch_or_ray():
    # SciPy (LAPACK / BLAS in place) is a device dependency; torch and Ray are not
    code = (
        "import sys, vlm_export.runtime.rail; "
        "bad = {'torch', 'open_clip', 'ray'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _rewrite(source, target, kind=LEARNER_KIND, **changes):
    """Copy a state file with some arrays or header fields changed (None drops an array)."""
    arrays, meta = state_file.load_state(source, kind, SCHEMA_VERSION, BUNDLE)
    fields = {k: v for k, v in meta.items() if k not in ("kind", "schema_version", "bundle")}
    for name, value in changes.items():
        if name in arrays:
            arrays[name] = value
        else:
            fields[name] = value
    state_file.save_state(target, kind, SCHEMA_VERSION, BUNDLE, arrays, fields)
    return target


def _corrupt(array, index, value):
    array = array.copy()
    array[index] = value
    return array


@pytest.mark.parametrize("hidden", [HIDDEN, 0])
def test_states_that_cannot_be_right_are_refused_at_load(tmp_path, hidden):
    x, labels = data(12)
    path = tmp_path / "learner.npz"
    learner = PrimalAdapter(IN_DIM, CLASSES, hidden, seed=3)
    learner.partial_fit(x, labels)
    save_learner_state(path, learner, BUNDLE)
    gram, weights = learner.gram, learner.weights
    swapped = gram.copy()  # a 2 x 2 principal minor below zero
    swapped[0, 1] = swapped[1, 0] = 3 * np.sqrt(gram[0, 0] * gram[1, 1])
    values, vectors = np.linalg.eigh(gram)  # every 2 x 2 minor fine, one eigenvalue -1
    tilted = gram - (values[0] + 1.0) * np.outer(vectors[:, 0], vectors[:, 0])
    tilted = (tilted + tilted.T) / 2
    cases = [
        ("the Gram matrix G holds NaN or inf", {"gram": _corrupt(gram, (2, 3), np.nan)}),
        ("Gram matrix G has a negative diagonal", {"gram": _corrupt(gram, (4, 4), -1.0)}),
        ("Gram matrix G is not symmetric", {"gram": _corrupt(gram, (0, 1), gram[0, 1] + 1)}),
        ("Gram matrix G is not positive semi-definite", {"gram": swapped}),
        ("Gram matrix G is not positive semi-definite", {"gram": tilted}),
        ("-5 samples: a sample count cannot be negative", {"num_samples": -5}),
        ("the weights W holds NaN or inf", {"weights": _corrupt(weights, (0, 0), np.inf)}),
        ("the statistics B holds NaN or inf", {"cross": _corrupt(learner.cross, (1, 1), np.nan)}),
    ]
    for index, (message, change) in enumerate(cases):
        broken = _rewrite(path, tmp_path / f"bad{index}.npz", **change)
        with pytest.raises(StateError, match=message) as info:
            load_learner_state(broken, BUNDLE)
        assert "\n" not in str(info.value)
    load_learner_state(path, BUNDLE)  # the original loads


def test_bad_woodbury_and_inference_states_are_refused(tmp_path):
    x, labels = data(13)
    learner = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=3, route="woodbury")
    learner.partial_fit(x, labels)
    path = tmp_path / "learner.npz"
    save_learner_state(path, learner, BUNDLE)
    inverse = learner.inverse
    too_big = _rewrite(path, tmp_path / "big.npz", inverse=_corrupt(inverse, (0, 0), 20.0))
    with pytest.raises(StateError, match="above 1 / lambda"):
        load_learner_state(too_big, BUNDLE)
    zero = _rewrite(path, tmp_path / "zero.npz", inverse=_corrupt(inverse, (2, 2), 0.0))
    with pytest.raises(StateError, match="R = .* is not positive"):
        load_learner_state(zero, BUNDLE)
    inference = tmp_path / "inference.npz"
    save_inference_state(inference, learner, BUNDLE)
    predictor = load_inference_state(inference, BUNDLE)
    for name, value in (("weights", predictor.weights), ("projection", predictor.projection)):
        bad = _rewrite(
            inference,
            tmp_path / f"{name}.npz",
            INFERENCE_KIND,
            **{name: _corrupt(value, (1, 1), np.nan)},
        )
        with pytest.raises(StateError, match="holds NaN or inf"):
            load_inference_state(bad, BUNDLE)


def test_dual_state_with_nan_features_is_refused(tmp_path):
    x, labels = data(14, 20)
    learner = DualAdapter(IN_DIM, CLASSES)
    learner.partial_fit(x, labels)
    path = tmp_path / "dual.npz"
    save_learner_state(path, learner, BUNDLE)
    bad = _rewrite(path, tmp_path / "bad.npz", features=_corrupt(learner.features, (0, 0), np.nan))
    with pytest.raises(StateError, match="stored features holds NaN"):
        load_learner_state(bad, BUNDLE)
    bad = _rewrite(path, tmp_path / "labels.npz", labels=_corrupt(learner.labels, 0, CLASSES))
    with pytest.raises(StateError, match="labels outside"):
        load_learner_state(bad, BUNDLE)


def test_merging_files_streams_and_equals_merging_states(tmp_path, monkeypatch):
    monkeypatch.setattr(rail_state, "MERGE_BLOCK_ROWS", 5)  # G read 5 rows at a time
    x, labels = data(15, 90)
    paths = []
    for device, rows in enumerate((slice(0, 20), slice(20, 50), slice(50, 90))):
        learner = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=11)
        learner.partial_fit(x[rows], labels[rows])
        paths.append(tmp_path / f"device{device}.npz")
        save_learner_state(paths[-1], learner, BUNDLE)
    before = [path.read_bytes() for path in paths]
    merged = merge_learner_files(paths, BUNDLE)
    reference = merge_learner_states(load_learner_state(path, BUNDLE) for path in paths)
    np.testing.assert_allclose(merged.gram, reference.gram, rtol=1e-14, atol=1e-14)
    assert rel(merged.weights, literal_joint(x, labels, seed=11)) < 1e-9
    assert merged.num_samples == 90 and [p.read_bytes() for p in paths] == before
    other = PrimalAdapter(IN_DIM, CLASSES, HIDDEN + 1, seed=11)
    save_learner_state(tmp_path / "wide.npz", other, BUNDLE)
    with pytest.raises(StateError, match="hidden_dim = 25, state 0 has 24"):
        merge_learner_files([paths[0], tmp_path / "wide.npz"], BUNDLE)
    save_learner_state(
        tmp_path / "seed.npz", PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=12), BUNDLE
    )
    with pytest.raises(StateError, match="seed = 12, state 0 has 11"):
        merge_learner_files([paths[0], tmp_path / "seed.npz"], BUNDLE)
    nan = _rewrite(
        paths[1],
        tmp_path / "nan.npz",
        gram=_corrupt(load_learner_state(paths[1], BUNDLE).gram, (3, 3), np.nan),
    )
    with pytest.raises(StateError, match="Gram matrix G holds NaN"):
        merge_learner_files([paths[0], nan], BUNDLE)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("dual", {"in_dim": 2**70}, "array 'features' should be float64 [20, 1180591620717411303"),
        (
            "no-rhl",
            {"in_dim": 2**40},
            f"array 'weights' should be float64 [1099511627776, {CLASSES}]",
        ),
        ("cholesky", {"in_dim": 2**40}, "array 'projection' should be float64 [1099511627776, 24]"),
        ("no-rhl", {"num_classes": 2**40}, "array 'learned_mask' should be bool [1099511627776]"),
        ("no-rhl", {"in_dim": -3}, f"array 'weights' should be float64 [-3, {CLASSES}]"),
    ],
)
def test_header_sizes_are_checked_against_the_arrays_before_anything_is_allocated(
    tmp_path, name, change, message
):
    """A header declaring a huge width is a one-line StateError, not a ValueError of NumPy or a
    MemoryError for 80 TiB; ``primal_sizes`` (the memory estimate's input) checks the same."""
    x, labels = data(15, 20)
    learner = learners()[name]
    learner.partial_fit(x, labels)
    path = tmp_path / "learner.npz"
    save_learner_state(path, learner, BUNDLE)
    bad = _rewrite(path, tmp_path / "bad.npz", **change)
    with pytest.raises(StateError, match=re.escape(message)):
        load_learner_state(bad, BUNDLE)
    for order in ([bad, path], [path, bad]):
        with pytest.raises(StateError, match=r"bad.npz: array '\w+' should be .*corrupt state"):
            merge_learner_files(order, BUNDLE)
    if name != "dual":
        with pytest.raises(StateError, match=re.escape(message)):
            rail_state.primal_sizes(bad)
        assert rail_state.primal_sizes(path) == (IN_DIM, CLASSES, learner.hidden_dim)
    else:
        assert rail_state.primal_sizes(bad) is None
