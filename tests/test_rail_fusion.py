"""RAIL-Fusion: gating by set membership of the zero-shot argmax, mixing with beta."""

import numpy as np
import pytest

from vlm_export.runtime.numerics import softmax
from vlm_export.runtime.rail import PrimalAdapter, RailError, RailFusion, fuse


def literal_fuse(logits, adapter, learned, beta):
    out = np.empty_like(logits)
    for i, row in enumerate(logits):
        p = np.exp(row - row.max())
        p /= p.sum()
        a = np.array([adapter[i, c] if c in learned else 0.0 for c in range(len(row))])
        out[i] = (1 - beta) * p + beta * a if int(np.argmax(p)) in learned else p
    return out


def test_gate_uses_set_membership_not_first_indices():
    # classes 1 and 3 are learned; class 0 (the first index) is not
    learned = {1, 3}
    mask = np.array([c in learned for c in range(5)])
    logits = np.array(
        [
            [1.0, 2.0, 0.0, 3.0, 0.5],  # argmax 3: learned -> fused
            [4.0, 1.0, 0.0, 2.0, 0.5],  # argmax 0: NOT learned -> zero-shot only
            [0.0, 0.0, 5.0, 1.0, 0.0],  # argmax 2: not learned -> zero-shot only
            [0.0, 3.0, 1.0, 0.0, 2.9],  # argmax 1: learned -> fused
        ]
    )
    adapter = np.array(
        [
            [9.0, 1.0, 9.0, 0.0, 9.0],  # large scores on unlearned classes must be ignored
            [0.0, 1.0, 0.0, 1.0, 0.0],
            [0.0, 1.0, 0.0, 1.0, 0.0],
            [0.0, -0.5, 0.0, 0.0, 0.0],
        ]
    )
    fused = fuse(logits, adapter, mask, beta=0.8)
    np.testing.assert_allclose(fused, literal_fuse(logits, adapter, learned, 0.8), atol=1e-15)
    np.testing.assert_array_equal(fused[1:3], softmax(logits[1:3]))
    # image 0: the adapter moves the decision from class 3 to class 1; unlearned columns scaled
    assert fused[0].argmax() == 1
    np.testing.assert_allclose(fused[0, [0, 2, 4]], 0.2 * softmax(logits[0])[[0, 2, 4]])
    # image 3: a negative adapter score on its zero-shot class hands the decision to class 4
    assert fused[3].argmax() == 4


def test_random_batch_single_image_and_beta_edges():
    rng = np.random.default_rng(0)
    logits = 100 * rng.uniform(-0.3, 0.3, size=(32, 11))
    adapter = rng.normal(size=(32, 11))
    mask = rng.random(11) < 0.5
    learned = set(np.flatnonzero(mask).tolist())
    for beta in (0.0, 0.3, 0.8, 1.0):
        expected = literal_fuse(logits, adapter, learned, beta)
        np.testing.assert_allclose(fuse(logits, adapter, mask, beta), expected, atol=1e-15)
    np.testing.assert_allclose(fuse(logits[5], adapter[5], mask), fuse(logits, adapter, mask)[5])
    np.testing.assert_array_equal(fuse(logits, adapter, np.zeros(11, bool)), softmax(logits))
    assert fuse(logits.astype(np.float32), adapter.astype(np.float32), mask).dtype == np.float32


def test_softmax_is_stable():
    probs = softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5, 0.0]])


@pytest.mark.parametrize(
    ("logits", "adapter", "mask", "beta", "message"),
    [
        (np.zeros((2, 3)), np.zeros((2, 4)), np.zeros(3, bool), 0.8, "both"),
        (np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(3), 0.8, "bool"),
        (np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(4, bool), 0.8, "bool"),
        (np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(3, bool), 1.5, "beta"),
    ],
)
def test_bad_fusion_input(logits, adapter, mask, beta, message):
    with pytest.raises(RailError, match=message):
        fuse(logits, adapter, mask, beta)


def test_pipeline_stage_fuses_one_frame():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 6))
    learner = PrimalAdapter(6, 4, hidden_dim=16, seed=0)
    learner.partial_fit(x, np.array([1, 3] * 15))
    predictor = learner.to_inference()
    logits = 100 * rng.uniform(-0.3, 0.3, size=4).astype(np.float32)
    stage = RailFusion(predictor, beta=0.8)
    expected = fuse(logits, predictor.predict(x[:1])[0], predictor.learned_mask, 0.8)
    np.testing.assert_array_equal(stage.fused_scores(logits, x[0].astype(np.float32)), expected)
