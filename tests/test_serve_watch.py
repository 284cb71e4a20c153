"""The collapse detector of a served source (vlm_export.runtime.serve.frames.watch), on its own."""

from __future__ import annotations

import numpy as np
import pytest

from vlm_export.runtime.serve.frames.watch import CollapseWatch, frame_fingerprint

WINDOW = 8


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _healthy(rng: np.random.Generator, index: int) -> tuple[np.ndarray, int, float, str]:
    """An embedding, decision and fingerprint of a changing picture on a working engine."""
    return (
        _unit(rng.standard_normal(16)),
        int(rng.integers(0, 3)),
        rng.uniform(0.3, 0.9),
        f"f{index}",
    )


def _feed(watch: CollapseWatch, frames) -> list[str]:
    return [r for r in (watch.observe(*frame) for frame in frames) if r is not None]


def test_varied_output_is_not_a_collapse() -> None:
    rng = np.random.default_rng(0)
    watch = CollapseWatch(window=WINDOW)
    assert _feed(watch, [_healthy(rng, i) for i in range(50)]) == []
    assert not watch.collapsed and watch.reason is None


def test_constant_embedding_while_the_picture_changes_is_a_collapse() -> None:
    """One reason when it starts (not one per frame), kept while it lasts."""
    constant = _unit(np.arange(1.0, 17.0))
    watch = CollapseWatch(window=WINDOW)
    frames = [(constant, 2, 0.41 + 0.01 * (i % 3), f"f{i}") for i in range(3 * WINDOW)]
    reasons = _feed(watch, frames)
    assert len(reasons) == 1 and "the same embedding" in reasons[0]
    assert "picture changed" in reasons[0] and watch.collapsed


def test_collapse_is_seen_after_exactly_one_window() -> None:
    constant = _unit(np.ones(16))
    watch = CollapseWatch(window=WINDOW)
    for index in range(WINDOW - 1):
        assert watch.observe(constant, 0, 0.5, f"f{index}") is None
    assert watch.observe(constant, 0, 0.5, "last") is not None


def test_same_decision_and_score_while_embeddings_jitter_is_a_collapse() -> None:
    rng = np.random.default_rng(1)
    base = _unit(rng.standard_normal(16))
    watch = CollapseWatch(window=WINDOW)
    frames = [(_unit(base + 1e-3 * rng.standard_normal(16)), 4, 0.73, f"f{i}") for i in range(20)]
    reasons = _feed(watch, frames)
    assert len(reasons) == 1 and "the same decision (label 4, score 0.730000)" in reasons[0]


def test_a_still_picture_is_never_a_collapse() -> None:
    """A parked camera gives the same output for good reason: the fingerprint does not change."""
    constant = _unit(np.ones(16))
    watch = CollapseWatch(window=WINDOW)
    assert _feed(watch, [(constant, 1, 0.6, "same") for _ in range(40)]) == []
    assert not watch.collapsed


def test_a_picture_that_changes_rarely_is_not_a_collapse() -> None:
    """Fewer changes than half the window (a clock in a corner ticking once): not enough."""
    constant = _unit(np.ones(16))
    watch = CollapseWatch(window=WINDOW)
    frames = [(constant, 1, 0.6, f"f{i // 4}") for i in range(40)]
    assert _feed(watch, frames) == []


def test_a_saturated_score_is_not_a_collapse() -> None:
    """A confident classifier gives exactly 1.0 to a steady scene; the embeddings still move."""
    rng = np.random.default_rng(2)
    base = _unit(rng.standard_normal(16))
    watch = CollapseWatch(window=WINDOW)
    frames = [(_unit(base + 1e-3 * rng.standard_normal(16)), 0, 1.0, f"f{i}") for i in range(30)]
    assert _feed(watch, frames) == []


def test_recovers_when_the_output_varies_again() -> None:
    rng = np.random.default_rng(3)
    constant = _unit(np.ones(16))
    watch = CollapseWatch(window=WINDOW)
    _feed(watch, [(constant, 0, 0.5, f"f{i}") for i in range(WINDOW)])
    assert watch.collapsed
    watch.observe(*_healthy(rng, 100))
    assert not watch.collapsed
    again = _feed(watch, [(constant, 0, 0.5, f"g{i}") for i in range(WINDOW)])
    assert len(again) == 1 and watch.collapsed  # a second collapse is reported again


def test_non_finite_embeddings_are_a_collapse() -> None:
    watch = CollapseWatch(window=WINDOW)
    reasons = _feed(watch, [(np.full(16, np.nan), 0, 0.5, f"f{i}") for i in range(WINDOW)])
    assert reasons and "non-finite" in reasons[0]


def test_window_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 3 frames"):
        CollapseWatch(window=2)


def test_fingerprints_tell_frames_apart() -> None:
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    b = a.copy()
    b[20, 20] += 1  # one sampled pixel (every 4th row and column) differs
    assert frame_fingerprint(a) == frame_fingerprint(a.copy())
    assert frame_fingerprint(a) != frame_fingerprint(b)
    assert frame_fingerprint(b"jpeg-1") != frame_fingerprint(b"jpeg-2")
    assert frame_fingerprint("a.jpg") != frame_fingerprint("b.jpg")
