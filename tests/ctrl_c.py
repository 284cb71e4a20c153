"""Ctrl-C as a terminal delivers it, whatever SIGINT disposition the test run inherited.

A job started in the background (``pytest &``, ``nohup`` in a script) starts with SIGINT ignored,
and every child inherits that; the launchers keep an ignored SIGINT ignored, as a background job
should. A test that sends SIGINT sets the disposition it assumes: ``default_sigint`` in a child,
``python_sigint`` (the conftest fixture ``ctrl_c``) in the test's own process.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


def default_sigint() -> None:
    """``preexec_fn`` of a child that is sent SIGINT: Ctrl-C's default action, so that Python
    installs its KeyboardInterrupt handler and the launchers theirs."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def python_sigint() -> Iterator[None]:
    """In this process: Python's KeyboardInterrupt handler inside the block, the inherited
    disposition after it."""
    inherited = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, inherited)
