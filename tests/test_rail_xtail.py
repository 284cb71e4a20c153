"""X-TAIL metrics on hand-made tables, and the protocol filling the whole table."""

import numpy as np
import pytest

from vlm_export.runtime.rail import PrimalAdapter, RailError, fuse, run_xtail, xtail_metrics


def literal_metrics(acc):
    steps = len(acc)
    transfer = [sum(acc[t][j] for t in range(j)) / j for j in range(1, steps)]
    average = [sum(acc[t][j] for t in range(steps)) / steps for j in range(steps)]
    return {
        "transfer": sum(transfer) / len(transfer),
        "average": sum(average) / steps,
        "last": sum(acc[-1]) / steps,
    }


def test_hand_made_table_counts_a_genuine_zero():
    acc = np.array([[0.9, 0.0, 0.5], [0.8, 0.7, 0.4], [0.6, 0.5, 0.3]])
    metrics = xtail_metrics(acc)
    # Transfer: j=2 -> acc[0,1] = 0.0; j=3 -> (0.5 + 0.4) / 2 = 0.45; mean 0.225 (0.45 if masked)
    assert metrics["transfer"] == pytest.approx(0.225)
    assert metrics["average"] == pytest.approx((0.7667 + 0.4 + 0.4) / 3, abs=1e-4)
    assert metrics["last"] == pytest.approx(1.4 / 3)


def test_random_tables_match_literal_loops():
    rng = np.random.default_rng(0)
    for steps in (2, 5, 10):
        acc = rng.random((steps, steps))
        got, expected = xtail_metrics(acc), literal_metrics(acc.tolist())
        for key in expected:
            assert got[key] == pytest.approx(expected[key], abs=1e-14)


def test_single_step_has_no_transfer():
    assert xtail_metrics(np.array([[0.4]])) == {"transfer": None, "average": 0.4, "last": 0.4}


def test_unfilled_or_misshapen_tables_are_refused():
    acc = np.full((3, 3), 0.5)
    acc[0, 2] = np.nan
    with pytest.raises(RailError, match="NaN"):
        xtail_metrics(acc)
    with pytest.raises(RailError, match="square"):
        xtail_metrics(np.zeros((2, 3)))


def test_protocol_fills_the_table_and_keeps_zero_shot_on_unseen_domains():
    rng = np.random.default_rng(1)
    domains, per_domain, dim = 3, 4, 8
    classes = domains * per_domain
    centres = rng.normal(size=(classes, dim))

    def split(count):
        sets = []
        for d in range(domains):
            labels = rng.integers(d * per_domain, (d + 1) * per_domain, count)
            x = centres[labels] + 0.5 * rng.normal(size=(count, dim))
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            # zero-shot logits that only ever point inside the image's own domain
            logits = np.full((count, classes), -50.0)
            own = slice(d * per_domain, (d + 1) * per_domain)
            logits[:, own] = 3 * rng.normal(size=(count, per_domain))
            sets.append((x, labels, logits))
        return sets

    train = [(x, y) for x, y, _ in split(20)]
    test = [(x, logits, y) for x, y, logits in split(30)]
    zero_shot = run_xtail(train, test)
    np.testing.assert_array_equal(zero_shot, np.tile(zero_shot[0], (domains, 1)))
    learner = PrimalAdapter(dim, classes, hidden_dim=32, seed=0)
    table = run_xtail(train, test, learner)
    assert not np.isnan(table).any()
    future = np.triu_indices(domains, k=1)
    np.testing.assert_array_equal(table[future], zero_shot[future])
    x, logits, y = test[0]
    scores = fuse(logits, learner.predict(x), learner.learned_mask)
    assert table[-1, 0] == np.mean(scores.argmax(1) == y)
