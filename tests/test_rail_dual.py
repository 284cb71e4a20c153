"""Dual RAIL: the block (Schur) growth of M and alpha against a direct solve on all data."""

import numpy as np
import pytest

from vlm_export.runtime.rail import DualAdapter, RailError, rbf_kernel

IN_DIM, CLASSES, GAMMA, RIDGE = 10, 6, 0.1, 1e-3


def literal_kernel(a, b, gamma=GAMMA):
    return np.exp(-gamma * ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def data(seed, count=80, classes=CLASSES):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, IN_DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, rng.integers(0, classes, count)


def rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def test_kernel_matches_definition():
    x, _ = data(0, 20)
    np.testing.assert_allclose(rbf_kernel(x[:7], x, GAMMA), literal_kernel(x[:7], x), atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_updates_equal_direct_solve(seed):
    x, labels = data(seed)
    adapter = DualAdapter(IN_DIM, CLASSES, GAMMA, RIDGE)
    start = 0
    for size in [1, 12, 1, 1, 30, 35]:
        adapter.partial_fit(x[start : start + size], labels[start : start + size])
        start += size
    system = literal_kernel(x, x) + RIDGE * np.eye(len(x))
    alpha = np.linalg.solve(system, np.eye(CLASSES)[labels])
    assert rel(adapter.coef, alpha) < 1e-7
    assert rel(adapter.inverse, np.linalg.inv(system)) < 1e-7
    test, _ = data(50 + seed, 9)
    assert rel(adapter.predict(test), literal_kernel(test, x) @ alpha) < 1e-7
    np.testing.assert_array_equal(adapter.features, x)
    np.testing.assert_array_equal(adapter.labels, labels)
    assert adapter.num_samples == len(x)


def test_label_space_grows_with_zero_columns():
    x, labels = data(3, classes=CLASSES + 2)
    old = labels < CLASSES
    adapter = DualAdapter(IN_DIM, CLASSES)
    adapter.partial_fit(x[old], labels[old])
    adapter.extend_classes(CLASSES + 2)
    np.testing.assert_array_equal(adapter.coef[:, CLASSES:], 0.0)
    adapter.partial_fit(x[~old], labels[~old])
    xs = np.concatenate([x[old], x[~old]])
    ys = np.concatenate([labels[old], labels[~old]])
    system = literal_kernel(xs, xs) + RIDGE * np.eye(len(xs))
    alpha = np.linalg.solve(system, np.eye(CLASSES + 2)[ys])
    assert rel(adapter.coef, alpha) < 1e-7
    np.testing.assert_array_equal(adapter.learned_mask, np.isin(np.arange(CLASSES + 2), labels))


def test_empty_adapter_predicts_zero_and_bad_update_changes_nothing():
    adapter = DualAdapter(IN_DIM, CLASSES)
    x, labels = data(4, 10)
    np.testing.assert_array_equal(adapter.predict(x), 0.0)
    adapter.partial_fit(x, labels)
    before = (adapter.features.copy(), adapter.inverse.copy(), adapter.coef.copy())
    with pytest.raises(RailError):
        adapter.partial_fit(np.full((2, IN_DIM), np.inf), labels[:2])
    with pytest.raises(RailError):
        adapter.partial_fit(x[:2], np.array([0, CLASSES]))
    for value, kept in zip(before, (adapter.features, adapter.inverse, adapter.coef), strict=True):
        np.testing.assert_array_equal(value, kept)
