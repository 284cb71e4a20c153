"""One worker per source: open it, read it on a newest-frame capture thread, reopen it.

A source that fails (cannot be opened, a camera unplugged, a stream that stops) is opened again
after 1, 2, 4 ... seconds (up to a maximum; back to the start once it delivers frames again),
reported in the log and the metrics, and never stops the other sources. A file or folder that
ends is opened again at once with ``loop``; without it the source counts as ended (state
"stopped"). Live sources drop stale frames (the consumer gets the newest); files and folders
hand over every frame at the consumer's pace.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from vlm_export.core.errors import shown
from vlm_export.runtime.io.capture import NewestFrame
from vlm_export.runtime.io.sources import Frame, Source, open_source
from vlm_export.runtime.serve.outputs.metrics import ServeMetrics

log = logging.getLogger(__name__)

POLL_S = 0.25

Opener = Callable[[str], Source]


class SourceWorker:
    """Keeps one source open and its newest frame ready for ``take``."""

    def __init__(
        self,
        name: str,
        spec: str,
        *,
        loop: bool,
        wake: Callable[[], None],
        metrics: ServeMetrics,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
        opener: Opener = open_source,
        opened: Source | None = None,
        failed: str | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.loop = loop
        self.description = opened.description if opened is not None else shown(spec)
        self.state = "starting"  # running | retrying | stopped
        self.last_error: str | None = None
        self.failures = 0
        self.reconnects = 0
        self.dropped = 0
        self.passes = 0  # times a file source was played to its end
        self.last_frame_at: float | None = None  # time.monotonic() of the last frame taken
        self._wake = wake
        self._metrics = metrics
        self._retry = (retry_initial_s, retry_max_s)
        self._opener = opener
        self._opened = opened
        self._capture: NewestFrame | None = None
        self._draining: NewestFrame | None = None  # a pass that ended, frames still waiting
        self._counted_drops = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name=f"vlm-src-{name}", daemon=True)
        if failed is not None:  # could not be opened at start (said there): retry after a wait
            self._failed(failed)

    def start(self) -> None:
        """Start opening and reading the source."""
        self._thread.start()

    def take(self) -> Frame | None:
        """The newest frame waiting, or None (the last frames of the previous pass first)."""
        with self._lock:
            draining, capture = self._draining, self._capture
        if draining is not None:
            frame = draining.take()
            if frame is not None:
                self.last_frame_at = time.monotonic()
                return frame
            with self._lock:
                if self._draining is draining:
                    self._draining = None
        if capture is None:
            return None
        frame = capture.take()
        if frame is not None:
            self.last_frame_at = time.monotonic()
            drops = capture.dropped - self._counted_drops
            if drops > 0:
                self._counted_drops = capture.dropped
                self.dropped += drops
                self._metrics.dropped.labels(source=self.name).inc(drops)
        return frame

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop reading and close the source."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._opened is not None:  # opened but never started
            self._opened.close()
            self._opened = None

    def _open(self) -> Source | None:
        source, self._opened = self._opened, None
        if source is not None:
            return source
        try:
            return self._opener(self.spec)
        except Exception as exc:  # noqa: BLE001 - any failure is retried, never fatal
            self._failed(f"cannot open: {exc}")
            return None

    def _failed(self, reason: str) -> None:
        self.failures += 1
        self.last_error = shown(reason)
        self.state = "retrying"
        self._metrics.failures.labels(source=self.name).inc()
        self._metrics.up.labels(source=self.name).set(0)

    def _supervise(self) -> None:
        delay = self._retry[0]
        try:
            if self.state == "retrying":
                self._stop.wait(delay)
                delay = min(delay * 2, self._retry[1])
            while not self._stop.is_set():
                source = self._open()
                if source is None:
                    log.warning(
                        "source %s: %s; retrying in %.0f s", self.name, self.last_error, delay
                    )
                    if self._stop.wait(delay):
                        break
                    delay = min(delay * 2, self._retry[1])
                    continue
                if self.state == "retrying":
                    self.reconnects += 1
                    self._metrics.reconnects.labels(source=self.name).inc()
                delivered, error = self._read(source)
                if self._stop.is_set():
                    break
                if error is None and delivered:
                    self.passes += 1
                    if self.loop:
                        continue  # replay a file or folder at once
                    self._drained()
                    self.state = "stopped"
                    self._metrics.up.labels(source=self.name).set(0)
                    log.warning("source %s ended (no --loop)", self.name)
                    break
                self._drained()
                if delivered:
                    delay = self._retry[0]  # it worked for a while: start the backoff again
                self._failed(str(error) if error else "delivered no frame")
                log.warning("source %s: %s; retrying in %.0f s", self.name, self.last_error, delay)
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self._retry[1])
        finally:
            if self.state != "stopped":
                self.state = "stopped"
                self._metrics.up.labels(source=self.name).set(0)

    def _read(self, source: Source) -> tuple[int, BaseException | None]:
        """Read ``source`` to its end (or a stop); return (frames delivered, its error)."""
        capture = NewestFrame(source, keep_all=not source.live, on_frame=self._wake)
        self.description = source.description
        with self._lock:
            self._capture, self._counted_drops = capture, 0
        self.state = "running"
        self.last_error = None
        self._metrics.up.labels(source=self.name).set(1)
        capture.start()
        try:
            while not capture.wait_read(POLL_S):
                if self._stop.is_set():
                    break
        finally:
            with self._lock:  # its last frames are still taken while the next pass opens
                self._capture, self._draining = None, capture
            capture.close()
        return capture.delivered, capture.error

    def _drained(self) -> None:
        """Wait until the consumer took the last frames of the pass that ended (or a stop)."""
        with self._lock:
            draining = self._draining
        while draining is not None and not draining.wait_finished(POLL_S):
            if self._stop.is_set():
                return
