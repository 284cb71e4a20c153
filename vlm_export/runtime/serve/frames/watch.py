"""Watch a source's engine output for collapse: the same output whatever the picture shows.

An engine can fail without an error: one bad runtime setting and every image gives the same
embedding, so every frame gets the same decision. A source's :class:`CollapseWatch` sees each
frame's embedding, decision and a fingerprint of the frame, and calls it a collapse when, over
the last ``window`` frames, the picture changed (the fingerprint differs in at least half of the
consecutive pairs) while

- the embeddings stayed the same (no dimension moved more than ``embedding_tolerance``), or
- every frame got the same decision with the same score (within ``score_tolerance``), a score
  that is not saturated (a confident classifier can give exactly 1.0 to a steady scene).

A still picture never counts: a parked camera gives the same output for good reason. The collapse
ends when a window shows different outputs again. Pure numpy; not thread-safe (one per source).
"""

from __future__ import annotations

import collections
import hashlib
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: frames a verdict looks at (3 s at 10 frames/s)
DEFAULT_WINDOW = 30
#: largest change of any embedding dimension over the window that still counts as "the same"
#: (float32 rounding of a unit vector is ~1e-8; a camera's sensor noise moves it by ~1e-4)
EMBEDDING_TOLERANCE = 1e-6
#: scores within this of each other count as the same score
SCORE_TOLERANCE = 1e-6
#: a score this close to 0 or 1 is saturated: equal scores then say nothing about the engine
SATURATED = 1e-5


def frame_fingerprint(data: Any) -> str:
    """A short digest of a frame (an array, encoded bytes, or a file name) to see it change."""
    if isinstance(data, np.ndarray):
        sample = np.ascontiguousarray(data[::4, ::4]) if data.ndim >= 2 else data
        return hashlib.blake2b(sample.tobytes(), digest_size=8).hexdigest()
    if isinstance(data, bytes | bytearray | memoryview):
        return hashlib.blake2b(bytes(data), digest_size=8).hexdigest()
    return str(data)


class CollapseWatch:
    """One source's collapse detector; see the module docstring."""

    def __init__(
        self,
        window: int = DEFAULT_WINDOW,
        embedding_tolerance: float = EMBEDDING_TOLERANCE,
        score_tolerance: float = SCORE_TOLERANCE,
    ) -> None:
        if window < 3:
            raise ValueError(f"a collapse window needs at least 3 frames, not {window}")
        self.window = window
        self.embedding_tolerance = embedding_tolerance
        self.score_tolerance = score_tolerance
        self._frames: collections.deque[tuple[np.ndarray, int, float, str]] = collections.deque(
            maxlen=window
        )
        self._reason: str | None = None

    @property
    def collapsed(self) -> bool:
        """True from the frame a collapse was seen until a window shows varied output again."""
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        """Why the source counts as collapsed (None while it does not)."""
        return self._reason

    def observe(
        self, embedding: np.ndarray, label: int, score: float, frame_fingerprint: str
    ) -> str | None:
        """Take one frame's output; return the reason when a collapse starts with it, else None."""
        vector = np.asarray(embedding, dtype=np.float64).reshape(-1)
        self._frames.append((vector, int(label), float(score), str(frame_fingerprint)))
        if len(self._frames) < self.window:
            return None
        same = self._same_output()
        if same is None:
            self._reason = None
            return None
        changes = self._picture_changes()
        if self.collapsed or changes < (self.window - 1) / 2:
            return None
        self._reason = f"{same} over the last {self.window} frames while the picture changed"
        return self._reason

    def _picture_changes(self) -> int:
        prints = [frame[3] for frame in self._frames]
        return sum(a != b for a, b in zip(prints, prints[1:], strict=False))

    def _same_output(self) -> str | None:
        """What stayed the same over the window (None: the output varied)."""
        vectors = np.stack([frame[0] for frame in self._frames])
        if not np.all(np.isfinite(vectors)):
            return "non-finite embeddings"
        moved = float(np.max(np.ptp(vectors, axis=0))) if vectors.size else 0.0
        if moved <= self.embedding_tolerance:
            return f"the same embedding (no dimension moved more than {moved:.1e})"
        labels = {frame[1] for frame in self._frames}
        scores = np.array([frame[2] for frame in self._frames])
        steady = float(np.ptp(scores)) <= self.score_tolerance
        saturated = scores[0] <= SATURATED or scores[0] >= 1.0 - SATURATED
        if len(labels) == 1 and steady and not saturated:
            return f"the same decision (label {labels.pop()}, score {scores[0]:.6f})"
        return None


class SourceWatches:
    """A :class:`CollapseWatch` per source, wired to the service: a warning line, the metrics
    ``source_collapsed`` / ``source_collapses_total`` and a ``collapsed`` or ``recovered`` event.

    ``on_frame(source, seq, frame, result)`` takes each decided frame (a scheduler frame
    listener); ``reasons()`` is read by ``/healthz`` and ``/v1/sources``.
    """

    def __init__(self, names: list[str], metrics: Any, events: Any) -> None:
        self.watches = {name: CollapseWatch() for name in names}
        self.metrics = metrics
        self.events = events

    def on_frame(self, name: str, seq: int, frame: Any, result: Any) -> None:
        """Feed one decided frame (``result`` None, or without an embedding, is skipped)."""
        watch = self.watches.get(name)
        if watch is None or result is None or result.embedding is None:
            return
        was = watch.collapsed
        fingerprint = frame_fingerprint(frame.data)
        reason = watch.observe(result.embedding, result.label, result.score, fingerprint)
        if reason is not None:
            log.warning("source %s: engine output collapsed: %s", name, reason)
            self.metrics.collapsed.labels(source=name).set(1)
            self.metrics.collapses.labels(source=name).inc()
            self.events.alert(name, "collapsed", reason)
        elif was and not watch.collapsed:
            log.warning("source %s: engine output varies again", name)
            self.metrics.collapsed.labels(source=name).set(0)
            self.events.alert(name, "recovered")

    def reason(self, name: str) -> str | None:
        """Why ``name`` counts as collapsed, None while it does not."""
        watch = self.watches.get(name)
        return None if watch is None else watch.reason

    def reasons(self) -> dict[str, str]:
        """The collapsed sources, with the reason."""
        return {name: w.reason for name, w in self.watches.items() if w.reason is not None}
