"""What the service remembers of each source's frames: counters, rates, the live picture.

The scheduler records every decided frame here (``SourceStats.record``); the page and the API
read rates and percentiles from it, and ``LiveViews.frame`` hands out the newest frame drawn as
``vlm-edge run --save-annotated`` draws it, as JPEG, with its sequence number.
"""

from __future__ import annotations

import collections
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from vlm_export.core.errors import UserError
from vlm_export.runtime.draw.frame import FrameDrawer
from vlm_export.runtime.io.preprocess import image_from_array, load_image
from vlm_export.runtime.io.sources import Frame
from vlm_export.runtime.result import FrameResult

RECENT_FRAMES = 256  # per source, for latency percentiles
#: frame rates are measured over this many recent frames (a slow engine still shows its rate)
RATE_FRAMES = 16
#: a source with no frame for this long, and for twice its usual interval, shows 0 fps
STALL_S = 5.0
JPEG_QUALITY = 80
#: the live picture is drawn at least this wide: a small camera's frame is enlarged before the
#: banner is drawn, so the text stays sharp where the page shows it larger
LIVE_MIN_WIDTH = 640


@dataclass(frozen=True)
class LiveFrame:
    """One drawn frame of a source: its sequence number, the JPEG, what was decided for it."""

    seq: int
    jpeg: bytes
    result: FrameResult | None

    def headers(self) -> dict[str, str]:
        """HTTP headers that say which frame this is and its decision (ASCII: the class name is
        percent-encoded in ``X-Frame-Class``)."""
        from urllib.parse import quote

        headers = {"X-Frame-Seq": str(self.seq)}
        if self.result is not None:
            headers["X-Frame-Class"] = quote(self.result.class_name, safe=" ")
            headers["X-Frame-Score"] = f"{self.result.score:.6f}"
            headers["X-Frame-Time"] = self.result.time_utc
        return headers


@dataclass
class SourceStats:
    """What the scheduler recorded of one source's frames."""

    frames: int = 0
    errors: int = 0
    timings: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_FRAMES)
    )  # stage ms of the recent frames (percentiles)
    times: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=RATE_FRAMES)
    )  # time.monotonic() when each recent frame was decided (fps)
    last_record: dict[str, Any] | None = None
    last_at: float | None = None
    seq: int = 0
    view: tuple[Frame, FrameResult | None] | None = None
    jpeg: dict[bool, tuple[int, bytes]] = field(default_factory=dict)

    def fps(self, now: float | None = None) -> float:
        """Frames per second over the recent frames; 0 once the source has stalled."""
        times = list(self.times)
        if len(times) < 2:
            return 0.0
        interval = (times[-1] - times[0]) / (len(times) - 1)
        now = time.monotonic() if now is None else now
        if interval <= 0 or now - times[-1] > max(STALL_S, 2 * interval):
            return 0.0
        return 1.0 / interval

    def latency(self) -> dict[str, dict[str, float]]:
        """p50 and p95 in ms of each stage over the recent frames."""
        recent = list(self.timings)
        latency = {}
        for stage in dict.fromkeys(k for t in recent for k in t):
            values = np.array([t[stage] for t in recent if stage in t])
            latency[stage] = {
                "p50": round(float(np.percentile(values, 50)), 3),
                "p95": round(float(np.percentile(values, 95)), 3),
            }
        return latency


class LiveViews:
    """The newest frame of each source, drawn on demand and cached per sequence number."""

    def __init__(
        self,
        names: list[str],
        drawer: Callable[[bool], FrameDrawer],
    ) -> None:
        self.stats = {name: SourceStats() for name in names}
        self._drawer = drawer
        self._changed = threading.Condition()
        self._closed = False

    def show(self, name: str, frame: Frame, result: FrameResult | None) -> int:
        """Make ``frame`` the source's live picture; return its sequence number."""
        stats = self.stats[name]
        with self._changed:
            stats.seq += 1
            stats.view = (frame, result)
            stats.jpeg = {}
            self._changed.notify_all()
            return stats.seq

    def close(self) -> None:
        """Wake every waiting viewer (the service stops)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def live(self, name: str, after: int, timeout_s: float, fate: bool = False) -> LiveFrame | None:
        """The newest frame of ``name`` with a sequence number > ``after``, drawn as JPEG, with
        its decision (waits up to ``timeout_s``); None on timeout."""
        stats = self.stats[name]
        with self._changed:
            if not self._changed.wait_for(
                lambda: stats.seq > after or self._closed, timeout=max(0.0, timeout_s)
            ):
                return None
            if stats.view is None or stats.seq <= after:  # stopped meanwhile
                return None
            seq, view = stats.seq, stats.view
            cached = stats.jpeg.get(fate)
        if cached is None or cached[0] != seq:
            data = self._draw(view, fate, stats.fps())
            with self._changed:
                if stats.seq == seq:
                    stats.jpeg[fate] = (seq, data)
        else:
            data = cached[1]
        return LiveFrame(seq, data, view[1])

    def frame(
        self, name: str, after: int, timeout_s: float, fate: bool = False
    ) -> tuple[int, bytes] | None:
        """``live`` as (sequence number, JPEG)."""
        got = self.live(name, after, timeout_s, fate)
        return None if got is None else (got.seq, got.jpeg)

    def _draw(self, view: tuple[Frame, FrameResult | None], fate: bool, fps: float) -> bytes:
        frame, result = view
        picture = self._drawer(fate)(enlarged(frame_image(frame)), result, fps)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()


def enlarged(image: Image.Image, width: int = LIVE_MIN_WIDTH) -> Image.Image:
    """``image`` scaled up by a whole factor to at least ``width`` pixels wide (as it is when it
    is that wide already)."""
    factor = -(-width // max(1, image.width))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.BILINEAR)


def frame_image(frame: Frame) -> Image.Image:
    """A frame's picture as RGB (a grey placeholder when it cannot be read)."""
    try:
        if isinstance(frame.data, np.ndarray):
            image = image_from_array(frame.data, "BGR")
        else:
            image = load_image(frame.data)
    except UserError:
        image = Image.new("RGB", (320, 240), "gray")
    return image.convert("RGB")
