"""Library messages go to stdlib ``logging`` under the ``vlm_export`` logger hierarchy.

Every runtime module logs to ``logging.getLogger(__name__)``, so an embedding program routes or
silences them all at once (``logging.getLogger("vlm_export").setLevel(logging.ERROR)``). With no
logging configured at all, Python's last-resort handler still prints warnings on stderr. The
command-line tools install :func:`one_line_messages` instead: one ``PROG: WARNING: ...`` line each.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from vlm_export.core import live_line
from vlm_export.runtime.terminal import printable

ROOT_LOGGER = "vlm_export"


class OneLineHandler(logging.Handler):
    """``PROG: WARNING: message`` (or ``PROG: error: ...``) on the current ``sys.stderr``, one
    line: control characters in the message (a name from a file or a client) are escaped."""

    def __init__(self, prog: str) -> None:
        super().__init__(logging.WARNING)
        self.prog = prog

    def emit(self, record: logging.LogRecord) -> None:
        kind = "WARNING" if record.levelno < logging.ERROR else "error"
        try:
            live_line.end()  # a progress line showing: this line starts a line of its own
            message = printable(record.getMessage())  # one line: control characters escaped
            print(f"{self.prog}: {kind}: {message}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


@contextmanager
def one_line_messages(prog: str) -> Iterator[None]:
    """While active, warnings of the ``vlm_export`` loggers print as one line each on stderr."""
    logger = logging.getLogger(ROOT_LOGGER)
    handler = OneLineHandler(prog)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # not twice when the host program has configured logging too
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
