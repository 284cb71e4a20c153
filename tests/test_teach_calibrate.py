"""--min-score auto on synthetic clusters: the threshold rejects the target share of held-out
unknown-like frames, and its numbers equal a literal recomputation (refits without each example,
fusion written out)."""

from __future__ import annotations

import numpy as np
import pytest

from vlm_export.runtime.rail.primal import RIDGE
from vlm_export.runtime.teach.calibrate import calibrate
from vlm_export.runtime.teach.examples import UNKNOWN, Example, new_id
from vlm_export.runtime.teach.fusion import TeachFusion
from vlm_export.runtime.teach.learner import TeachLearner

DIM, HIDDEN = 512, 1024
CLASSES = [("site", "cat"), ("site", "dog"), ("site", "truck")]


def unit(rows):
    rows = np.asarray(rows, np.float64)
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    text = unit(rng.standard_normal((3, DIM)))
    centers = {name: unit(0.7 * text[i] + 0.7 * unit(rng.standard_normal(DIM)))
               for i, (_, name) in enumerate(CLASSES)}  # fmt: skip
    # things of no interest that zero-shot takes for a cat or a truck
    strangers = [unit(0.6 * text[i] + 0.8 * unit(rng.standard_normal(DIM))) for i in (0, 2)]

    def draw(center, count, spread=0.03):
        return unit(center + spread * rng.standard_normal((count, DIM)))

    taught = [
        Example(new_id(), name, "cam", "t", vector)
        for name, center in centers.items()
        for vector in draw(center, 12)
    ]
    taught += [
        Example(new_id(), UNKNOWN, "cam", "t", vector)
        for center in strangers
        for vector in draw(center, 15)
    ]
    held_out = np.concatenate([draw(center, 100) for center in strangers])
    return text, taught, held_out


def literal_numbers(taught, text, reject, beta=0.8, gate=0.5):
    """Threshold and shares by literal refits without each example (sample-space LU solves)."""
    items = sorted(taught, key=lambda e: e.id)
    bound = 1 / np.sqrt(DIM)
    projection = np.random.default_rng(0).uniform(-bound, bound, (DIM, HIDDEN))
    x = np.array([e.embedding for e in items], np.float64)
    phi = np.maximum(x @ projection, 0)
    tops, right = [], []
    for i, example in enumerate(items):
        rest = [j for j in range(len(items)) if j != i]
        columns = sorted({items[j].label for j in rest})
        y = np.array([[float(items[j].label == c) for c in columns] for j in rest])
        kernel = phi[rest] @ phi[rest].T + RIDGE * np.eye(len(rest))
        outputs = (phi[i] @ phi[rest].T) @ np.linalg.solve(kernel, y)
        logits = 100.0 * x[i] @ text.T.astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        a = np.array([outputs[columns.index(n)] if n in columns else 0.0 for _, n in CLASSES])
        learned = [n in columns for _, n in CLASSES]
        watched = [outputs[columns.index(n)] for n in columns if n in ("cat", "dog", "truck")]
        watched += [outputs[columns.index(UNKNOWN)]] if UNKNOWN in columns else []
        if learned[int(np.argmax(p))] or max(watched) >= gate:
            scores = (1 - beta) * p + beta * np.where(learned, a, 0.0)
        else:
            scores = p
        tops.append(scores.max())
        right.append(CLASSES[int(np.argmax(scores))][1] == example.label)
    tops, right = np.array(tops), np.array(right)
    unknown = np.array([e.label == UNKNOWN for e in items])
    candidates = sorted(np.nextafter(tops[unknown], np.inf))
    threshold = next(t for t in candidates if (tops[unknown] < t).mean() >= reject)
    kept = (right & (tops >= threshold) & ~unknown).sum() / (~unknown).sum()
    return threshold, (tops[unknown] < threshold).mean(), kept


@pytest.mark.parametrize("reject", [0.9, 0.75])
def test_numbers_equal_a_literal_recomputation(world, reject):
    text, taught, _ = world
    learner = TeachLearner.fit(taught, DIM, HIDDEN)
    chosen = calibrate(learner, CLASSES, text, fallback=0.3, reject=reject)
    threshold, rejected, kept = literal_numbers(taught, text, reject)
    assert chosen.threshold == pytest.approx(threshold, rel=1e-6)
    assert chosen.rejected_unknown == rejected and chosen.kept_known == pytest.approx(kept)
    assert chosen.rejected_unknown >= reject
    assert (chosen.n_unknown, chosen.n_known) == (30, 36)
    assert f"{round(rejected * 30)}/30 unknown" in chosen.describe()
    assert "\n" not in chosen.describe()


def test_rejects_held_out_unknown_like_frames_and_keeps_the_known(world):
    text, taught, held_out = world
    learner = TeachLearner.fit(taught, DIM, HIDDEN)
    chosen = calibrate(learner, CLASSES, text, fallback=None, reject=0.9)
    fusion = TeachFusion(learner.predictor(), CLASSES)
    tops = [fusion.fused_scores(100 * frame @ text.T, frame).max() for frame in held_out]
    # the threshold is the 27th of 30 leave-one-out scores: a new frame of the same kind falls
    # below it with probability 27/31 = 0.87 (an order statistic), here measured on 200 frames
    assert np.mean(np.array(tops) < chosen.threshold) >= 0.8
    assert chosen.kept_known >= 0.9


def test_without_unknown_examples_the_fallback_stays(world):
    text, taught, _ = world
    learner = TeachLearner.fit([e for e in taught if e.label != UNKNOWN], DIM, HIDDEN)
    chosen = calibrate(learner, CLASSES, text, fallback=0.25)
    assert chosen.threshold == 0.25 and chosen.n_unknown == 0
    assert "no unknown examples" in chosen.describe()


def test_only_unknown_examples_say_no_known_ones(world):
    text, taught, _ = world
    learner = TeachLearner.fit([e for e in taught if e.label == UNKNOWN], DIM, HIDDEN)
    chosen = calibrate(learner, CLASSES, text, fallback=None, reject=0.9)
    assert chosen.n_known == 0 and chosen.kept_known == 0.0
    assert "no known" in chosen.describe() and "0/0" not in chosen.describe()
