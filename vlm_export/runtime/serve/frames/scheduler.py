"""The scheduler: one thread serves the sources in turn, one frame each per round, on one engine.

Each source's worker (``workers.SourceWorker``) keeps its newest frame ready; the scheduler takes
it, runs the source's lane under the engine lock, then tells everyone who listens: the statistics
and live picture (``views``), the metrics, the events, and the frame listeners (teaching keeps
each source's recent embeddings). The engines are batch 1, so sources are always served in turn.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from vlm_export.runtime.engines.ladder.ladder import BudgetRun
from vlm_export.runtime.io.sources import Frame
from vlm_export.runtime.pipeline import process_frame, utc_now
from vlm_export.runtime.result import FrameResult
from vlm_export.runtime.serve.frames.lanes import Lanes
from vlm_export.runtime.serve.frames.views import LiveViews
from vlm_export.runtime.serve.frames.workers import SourceWorker
from vlm_export.runtime.serve.outputs.events import Events
from vlm_export.runtime.serve.outputs.metrics import ServeMetrics

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.2

#: called after each decided frame: (source, sequence number, frame, result or None)
FrameListener = Callable[[str, int, Frame, FrameResult | None], None]


class Scheduler:
    """Serves ``workers`` in turn on ``lanes`` until stopped."""

    def __init__(
        self,
        workers: dict[str, SourceWorker],
        lanes: Lanes,
        views: LiveViews,
        metrics: ServeMetrics,
        events: Events,
        max_fps: float | None,
    ) -> None:
        self.workers = workers
        self.lanes = lanes
        self.views = views
        self.metrics = metrics
        self.events = events
        self.budget: BudgetRun | None = None
        self.listeners: list[FrameListener] = []
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self._period = 1.0 / max_fps if max_fps else 0.0

    def run(self) -> None:
        """Serve the sources in turn, one frame each per round, until ``stopping`` is set."""
        order = [name for name in self.workers if name in self.lanes.by_source]
        due = dict.fromkeys(order, 0.0)
        period = self._period
        while not self.stopping.is_set():
            served = False
            now = time.monotonic()
            for name in order:
                if period and now < due[name]:
                    continue
                frame = self.workers[name].take()
                if frame is None:
                    continue
                # on time (or late by less than a period): keep the cadence; later than that
                # (the first frame too): a whole period from now, never two frames at once
                due[name] = now + period if now - due[name] > period else due[name] + period
                self.serve(name, frame)
                served = True
                if self.stopping.is_set():
                    return
            if not served:
                wait = IDLE_WAIT_S
                if period and due:
                    wait = min(wait, max(0.001, min(due.values()) - time.monotonic()))
                self.wake.wait(wait)
                self.wake.clear()

    def serve(self, name: str, frame: Frame) -> None:
        """Decide one frame of source ``name`` and tell the listeners."""
        stats = self.views.stats[name]
        frame = Frame(stats.frames, frame.source, frame.data, frame.timestamp_ms)
        with self.lanes.lock:
            self.lanes.install_offer()  # what teaching learned since the last frame
            pipeline = self.lanes.use(self.lanes.by_source[name])
            result, record = process_frame(pipeline, frame)
            if self.budget is not None and result is not None:  # one budget for every source
                switched = self.budget.after_frame(result.timings["total"])
                if switched:
                    log.info("budget: %s", switched)
        record = {"time_utc": utc_now(), **record, "input": record["source"], "source": name}
        now = time.monotonic()
        stats.frames += 1
        stats.last_at = now
        stats.times.append(now)
        self.metrics.frames.labels(source=name).inc()
        if result is None:
            stats.errors += 1
            self.metrics.errors.labels(source=name).inc()
        else:
            stats.timings.append(result.timings)
            stats.last_record = record
            for stage, ms in result.timings.items():
                self.metrics.latency.labels(source=name, stage=stage).observe(ms / 1000.0)
            self.events.decision(name, record)
        seq = self.views.show(name, frame, result)
        for listener in self.listeners:
            listener(name, seq, frame, result)
