"""What each source keeps of its last frames, so a label lands on exactly the frame a person saw.

For each decided frame, under its sequence number: the engine's embedding (as that source's lane
computed it) and a small strided copy of the picture (or the path of a file frame), from which a
thumbnail is made only when the frame is taught.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlm_export.core.errors import UserError, shown
from vlm_export.runtime.io.sources import Frame
from vlm_export.runtime.result import FrameResult
from vlm_export.runtime.serve.frames.views import frame_image
from vlm_export.runtime.teach.examples import thumbnail_jpeg

RECENT_FRAMES = 64  # per source: the frames a label can still land on, by sequence number
THUMB_STEP_SIDE = 192  # the kept copy of a frame is about this wide (a strided view: no resize)


class NotFound(UserError):
    """A frame or example that does not exist (HTTP 404)."""

    http_status = 404


class Gone(UserError):
    """A frame's sequence number that has left the buffer (HTTP 410)."""

    http_status = 410


@dataclass(frozen=True)
class RecentFrame:
    """One decided frame as kept: its number, its embedding, a small copy of its picture."""

    seq: int
    embedding: np.ndarray
    picture: Any  # a strided BGR array, or the frame's path

    def thumbnail(self) -> bytes | None:
        """The frame's thumbnail JPEG (None if its file went away meanwhile)."""
        try:
            image = frame_image(Frame(0, "", self.picture, 0.0))
        except Exception:  # noqa: BLE001 - a frame file gone meanwhile: no thumbnail
            return None
        return thumbnail_jpeg(image)


class RecentFrames:
    """The last RECENT_FRAMES decided frames of each source (thread-safe)."""

    def __init__(self, sources: list[str]) -> None:
        self._frames = {name: collections.deque(maxlen=RECENT_FRAMES) for name in sources}
        self._lock = threading.Lock()

    def on_frame(self, source: str, seq: int, frame: Frame, result: FrameResult | None) -> None:
        """Keep a decided frame (the scheduler's listener; a failed frame is not kept)."""
        if result is None or result.embedding is None:
            return
        picture = frame.data
        if isinstance(picture, np.ndarray) and picture.ndim == 3:
            step = max(1, max(picture.shape[:2]) // THUMB_STEP_SIDE)
            picture = np.ascontiguousarray(picture[::step, ::step])
        kept = RecentFrame(seq, np.asarray(result.embedding, np.float32).copy(), picture)
        with self._lock:
            self._frames[source].append(kept)

    def find(self, source: str, seq: int) -> RecentFrame:
        """Frame ``seq`` of ``source``; NotFound if not decided yet, Gone if no longer kept."""
        with self._lock:
            frames = self._frames[source]
            found = next((f for f in frames if f.seq == seq), None)
            oldest = frames[0].seq if frames else None
            newest = frames[-1].seq if frames else 0
        if found is not None:
            return found
        if seq > newest:
            raise NotFound(f"{shown(source)} has decided no frame {seq} yet (newest: {newest})")
        held = "no frame kept" if oldest is None else f"frames {oldest} and later"
        raise Gone(
            f"frame {seq} of {shown(source)} has left the buffer (it keeps the last "
            f"{RECENT_FRAMES}: {held}); pick the frame again"
        )

    def kept(self, source: str) -> list[RecentFrame]:
        """The frames ``source`` keeps now, oldest first."""
        with self._lock:
            return list(self._frames[source])
