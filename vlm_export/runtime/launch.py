"""The ``vlm-edge`` console script, kept tiny: a Ctrl-C while the command's modules are still
being imported is caught here (one line, exit 130), not shown as a traceback."""

from __future__ import annotations

import contextlib
import signal
import sys


def entry() -> None:
    """Import and run ``vlm-edge``; exit with its status.

    The work is done when ``main`` returns, so stop signals that arrive while the process
    exits (a second SIGTERM, SIGHUP or Ctrl-C) are ignored: the status stays what the run
    reported, with no traceback from the exit.
    """
    try:
        from vlm_export.runtime.cli import main
    except KeyboardInterrupt:
        print("vlm-edge: interrupted", file=sys.stderr)
        sys.exit(130)
    code = main()
    with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C just as main returned
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
    sys.exit(code)
