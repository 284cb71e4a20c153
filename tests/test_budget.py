"""The rung choice and the adaptive budget controller on synthetic latency sequences (no timing)."""

from __future__ import annotations

import numpy as np
import pytest

from vlm_export.runtime.engines.ladder.budget import BudgetController, choose_rung, efficient_rungs

RATES = [0.0, 0.035, 0.06, 0.1]
RECORDED = [40.0, 34.0, 30.0, 24.0]  # p90 per rung, largest budget first


def test_choose_rung_takes_the_largest_budget_that_meets_the_target():
    choice = choose_rung(RECORDED, RATES, 32.0)
    assert choice.index == 2 and choice.meets_target
    assert "rung 2 (drop rate 0.06)" in choice.reason and "30.0 ms" in choice.reason
    assert "rung 1: p90 34.0 ms" in choice.reason
    assert choose_rung(RECORDED, RATES, 100.0).index == 0


def test_choose_rung_runs_the_smallest_when_no_rung_meets_the_target():
    choice = choose_rung(RECORDED, RATES, 10.0)
    assert choice.index == 3 and not choice.meets_target
    assert choice.reason.startswith("no rung meets --target-ms 10")


def test_slower_smaller_budgets_are_skipped():
    """A staircase: rung 2 is slower than rung 1 (a larger budget), so it is never run."""
    recorded = [40.0, 30.0, 33.0, 24.0]
    assert efficient_rungs(recorded) == [0, 1, 3]
    assert choose_rung(recorded, RATES, 31.0).index == 1
    assert choose_rung([40.0, 30.0, 33.0, 31.0], RATES, 5.0).index == 1, "the fastest"
    controller = BudgetController(recorded, target_ms=34.0, start=1, window=10, margin=0.05)
    with pytest.raises(ValueError, match="slower than a larger budget"):
        BudgetController(recorded, target_ms=32.0, start=2)
    load = [1.0] * 200 + [1.3] * 300 + [1.0] * 500
    rungs = _stream(controller, lambda rung, t: recorded[rung] * load[t], len(load))
    assert 2 not in rungs and 3 in rungs[200:500] and rungs[-1] == 1


def _stream(controller, latency_of, frames, seed=0, noise=0.03):
    """Feed the controller frame times latency_of(rung, t) * (1 + noise); the rung per frame."""
    rng = np.random.default_rng(seed)
    rungs = []
    for t in range(frames):
        rungs.append(controller.rung)
        ms = latency_of(controller.rung, t) * (1.0 + noise * rng.standard_normal())
        controller.observe(ms)
    return rungs


@pytest.mark.parametrize("load", [1.0, 1.1, 1.3, 1.6, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_steady_load_only_steps_down_and_never_oscillates(load, seed):
    """On a steady (noisy) load it only ever steps down: no step up follows a step down."""
    controller = BudgetController(RECORDED, target_ms=35.0, window=20)
    rungs = _stream(controller, lambda rung, t: RECORDED[rung] * load, 1200, seed)
    assert all(b >= a for a, b in zip(rungs, rungs[1:], strict=False)), "stepped back up"
    meets = [i for i, p in enumerate(RECORDED) if p * load <= 35.0]
    best = meets[0] if meets else len(RECORDED) - 1
    assert rungs[-1] in (best, min(best + 1, len(RECORDED) - 1)), "settled far from the target"
    assert controller.switches <= len(RECORDED) - 1


def test_load_step_steps_down_then_back_up():
    """A competing load doubles the frame times for a while: down while it lasts, up after."""
    controller = BudgetController(RECORDED, target_ms=45.0, window=20)

    def latency(rung, t):
        return RECORDED[rung] * (1.9 if 500 <= t < 1500 else 1.0)

    rungs = _stream(controller, latency, 2500)
    assert set(rungs[:500]) == {0}, "the unloaded start stays at the largest budget"
    assert rungs[1400] == 3, "under load it reaches the smallest budget (24 * 1.9 > 45 anyway)"
    assert rungs[-1] == 0, "after the load it is back at the largest budget"
    assert controller.switches <= 2 * (len(RECORDED) - 1)


def test_a_wrong_latency_model_switches_only_logarithmically():
    """Recorded ratios say rung 0 is barely slower; really it is far slower. Failed steps up
    double the wait before the next one, so the switches grow like log(frames)."""
    recorded = [25.0, 24.0, 23.0, 22.0]
    actual = [60.0, 30.0, 28.0, 26.0]
    controller = BudgetController(recorded, target_ms=40.0, window=10, margin=0.05)
    rungs = _stream(controller, lambda rung, t: actual[rung], 8000, noise=0.0)
    assert rungs[-1] == 1
    ups = sum(1 for a, b in zip(rungs, rungs[1:], strict=False) if b < a)
    assert 1 <= ups <= 12, f"{ups} failed steps up in 8000 frames"


def test_controller_validates_its_settings():
    with pytest.raises(ValueError):
        BudgetController(RECORDED, target_ms=0.0)
    with pytest.raises(ValueError):
        BudgetController(RECORDED, target_ms=10.0, window=1)
    controller = BudgetController(RECORDED, target_ms=35.0, start=2, window=4)
    assert controller.window_p90 is None and controller.predicted_p90(1) is None
    for _ in range(3):
        assert controller.observe(30.0) is None, "no decision before a full window"
    assert controller.predicted_p90(1) == pytest.approx(30.0 * 34.0 / 30.0)
