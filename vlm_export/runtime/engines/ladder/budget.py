"""Choosing a ladder rung by measured latency, and switching rungs while running (no I/O).

``choose_rung`` picks the starting rung from the p90 latencies ``vlm-edge bench`` recorded: the
largest budget whose p90 meets the target, else the fastest rung. Latency against tokens is a
staircase, not a line (POMT, WACV 2025): a smaller budget can be as slow as a larger one, so only
the *efficient* rungs count, those faster than every larger budget (``efficient_rungs``); the
fastest is then the smallest budget among them. ``BudgetController`` moves along the efficient
rungs while running, with hysteresis:

- it decides only on a full window of frames run at the current rung (the window restarts after
  every switch, so each rung is judged on its own frames);
- step down (a smaller budget) when the window's p90 is above the target;
- step up (a larger budget) only when the window's p90, scaled by the recorded latency ratio of
  the larger rung to this one, is below ``target * (1 - margin)``: the larger rung is predicted
  to meet the target with room to spare. On a steady load the prediction for the rung it just
  left is that rung's own too-slow p90, so it does not step back up;
- if the ratio was wrong and a step up is followed by a step down again, the window needed before
  the next step up doubles (backoff), so even a wrong latency model switches O(log frames) times.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Choice:
    """A rung to run and why (one line for the user)."""

    index: int
    reason: str
    meets_target: bool


def efficient_rungs(p90_ms: Sequence[float]) -> list[int]:
    """Rungs (largest budget first) strictly faster than every larger budget; rung 0 always."""
    kept, best = [], float("inf")
    for index, p90 in enumerate(p90_ms):
        if p90 < best:
            kept.append(index)
            best = p90
    return kept


def choose_rung(p90_ms: Sequence[float], drop_rates: Sequence[float], target_ms: float) -> Choice:
    """The largest budget (lowest index) whose recorded p90 meets ``target_ms``, else the fastest
    (the smallest budget among the efficient rungs).

    ``p90_ms`` and ``drop_rates`` list the rungs largest budget first.
    """
    for index, p90 in enumerate(p90_ms):
        if p90 <= target_ms:
            reason = (
                f"rung {index} (drop rate {drop_rates[index]:g}) is the largest budget whose "
                f"p90 {p90:.1f} ms meets --target-ms {target_ms:g}"
            )
            if index > 0:
                reason += f" (rung {index - 1}: p90 {p90_ms[index - 1]:.1f} ms)"
            return Choice(index, reason, True)
    last = efficient_rungs(p90_ms)[-1]
    reason = (
        f"no rung meets --target-ms {target_ms:g}: running the smallest budget, rung {last} "
        f"(drop rate {drop_rates[last]:g}, p90 {p90_ms[last]:.1f} ms, the fastest)"
    )
    return Choice(last, reason, False)


class BudgetController:
    """Moves between rungs from the frame times it is shown (see the module docstring).

    ``recorded_p90`` per rung, largest budget first, gives the latency ratios between rungs and
    the efficient rungs it moves along (``start`` is one, as ``choose_rung`` picks);
    ``window`` frames at a rung make one decision; ``margin`` is the fraction below the target
    that a larger rung must be predicted to reach before stepping up.
    """

    def __init__(
        self,
        recorded_p90: Sequence[float],
        target_ms: float,
        start: int = 0,
        window: int = 30,
        margin: float = 0.1,
    ) -> None:
        if target_ms <= 0:
            raise ValueError("target must be positive")
        if window < 2:
            raise ValueError("window must be at least 2 frames")
        if any(p <= 0 for p in recorded_p90):
            raise ValueError("recorded latencies must be positive")
        self.recorded = [float(p) for p in recorded_p90]
        self.target = float(target_ms)
        self.margin = float(margin)
        self.base_window = window
        self.path = efficient_rungs(self.recorded)
        if start not in self.path:
            raise ValueError(f"rung {start} is slower than a larger budget: start on {self.path}")
        self.rung = start
        self.switches = 0
        self._frames: deque[float] = deque()
        self._up_window = window  # frames needed before a step up; doubles after a failed one
        self._stepped_up = False  # the last switch was a step up (judged by the next window)

    @property
    def window_p90(self) -> float | None:
        """The p90 of the last ``window`` frames at this rung (None before any)."""
        if not self._frames:
            return None
        return float(np.percentile(list(self._frames)[-self.base_window :], 90))

    def predicted_p90(self, rung: int) -> float | None:
        """The p90 of the frames kept at this rung, scaled to ``rung`` by the recorded ratio."""
        if not self._frames:
            return None
        p90 = float(np.percentile(self._frames, 90))
        return p90 * self.recorded[rung] / self.recorded[self.rung]

    def observe(self, frame_ms: float) -> int | None:
        """Add one frame time at the current rung; the new rung when it switches, else None."""
        self._frames.append(float(frame_ms))
        if len(self._frames) > self._up_window:
            self._frames.popleft()
        if len(self._frames) < self.base_window:
            return None
        p90 = self.window_p90
        step = self.path.index(self.rung)
        if p90 is not None and p90 > self.target and step < len(self.path) - 1:
            if self._stepped_up:  # the step up did not hold: wait longer before the next one
                self._up_window *= 2
            return self._switch(self.path[step + 1], stepped_up=False)
        if self._stepped_up:  # the larger rung held for a window: forgive one doubling
            self._stepped_up = False
            self._up_window = max(self.base_window, self._up_window // 2)
        if step > 0 and len(self._frames) >= self._up_window:
            larger = self.path[step - 1]
            predicted = self.predicted_p90(larger)
            if predicted is not None and predicted < self.target * (1.0 - self.margin):
                return self._switch(larger, stepped_up=True)
        return None

    def _switch(self, rung: int, stepped_up: bool) -> int:
        self.rung = rung
        self.switches += 1
        self._frames.clear()
        self._stepped_up = stepped_up
        return rung
