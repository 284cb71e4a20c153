"""A RAIL learner state follows class names when the bundle's classes change, and learning goes on:
the reference is a learner that had the new label space all along, fed the same samples."""

from __future__ import annotations

import numpy as np
import pytest

from vlm_export.core.errors import StateError
from vlm_export.runtime.rail.dual import DualAdapter
from vlm_export.runtime.rail.primal import PrimalAdapter
from vlm_export.runtime.rail.relabel import follow_learner_labels

IN_DIM, HIDDEN = 16, 24
OLD = [("d", "cat"), ("d", "dog"), ("d", "bird"), ("d", "sea lion")]
NEW = [("d", "bird"), ("d", "fox"), ("d", "cat"), ("d", "owl"), ("d", "sea lion")]


def _batch(labels: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((len(labels), IN_DIM))
    return features / np.linalg.norm(features, axis=1, keepdims=True), np.array(labels)


def _indices(names: list[str], space: list[tuple[str, str]]) -> list[int]:
    return [space.index(("d", name)) for name in names]


@pytest.mark.parametrize("route", ["cholesky", "woodbury"])
def test_a_primal_learner_goes_on_as_one_that_had_the_new_classes_all_along(route) -> None:
    """'dog' is dropped after it was learned: its samples stay in G, its column goes. The
    reference learns the same samples over NEW plus dog; its NEW columns must be ours."""
    reference_space = [*NEW, ("d", "dog")]
    first = ["cat", "dog", "bird", "cat", "dog", "sea lion", "bird"]
    later = ["fox", "cat", "fox", "owl"]
    x1, _ = _batch([0] * len(first), seed=1)
    x2, _ = _batch([0] * len(later), seed=2)

    def learner(space):
        return PrimalAdapter(IN_DIM, len(space), hidden_dim=HIDDEN, ridge=0.5, route=route)

    ours, reference = learner(OLD), learner(reference_space)
    ours.partial_fit(x1, np.array(_indices(first, OLD)))
    ours.finalize()
    reference.partial_fit(x1, np.array(_indices(first, reference_space)))

    followed = follow_learner_labels(ours, OLD, NEW)
    assert followed.num_classes == len(NEW)
    assert followed.learned_mask.tolist() == [True, False, True, False, True]
    followed.partial_fit(x2, np.array(_indices(later, NEW)))
    reference.partial_fit(x2, np.array(_indices(later, reference_space)))
    followed.finalize()
    reference.finalize()

    np.testing.assert_allclose(followed.weights, reference.weights[:, : len(NEW)], atol=1e-10)
    assert followed.learned_mask.tolist() == reference.learned_mask[: len(NEW)].tolist()
    assert followed.num_samples == reference.num_samples == len(first) + len(later)
    probe, _ = _batch([0] * 5, seed=3)
    np.testing.assert_allclose(
        followed.predict(probe), reference.predict(probe)[:, : len(NEW)], atol=1e-10
    )


def test_a_dual_learner_is_renumbered_and_goes_on_exactly() -> None:
    """'dog' was never learned, so dropping it loses nothing: the learner equals one over NEW."""
    first = ["cat", "bird", "sea lion", "cat"]
    later = ["owl", "bird", "fox"]
    x1, _ = _batch([0] * len(first), seed=4)
    x2, _ = _batch([0] * len(later), seed=5)
    ours, reference = DualAdapter(IN_DIM, len(OLD)), DualAdapter(IN_DIM, len(NEW))
    ours.partial_fit(x1, np.array(_indices(first, OLD)))
    reference.partial_fit(x1, np.array(_indices(first, NEW)))

    followed = follow_learner_labels(ours, OLD, NEW)
    followed.partial_fit(x2, np.array(_indices(later, NEW)))
    reference.partial_fit(x2, np.array(_indices(later, NEW)))
    assert followed.labels.tolist() == reference.labels.tolist()
    assert followed.learned_mask.tolist() == reference.learned_mask.tolist()
    np.testing.assert_allclose(followed.coef, reference.coef, atol=1e-10)


def test_a_dual_learner_refuses_to_drop_a_learned_class_and_is_left_as_it_was() -> None:
    ours = DualAdapter(IN_DIM, len(OLD))
    features, _ = _batch([0, 0, 0], seed=6)
    ours.partial_fit(features, np.array(_indices(["cat", "dog", "bird"], OLD)))
    coef, labels = ours.coef.copy(), ours.labels.copy()
    with pytest.raises(StateError, match=r"learned classes the bundle no longer has \(dog\)"):
        follow_learner_labels(ours, OLD, NEW, "s.npz")
    np.testing.assert_array_equal(ours.coef, coef)
    np.testing.assert_array_equal(ours.labels, labels)
    with pytest.raises(StateError, match="records 3 labels for 4 classes"):
        follow_learner_labels(ours, OLD[:3], NEW, "s.npz")
