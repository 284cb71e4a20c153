"""TeachLearner against independent references: the literal primal closed form, the project's
primal RAIL learner, fresh learners on the remaining examples, and literal leave-one-out refits."""

from __future__ import annotations

import numpy as np
import pytest

from vlm_export.core.errors import StateError
from vlm_export.runtime.rail.inputs import RailError
from vlm_export.runtime.rail.primal import RIDGE, PrimalAdapter, random_projection
from vlm_export.runtime.teach.examples import UNKNOWN, Example, new_id
from vlm_export.runtime.teach.learner import TeachLearner
from vlm_export.runtime.teach.store import ids_digest

IN_DIM, HIDDEN = 512, 1024
LABELS = ["cat", "dog", "forklift", UNKNOWN, "line 3 jam"]


def unit_rows(rng, count, dim=IN_DIM):
    rows = rng.standard_normal((count, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def examples(seed, count, labels=LABELS):
    rng = np.random.default_rng(seed)
    vectors = unit_rows(rng, count)
    names = [labels[i] for i in rng.integers(0, len(labels), count)]
    return [
        Example(new_id(), name, "cam", "2026-01-01T00:00:00Z", vector)
        for name, vector in zip(names, vectors, strict=True)
    ]


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def literal_phi(x, hidden, seed=0):
    """ReLU(x W_r) with W_r drawn literally as spec/rail.md says (uniform +-1/sqrt(d_in))."""
    x = np.asarray(x, np.float64)
    if not hidden:
        return x
    bound = 1 / np.sqrt(x.shape[1])
    projection = np.random.default_rng(seed).uniform(-bound, bound, size=(x.shape[1], hidden))
    return np.maximum(x @ projection, 0)


def literal_primal(items, hidden, seed=0):
    """W = (Phi^T Phi + lambda I)^-1 Phi^T Y, with label columns sorted(set(labels))."""
    columns = sorted({e.label for e in items})
    phi = literal_phi([e.embedding for e in items], hidden, seed)
    targets = np.array([[float(e.label == c) for c in columns] for e in items])
    return np.linalg.solve(phi.T @ phi + RIDGE * np.eye(phi.shape[1]), phi.T @ targets), columns


def test_weights_equal_the_literal_primal_closed_form():
    items = examples(0, 80)
    learner = TeachLearner.fit(items, IN_DIM, HIDDEN)
    expected, columns = literal_primal(items, HIDDEN)
    assert learner.labels == columns == sorted(set(LABELS))
    assert rel(learner.weights, expected) < 1e-9
    assert learner.ids == sorted(e.id for e in items)
    assert learner.num_samples == 80


@pytest.mark.parametrize("route", ["cholesky", "woodbury"])
def test_weights_equal_the_primal_rail_learner(route):
    items = examples(1, 120)
    learner = TeachLearner.fit(items, IN_DIM, HIDDEN, seed=3)
    columns = sorted({e.label for e in items})
    rail = PrimalAdapter(IN_DIM, len(columns), hidden_dim=HIDDEN, seed=3, route=route)
    x = np.array([e.embedding for e in items])
    y = np.array([columns.index(e.label) for e in items])
    for start in range(0, len(items), 25):  # batches that do not use the sample-space solve
        if route == "cholesky":
            rail.accumulate(x[start : start + 25], y[start : start + 25])
        else:
            rail.partial_fit(x[start : start + 25], y[start : start + 25])
    rail.finalize()
    assert rel(learner.weights, rail.weights) < 1e-9
    probe = unit_rows(np.random.default_rng(9), 10)
    assert rel(learner.predict(probe), rail.predict(probe)) < 1e-9


def test_delete_equals_a_fresh_learner_without_it():
    items = examples(2, 60)
    learner = TeachLearner.fit(items, IN_DIM, HIDDEN)
    gone = items[17]
    learner.apply(removed=[gone.id])
    rest = [e for e in items if e.id != gone.id]
    fresh = TeachLearner.fit(rest, IN_DIM, HIDDEN)
    assert learner.ids == fresh.ids and learner.labels == fresh.labels
    assert rel(learner.weights, fresh.weights) < 1e-9
    probe = unit_rows(np.random.default_rng(5), 20)
    assert rel(learner.predict(probe), fresh.predict(probe)) < 1e-9
    assert rel(learner.weights, literal_primal(rest, HIDDEN)[0]) < 1e-9


def test_random_sequence_of_adds_and_deletes_equals_a_fresh_learner():
    rng = np.random.default_rng(4)
    pool = examples(4, 50)
    learner = TeachLearner(IN_DIM, HIDDEN)
    held: dict[str, Example] = {}
    waiting = list(pool)
    probe = unit_rows(rng, 16)
    worst = 0.0
    while waiting or held:
        count = int(rng.integers(1, 6))
        added, waiting = waiting[:count], waiting[count:]
        removed = [i for i in held if rng.random() < 0.15] if waiting else list(held)[:count]
        learner.apply(added=added, removed=removed + [new_id()])  # an unknown id is ignored
        for example in added:
            held[example.id] = example
        for name in removed:
            held.pop(name)
        fresh = TeachLearner.fit(held.values(), IN_DIM, HIDDEN)
        assert learner.ids == fresh.ids and learner.labels == fresh.labels
        if held:
            worst = max(worst, rel(learner.weights, fresh.weights))
            worst = max(worst, rel(learner.predict(probe), fresh.predict(probe)))
    assert worst < 1e-9
    assert learner.num_samples == 0 and learner.weights.shape == (HIDDEN, 0)
    assert learner.predict(probe).shape == (16, 0)


def test_order_and_batching_do_not_matter():
    items = examples(6, 70)
    rng = np.random.default_rng(6)
    reference = TeachLearner.fit(items, IN_DIM, HIDDEN)
    for _ in range(3):
        order = rng.permutation(len(items))
        learner = TeachLearner(IN_DIM, HIDDEN)
        start = 0
        while start < len(order):
            size = int(rng.integers(1, 12))
            learner.apply(added=[items[i] for i in order[start : start + size]])
            start += size
        assert learner.ids == reference.ids
        assert rel(learner.weights, reference.weights) < 1e-9


def test_duplicates_and_a_delete_in_the_same_batch():
    items = examples(7, 10)
    learner = TeachLearner.fit(items[:5], IN_DIM, HIDDEN)
    before = learner.weights.copy()
    learner.apply(added=items[:5])  # all held: nothing changes
    np.testing.assert_array_equal(learner.weights, before)
    learner.apply(added=[items[5], items[5], items[6]], removed=[items[6].id])
    assert learner.ids == sorted(e.id for e in items[:6])


def test_leave_one_out_equals_literal_refits():
    items = examples(8, 24)
    learner = TeachLearner.fit(items, IN_DIM, HIDDEN)
    loo = learner.loo_predictions()
    assert loo.shape == (24, len(learner.labels))
    by_id = {e.id: e for e in items}
    phi = literal_phi([by_id[name].embedding for name in learner.ids], HIDDEN)
    kernel = phi @ phi.T
    worst = 0.0
    for row in range(len(items)):
        rest = [i for i in range(len(items)) if i != row]
        columns = sorted({by_id[learner.ids[i]].label for i in rest})
        targets = np.array(
            [[float(by_id[learner.ids[i]].label == c) for c in columns] for i in rest]
        )
        if row < 3:  # the primal closed form on the other examples (d_h x d_h: a few only)
            weights = np.linalg.solve(
                phi[rest].T @ phi[rest] + RIDGE * np.eye(HIDDEN), phi[rest].T @ targets
            )
            output = phi[row] @ weights
        else:  # the same refit in sample space, solved by LU
            system = kernel[np.ix_(rest, rest)] + RIDGE * np.eye(len(rest))
            output = kernel[row, rest] @ np.linalg.solve(system, targets)
        expected = np.array(
            [output[columns.index(c)] if c in columns else 0.0 for c in learner.labels]
        )
        worst = max(worst, float(np.abs(loo[row] - expected).max() / np.abs(expected).max()))
    assert worst < 1e-9


def test_hidden_dim_zero_is_ridge_on_the_embeddings():
    items = examples(9, 40)
    learner = TeachLearner.fit(items, IN_DIM, 0)
    assert learner.projection is None and learner.weights.shape == (IN_DIM, len(learner.labels))
    expected, _ = literal_primal(items, 0)
    assert rel(learner.weights, expected) < 1e-9
    learner.apply(removed=[items[0].id])
    assert rel(learner.weights, TeachLearner.fit(items[1:], IN_DIM, 0).weights) < 1e-9
    snapshot = learner.predictor()
    probe = unit_rows(np.random.default_rng(1), 4)
    assert snapshot.projection is None
    assert rel(snapshot.predict(probe), learner.predict(probe)) < 1e-5


def test_predictor_is_a_float32_snapshot():
    items = examples(10, 30)
    learner = TeachLearner.fit(items, IN_DIM, HIDDEN)
    snapshot = learner.predictor()
    assert snapshot.weights.dtype == np.float32 and snapshot.projection.dtype == np.float32
    np.testing.assert_array_equal(
        snapshot.projection, random_projection(IN_DIM, HIDDEN, 0).astype(np.float32)
    )
    probe = unit_rows(np.random.default_rng(2), 8)
    before = snapshot.predict(probe)
    assert rel(before, learner.predict(probe)) < 1e-5
    learner.apply(removed=[items[0].id])  # the snapshot does not follow
    np.testing.assert_array_equal(snapshot.predict(probe), before)
    assert snapshot.labels == tuple(learner.labels)


def test_primal_statistics_give_the_same_weights():
    items = examples(11, 50)
    learner = TeachLearner.fit(items, IN_DIM, HIDDEN)
    gram, cross = learner.primal_statistics()
    phi = literal_phi([e.embedding for e in sorted(items, key=lambda e: e.id)], HIDDEN)
    assert rel(gram, phi.T @ phi) < 1e-12
    solved = np.linalg.solve(gram + RIDGE * np.eye(HIDDEN), cross)
    assert rel(learner.weights, solved) < 1e-9


def test_save_and_load(tmp_path):
    items = examples(12, 40)
    learner = TeachLearner.fit(items, IN_DIM, HIDDEN, seed=2)
    path = tmp_path / "teach.npz"
    learner.save(path, "a" * 16, ids_digest([e.id for e in items]))
    loaded = TeachLearner.load(path, "a" * 16)
    assert loaded.ids == learner.ids and loaded.labels == learner.labels
    assert loaded.seed == 2 and loaded.digest == learner.digest
    np.testing.assert_array_equal(loaded.weights, learner.weights)  # same computation, same bits
    with pytest.raises(StateError, match="another bundle"):
        TeachLearner.load(path, "b" * 16)
    with pytest.raises(ValueError):
        learner.save(path, "a" * 16, ids_digest([]))
    # a file whose W was changed is refused
    arrays = dict(np.load(path, allow_pickle=False))
    arrays["weights"] = arrays["weights"] * 1.01
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    with pytest.raises(StateError, match="inconsistent"):
        TeachLearner.load(path, "a" * 16)
    empty = TeachLearner(IN_DIM, 0)
    empty.save(tmp_path / "empty.npz", "a" * 16)
    assert TeachLearner.load(tmp_path / "empty.npz", "a" * 16).num_samples == 0


def test_peak_bytes_covers_the_arrays_held():
    items = examples(13, 64)
    learner = TeachLearner.fit(items, IN_DIM, HIDDEN)
    learner.loo_predictions()
    held = learner._phi.nbytes + learner._kernel.nbytes + learner.weights.nbytes
    held += learner.projection.nbytes + learner.embeddings.nbytes + learner._factor[0].nbytes
    budget = TeachLearner.peak_bytes(IN_DIM, HIDDEN, 64, len(learner.labels))
    assert held < budget
    assert TeachLearner.peak_bytes(IN_DIM, 4096, 2000, 10) > TeachLearner.peak_bytes(
        IN_DIM, 4096, 1000, 10
    )


def test_a_bad_embedding_changes_nothing():
    items = examples(14, 10)
    learner = TeachLearner.fit(items[:5], IN_DIM, HIDDEN)
    before = learner.weights.copy()
    wrong = Example(new_id(), "cat", "cam", "t", np.ones(IN_DIM + 1, np.float32))
    broken = Example(new_id(), "cat", "cam", "t", np.full(IN_DIM, np.nan, np.float32))
    for bad in (wrong, broken):
        with pytest.raises(RailError):
            learner.apply(added=[items[5], bad], removed=[items[0].id])
    assert learner.ids == sorted(e.id for e in items[:5])
    np.testing.assert_array_equal(learner.weights, before)
