"""Read a live source on its own thread and hand the consumer the newest frame only.

A camera delivers frames whether or not anyone reads them. Read in the classification loop, a
camera slower to drain than to fill queues its frames (in OpenCV's buffer, or the driver's),
and the label comes later and later after the picture. Here a thread reads continuously into a
one-frame slot; the consumer takes the newest frame when it is ready for one, and the frames
overwritten in between are dropped and counted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from vlm_export.runtime.io.sources import Frame, Source

JOIN_TIMEOUT_S = 5.0


class NewestFrame(Source):
    """Iterate ``source`` through a capture thread: each step yields the newest frame read.

    ``dropped`` counts the frames that were replaced before the consumer took them. The
    source's end (or its error, such as a camera that stops) reaches the consumer after the
    last frame. ``close`` stops the thread, then closes the source.

    ``keep_all`` makes the thread keep every frame instead of replacing it (files: every frame,
    at the consumer's pace), one frame read ahead so that the consumer does not wait for the
    thread. ``on_frame`` is called after each frame put in the slot (a consumer serving several
    sources wakes on it and polls with ``take``).
    """

    def __init__(
        self,
        source: Source,
        *,
        keep_all: bool = False,
        on_frame: Callable[[], None] | None = None,
    ) -> None:
        self.source = source
        self.description = source.description
        self.live = source.live
        self.dropped = 0
        self.delivered = 0
        self._keep_all = keep_all
        self._on_frame = on_frame
        self._slot: Frame | None = None
        self._ahead: Frame | None = None  # keep_all: the frame after the slot's
        self._done = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start reading (done by the first iteration if not before)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._read, name="vlm-capture", daemon=True)
            self._thread.start()

    def _read(self) -> None:
        try:
            for frame in self.source:
                with self._changed:
                    if self._keep_all:
                        self._changed.wait_for(lambda: self._ahead is None or self._stop.is_set())
                        if self._slot is None:
                            self._slot = frame
                        else:
                            self._ahead = frame
                    else:
                        if self._slot is not None:
                            self.dropped += 1
                        self._slot = frame
                    self.delivered += 1
                    self._changed.notify_all()
                if self._on_frame is not None:
                    self._on_frame()
                if self._stop.is_set():
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer's thread
            self._error = exc
        finally:
            with self._changed:
                self._done = True
                self._changed.notify_all()
            if self._on_frame is not None:
                self._on_frame()

    def take(self) -> Frame | None:
        """The newest frame if one waits (it leaves the slot), else None; never blocks."""
        with self._changed:
            frame, self._slot, self._ahead = self._slot, self._ahead, None
            if frame is not None:
                self._changed.notify_all()
            return frame

    def wait_read(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the source to end (frames may still wait in the slot)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._done, timeout)

    def wait_finished(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the source to end and its last frame to be taken."""
        with self._changed:
            return self._changed.wait_for(lambda: self._done and self._slot is None, timeout)

    @property
    def error(self) -> BaseException | None:
        """What ended the source (None: it ended normally, or has not ended)."""
        return self._error

    def __iter__(self) -> Iterator[Frame]:
        self.start()
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._slot is not None or self._done)
                frame, self._slot, self._ahead = self._slot, self._ahead, None
                self._changed.notify_all()
                if frame is None:  # ended, nothing left
                    if self._error is not None:
                        raise self._error
                    return
            yield frame

    def close(self) -> None:
        """Stop the capture thread (after its current read), then close the source."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()  # a thread waiting for the slot to be taken
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
        self.source.close()
