"""A closed standard output (``COMMAND | head``): end quietly with the shell's status for it."""

from __future__ import annotations

import os
import sys

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as the shell reports a command killed by a closed pipe


def stdout_to_devnull() -> None:
    """Point file descriptor 1 at the null device: later flushes of sys.stdout go nowhere, so
    the interpreter's last flush cannot print a BrokenPipeError traceback."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced or closed stdout (tests, embedding)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
