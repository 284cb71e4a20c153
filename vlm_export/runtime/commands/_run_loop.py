"""The frame loop of ``vlm-edge run``: each frame through the pipeline to the writer, the window and
the annotated output, with a progress line on stderr, and stop requests (signals) honoured between
frames.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from vlm_export.core import live_line
from vlm_export.core.errors import UserError
from vlm_export.runtime.commands import status, stop_signals
from vlm_export.runtime.commands._annotated import AnnotatedOutput
from vlm_export.runtime.commands._run_output import Writer, same_terminal, stdout_lost
from vlm_export.runtime.engines.ladder.ladder import BudgetRun
from vlm_export.runtime.io.display import Window
from vlm_export.runtime.io.sources import Source
from vlm_export.runtime.pipeline import Pipeline, process_frame
from vlm_export.runtime.result import FrameResult

STAGES = ("preprocess", "engine", "reservoir", "correction", "fusion", "total")
PROGRESS_INTERVAL_S = 0.25


class StopRequest:
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP ask the frame loop to stop between frames.

    Stopping only between frames keeps the adaptation state whole (a signal in the middle of a
    reservoir update would save a half-written entry). A second Ctrl-C stops at once, without
    saving: the last periodic save stays. The first request decides the exit status (Ctrl-C
    then SIGTERM still exits 130).
    """

    def __init__(self) -> None:
        self.ending: str | None = None
        self.code = 0
        self.forced = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.ending is not None and signum == signal.SIGINT:
            self.forced = True
            raise KeyboardInterrupt
        if self.ending is not None:
            return
        if signum == signal.SIGINT:
            self.ending, self.code = "interrupted (Ctrl-C)", 130
        else:
            self.ending, self.code = f"stopped ({signal.Signals(signum).name})", 0


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[None]:
    """While active, SIGINT, SIGTERM and SIGHUP (unless ignored: nohup) go to ``stop`` (main
    thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in stop_signals()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class RunStats:
    """Frame and error counts, per-stage time sums, and a stderr progress line."""

    def __init__(self, total: int | None, progress: bool) -> None:
        self.total = total
        self.progress = progress
        self.frames = 0
        self.errors = 0
        self.sums: dict[str, float] = {}
        self.start = time.perf_counter()
        self._last_shown = 0.0

    def add(self, result: FrameResult | None) -> None:
        """Count one frame (None: it failed)."""
        self.frames += 1
        if result is None:
            self.errors += 1
        else:
            for stage, ms in result.timings.items():
                self.sums[stage] = self.sums.get(stage, 0.0) + ms
        self._show(result)

    def fps(self) -> float:
        """Frames per second since the start, over everything (source, pipeline, output)."""
        elapsed = time.perf_counter() - self.start
        return self.frames / elapsed if elapsed > 0 else 0.0

    def clear(self) -> None:
        """Erase the progress line (before a line on the same terminal); the next frame redraws."""
        live_line.end()

    def _show(self, result: FrameResult | None) -> None:
        now = time.perf_counter()
        if not self.progress or (
            live_line.shown() and now - self._last_shown < PROGRESS_INTERVAL_S
        ):
            return
        self._last_shown = now
        count = f"{self.frames}/{self.total}" if self.total else f"{self.frames}"
        errors = f", {self.errors} errors" if self.errors else ""
        last = f"  {result.class_name}" if result else ""
        live_line.draw(f"{count} frames, {self.fps():.1f} fps{errors}{last}")

    def summary(self) -> list[str]:
        """The closing lines: counts, speed and mean time per stage (the last progress line
        stays on the screen above them)."""
        live_line.finish()
        elapsed = time.perf_counter() - self.start
        errors = f", {self.errors} unreadable" if self.errors else ""
        lines = [f"{self.frames} frames{errors} in {elapsed:.2f} s: {self.fps():.1f} frames/s"]
        good = self.frames - self.errors
        if good:
            means = [f"{s} {self.sums[s] / good:.2f}" for s in STAGES if s in self.sums]
            lines.append("mean ms per frame: " + ", ".join(means))
        return lines


def process_all(
    pipeline: Pipeline,
    source: Source,
    out: Writer,
    stats: RunStats,
    args: argparse.Namespace,
    stop: StopRequest,
    window: Window | None,
    annotated: AnnotatedOutput | None = None,
    budget: BudgetRun | None = None,
) -> None:
    """The frame loop; it ends with the source, --max-frames, or a stop request."""
    shared_terminal = same_terminal(sys.stdout, sys.stderr) and args.out is None
    for frame in source:
        result, record = process_frame(pipeline, frame)
        if shared_terminal:
            stats.clear()  # the progress line never lands inside an output line
        try:
            out.write(record, result)
        except BrokenPipeError:
            raise  # the reader went away: cli.main ends quietly with status 141
        except OSError as exc:
            if args.out is None:
                stdout_lost()
            where = args.out or "standard output"
            raise UserError(f"cannot write {where}: {exc.strerror}") from None
        stats.add(result)
        switched = budget.after_frame(result.timings["total"]) if budget and result else None
        if switched:
            stats.clear()
            status(switched)
        if window is not None and not window.show(frame, result):
            stop.ending = "stopped (window closed)"
        if annotated is not None:
            annotated.add(frame, result, stats.fps())
        good = stats.frames - stats.errors
        if args.state and args.save_every and result and good % args.save_every == 0:
            pipeline.save_state(args.state)
        if stop.ending or (args.max_frames and stats.frames >= args.max_frames):
            break
