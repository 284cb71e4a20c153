"""The learning thread: changes to the taught examples wait here and are learned in batches.

A request takes a place in the queue before it stores anything (``slot``: 429 when none is
left, so nothing of a refused request is kept), queues its change, and waits until the batch
holding it is in the decisions. The thread takes everything that arrived meanwhile as one batch
and hands it to ``apply``; fleet changes are queued without waiting.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from vlm_export.core.errors import UserError, shown
from vlm_export.runtime.teach.examples import Example

log = logging.getLogger(__name__)

#: changes waiting for the learner; more is answered 429 (the HTTP app keeps threads of its pool
#: of 40 for other requests while teaches wait)
MAX_PENDING = 32
LEARN_WAIT_S = 30.0  # how long a request waits for its change to be learned


class Busy(UserError):
    """Too many changes wait for the learner (HTTP 429 with Retry-After)."""

    http_status = 429
    http_headers = {"Retry-After": "1"}


@dataclass
class Change:
    """One example added or removed, and what became of it."""

    added: Example | None = None
    removed: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    learned_ms: float = 0.0


class LearningQueue:
    """Changes in, batches out to ``apply(added, removed)`` on one thread."""

    def __init__(self, apply: Callable[[list[Example], list[str]], None]) -> None:
        self._apply = apply
        self._pending: collections.deque[Change] = collections.deque()
        self._reserved = 0  # places taken by requests that have not queued yet
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the learning thread."""
        self._thread = threading.Thread(target=self._loop, name="vlm-teach", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Learn what is queued, then stop the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(LEARN_WAIT_S)

    @property
    def pending(self) -> int:
        """Changes queued and not yet taken by the thread."""
        with self._wake:
            return len(self._pending)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """A place in the queue, taken before anything is stored (Busy when none is left) and
        handed back once the change is queued or has failed."""
        with self._wake:
            if len(self._pending) + self._reserved >= MAX_PENDING:
                raise Busy(f"{MAX_PENDING} examples wait to be learned: try again in a second")
            self._reserved += 1
        try:
            yield
        finally:
            with self._wake:
                self._reserved -= 1

    def put(self, change: Change) -> Change:
        """Hand ``change`` to the next batch."""
        with self._wake:
            self._pending.append(change)
            self._wake.notify_all()
        return change

    @staticmethod
    def wait(change: Change) -> None:
        """Wait until ``change`` is in the decisions (UserError when it failed or took long)."""
        if not change.done.wait(LEARN_WAIT_S):
            raise UserError("the change is stored but not learned yet (the learner is slow)")
        if change.error is not None:
            raise UserError(change.error)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._stopping:
                    self._wake.wait()
                if not self._pending and self._stopping:
                    return
                batch = list(self._pending)
                self._pending.clear()
            self._learn(batch)

    def _learn(self, batch: list[Change]) -> None:
        started = time.perf_counter()
        added = [c.added for c in batch if c.added is not None]
        removed = [c.removed for c in batch if c.removed is not None]
        try:
            self._apply(added, removed)
        except Exception as exc:  # noqa: BLE001 - one line to each waiting request
            log.error("teaching: a batch could not be learned: %s", shown(exc))
            for change in batch:
                change.error = f"not learned: {shown(exc)}"
        elapsed = (time.perf_counter() - started) * 1000.0
        for change in batch:
            change.learned_ms = elapsed
            change.done.set()
