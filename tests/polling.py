"""Waiting for a service's threads in tests: a hang fails with a name, never a timing check."""

from __future__ import annotations

import time
from collections.abc import Callable

#: generous: the machine is shared, and nothing asserts on how long a wait took
WAIT_S = 90.0


def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll ``check`` until true; fail naming ``what`` after ``timeout`` (a hang, not a speed)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
