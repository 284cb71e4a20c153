"""Primal RAIL: both exact routes against the spec's closed form and its literal Woodbury order."""

import numpy as np
import pytest

from vlm_export.runtime.rail import PrimalAdapter, RailError, random_projection
from vlm_export.runtime.rail import primal as primal_module

IN_DIM, CLASSES, HIDDEN, RIDGE = 12, 9, 48, 0.1


def literal_projection(in_dim, hidden, seed):
    bound = 1 / np.sqrt(in_dim)
    return np.random.default_rng(seed).uniform(-bound, bound, size=(in_dim, hidden))


def literal_phi(x, projection):
    return np.maximum(x @ projection, 0) if projection is not None else x


def literal_joint(x, labels, projection, classes=CLASSES, ridge=RIDGE):
    """W = (Phi^T Phi + lambda I)^-1 Phi^T Y on all data at once."""
    phi = literal_phi(x, projection)
    targets = np.eye(classes)[labels]
    return np.linalg.solve(phi.T @ phi + ridge * np.eye(phi.shape[1]), phi.T @ targets)


def literal_woodbury(r, w, x_phi, targets):
    """The spec's update, in the spec's order, with explicit inverses."""
    u = r @ x_phi.T
    r = r - u @ np.linalg.inv(np.eye(len(x_phi)) + x_phi @ u) @ u.T
    w = w + r @ x_phi.T @ (targets - x_phi @ w)
    return r, w


def data(seed, count=120, classes=CLASSES):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, IN_DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, rng.integers(0, classes, count)


def random_batches(rng, count):
    """Random batch sizes covering ``count`` rows, with several one-sample batches."""
    sizes = [1, 1]
    while sum(sizes) < count:
        sizes.append(int(rng.choice([1, 2, 7, 19, 33])))
    sizes[-1] -= sum(sizes) - count
    return [size for size in sizes if size]


def rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def test_projection_is_the_recorded_uniform_draw():
    projection = random_projection(IN_DIM, HIDDEN, 5)
    np.testing.assert_array_equal(projection, literal_projection(IN_DIM, HIDDEN, 5))
    assert np.abs(projection).max() <= 1 / np.sqrt(IN_DIM)
    assert not np.array_equal(projection, random_projection(IN_DIM, HIDDEN, 6))


@pytest.mark.parametrize("route", ["cholesky", "woodbury"])
@pytest.mark.parametrize("hidden", [HIDDEN, 0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_equals_joint(route, hidden, seed):
    x, labels = data(seed)
    rng = np.random.default_rng(100 + seed)
    order = rng.permutation(len(x))  # domains arrive in a random order of samples
    adapter = PrimalAdapter(IN_DIM, CLASSES, hidden, RIDGE, seed=seed, route=route)
    start = 0
    for size in random_batches(rng, len(x)):
        rows = order[start : start + size]
        adapter.partial_fit(x[rows], labels[rows])
        start += size
    adapter.finalize()
    projection = literal_projection(IN_DIM, hidden, seed) if hidden else None
    joint = literal_joint(x, labels, projection)
    assert rel(adapter.weights, joint) < 1e-9
    assert adapter.num_samples == len(x)
    np.testing.assert_array_equal(adapter.learned_mask, np.isin(np.arange(CLASSES), labels))
    phi_test = literal_phi(x[:5], projection)
    assert rel(adapter.predict(x[:5]), phi_test @ joint) < 1e-9


def test_woodbury_matches_literal_spec_order_after_every_batch():
    x, labels = data(7)
    projection = literal_projection(IN_DIM, HIDDEN, 0)
    adapter = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, RIDGE, seed=0, route="woodbury")
    r, w = np.eye(HIDDEN) / RIDGE, np.zeros((HIDDEN, CLASSES))
    start = 0
    for size in [1, 5, 1, 40, 3, 70]:
        rows = slice(start, start + size)
        adapter.partial_fit(x[rows], labels[rows])
        targets = np.eye(CLASSES)[labels[rows]]
        r, w = literal_woodbury(r, w, literal_phi(x[rows], projection), targets)
        assert rel(adapter.inverse, r) < 1e-9
        assert rel(adapter.weights, w) < 1e-9
        start += size


def test_woodbury_equals_cholesky_and_r_is_the_inverse():
    x, labels = data(3)
    chol = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=4, route="cholesky")
    wood = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=4, route="woodbury")
    for start in range(0, len(x), 25):
        chol.partial_fit(x[start : start + 25], labels[start : start + 25])
        wood.partial_fit(x[start : start + 25], labels[start : start + 25])
        chol.finalize()
        assert rel(wood.weights, chol.weights) < 1e-9
    wood.finalize()  # no-op for woodbury
    ridge_system = chol.gram + RIDGE * np.eye(HIDDEN)
    assert rel(wood.inverse, np.linalg.inv(ridge_system)) < 1e-9


def test_predict_solves_pending_statistics():
    x, labels = data(4)
    adapter = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=0)
    adapter.partial_fit(x, labels)
    assert not adapter.solved
    joint = literal_joint(x, labels, literal_projection(IN_DIM, HIDDEN, 0))
    expected = literal_phi(x[:3], literal_projection(IN_DIM, HIDDEN, 0)) @ joint
    assert rel(adapter.predict(x[:3]), expected) < 1e-9
    assert adapter.solved


@pytest.mark.parametrize("route", ["cholesky", "woodbury"])
def test_label_space_grows_with_zero_columns(route):
    x, labels = data(5, classes=CLASSES + 4)
    old = labels < CLASSES
    adapter = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=1, route=route)
    adapter.partial_fit(x[old], labels[old])
    adapter.extend_classes(CLASSES + 4)
    adapter.finalize()
    assert adapter.num_classes == CLASSES + 4
    np.testing.assert_array_equal(adapter.weights[:, CLASSES:], 0.0)
    assert not adapter.learned_mask[CLASSES:].any()
    adapter.partial_fit(x[~old], labels[~old])
    adapter.finalize()
    joint = literal_joint(x, labels, literal_projection(IN_DIM, HIDDEN, 1), classes=CLASSES + 4)
    assert rel(adapter.weights, joint) < 1e-9
    with pytest.raises(RailError, match="only grow"):
        adapter.extend_classes(CLASSES)


@pytest.mark.parametrize("route", ["cholesky", "woodbury"])
def test_overflowing_update_raises_and_leaves_state_intact(route):
    x, labels = data(6)
    adapter = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=0, route=route)
    adapter.partial_fit(x[:50], labels[:50])
    adapter.finalize()
    before = {k: np.copy(v) for k, v in vars(adapter).items() if isinstance(v, np.ndarray)}
    count = adapter.num_samples
    with pytest.raises(RailError):
        adapter.partial_fit(x[50:60] * 1e160, labels[50:60])
    for name, value in before.items():
        np.testing.assert_array_equal(getattr(adapter, name), value)
    assert adapter.num_samples == count


def test_non_finite_solve_keeps_previous_weights():
    x, labels = data(8)
    adapter = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=0)
    adapter.partial_fit(x, labels)
    adapter.finalize()
    weights = adapter.weights.copy()
    adapter.partial_fit(x[:4], labels[:4])
    adapter.gram[3, 3] = np.nan  # a corrupted statistic
    with pytest.raises(RailError, match="G \\+ lambda I"):
        adapter.finalize()
    np.testing.assert_array_equal(adapter.weights, weights)
    assert not adapter.solved


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (np.zeros((3, IN_DIM + 1)), np.zeros(3, int), "shape"),
        (np.full((3, IN_DIM), np.nan), np.zeros(3, int), "NaN"),
        (np.zeros((3, IN_DIM)), np.zeros(2, int), "one per row"),
        (np.zeros((3, IN_DIM)), np.array([0, 1, CLASSES]), "lie in"),
        (np.zeros((3, IN_DIM)), np.array([0.0, 1.0, 2.0]), "integer"),
    ],
)
def test_bad_input_is_a_user_error(features, labels, message):
    adapter = PrimalAdapter(IN_DIM, CLASSES, HIDDEN)
    with pytest.raises(RailError, match=message):
        adapter.partial_fit(features, labels)


def test_bad_hyperparameters():
    with pytest.raises(RailError, match="route"):
        PrimalAdapter(IN_DIM, CLASSES, HIDDEN, route="lu")
    with pytest.raises(RailError, match="ridge"):
        PrimalAdapter(IN_DIM, CLASSES, HIDDEN, ridge=0.0)
    with pytest.raises(RailError, match="seed"):
        PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=-1)
    with pytest.raises(RailError, match="projection"):
        PrimalAdapter(IN_DIM, CLASSES, HIDDEN, projection=np.zeros((IN_DIM, HIDDEN + 1)))


@pytest.mark.parametrize("route", ["cholesky", "woodbury"])
def test_large_batches_in_chunks_equal_joint(monkeypatch, route):
    monkeypatch.setattr(primal_module, "CHUNK_ROWS", 7)  # 120 samples: 18 chunks
    monkeypatch.setattr(primal_module, "FIRST_SOLVE_ROWS", 11)
    x, labels = data(9)
    adapter = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, RIDGE, seed=2, route=route)
    adapter.partial_fit(x[:100], labels[:100])
    adapter.partial_fit(x[100:], labels[100:])
    adapter.finalize()
    projection = literal_projection(IN_DIM, HIDDEN, 2)
    assert rel(adapter.weights, literal_joint(x, labels, projection)) < 1e-9
    phi = literal_phi(x, projection)
    matrix = adapter.gram if route == "cholesky" else np.linalg.inv(adapter.inverse)
    expected = phi.T @ phi + (RIDGE * np.eye(HIDDEN) if route == "woodbury" else 0)
    assert rel(matrix, expected) < 1e-9
    whole = adapter.gram if route == "cholesky" else adapter.inverse
    np.testing.assert_array_equal(whole, whole.T)  # read back whole and symmetric


@pytest.mark.parametrize("count", [10, HIDDEN // 2, HIDDEN // 2 + 1, 100])
def test_first_domain_solve_equals_joint_either_way(monkeypatch, count):
    # count <= d/2: W from the N x N system Phi Phi^T + lambda I; above: from G + lambda I
    monkeypatch.setattr(primal_module, "CHUNK_ROWS", 7)  # G and B accumulated in chunks
    x, labels = data(10, count=count)
    adapter = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, RIDGE, seed=3)
    adapter.partial_fit(x, labels)
    assert adapter.solved == (count <= HIDDEN // 2)
    adapter.finalize()
    joint = literal_joint(x, labels, literal_projection(IN_DIM, HIDDEN, 3))
    assert rel(adapter.weights, joint) < 1e-9
    np.testing.assert_array_equal(adapter.weights[:, ~np.isin(np.arange(CLASSES), labels)], 0.0)
    more_x, more_labels = data(11, count=30)  # the statistics kept are G and B all the same
    adapter.partial_fit(more_x, more_labels)
    adapter.finalize()
    both = np.concatenate([x, more_x]), np.concatenate([labels, more_labels])
    joint = literal_joint(*both, literal_projection(IN_DIM, HIDDEN, 3))
    assert rel(adapter.weights, joint) < 1e-9


@pytest.mark.parametrize("count", [20, 100])  # first-domain solve (N <= d / 2), then G's solve
def test_weights_are_solved_in_their_own_memory(count):
    # classes 7, 1, 5 only (neither leading nor contiguous): packed into W's first columns,
    # solved there and moved to their places; a stale nonzero column is zeroed
    x, labels = data(12, count=count)
    labels = np.array([7, 1, 5])[labels % 3]
    adapter = PrimalAdapter(IN_DIM, CLASSES, HIDDEN, seed=0)
    weights = adapter.weights
    adapter.partial_fit(x, labels)
    adapter.weights[:, 3] = 2.0
    adapter.solved = False
    adapter.finalize()
    assert adapter.weights is weights and weights.flags.f_contiguous
    assert adapter.cross.flags.f_contiguous
    assert rel(weights, literal_joint(x, labels, literal_projection(IN_DIM, HIDDEN, 0))) < 1e-9
    np.testing.assert_array_equal(weights[:, [0, 2, 3, 4, 6, 8]], 0.0)
    adapter.extend_classes(CLASSES + 2)
    assert adapter.weights.flags.f_contiguous and adapter.cross.flags.f_contiguous
    np.testing.assert_array_equal(adapter.weights[:, :CLASSES], weights)


@pytest.mark.parametrize("columns", [[2, 3, 4], [0, 2, 5], [5], []])
def test_column_helpers_against_a_literal_loop(columns):
    from vlm_export.runtime.rail.primal import add_to_columns, columns_of

    rng = np.random.default_rng(3)
    array = np.asfortranarray(rng.normal(size=(4, 6)))
    index = np.array(columns, dtype=np.int64)
    np.testing.assert_array_equal(columns_of(array, index), array[:, index])
    rows = rng.normal(size=(len(columns), 4))
    expected = array.copy()
    for i, column in enumerate(columns):
        expected[:, column] += rows[i]
    memory = array.__array_interface__["data"][0]
    add_to_columns(array, index, rows)
    np.testing.assert_array_equal(array, expected)
    assert array.__array_interface__["data"][0] == memory
