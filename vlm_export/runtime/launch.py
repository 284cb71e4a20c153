"""The ``vlm-edge`` console script, kept tiny.

Its first statements install a SIGINT handler, before anything heavy is imported: a Ctrl-C while
the command's modules load prints one line and exits 130 at once (nothing has been written yet),
never a traceback. ``main`` then takes Ctrl-C over as a KeyboardInterrupt, so a running command
cleans up (``run`` saves its state) before it exits 130.
"""

import os
import signal


def _interrupted_at_start(signum: int, frame: object) -> None:
    os.write(2, b"vlm-edge: interrupted\n")
    os._exit(130)


_interrupted_at_start.quick_exit = True  # type: ignore[attr-defined]  # see core/interrupts
if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # started ignoring it: keep that
    signal.signal(signal.SIGINT, _interrupted_at_start)

import contextlib  # noqa: E402 - after the handler on purpose

from vlm_export.core.interrupts import exit_with  # noqa: E402 - light: signal, threading


def entry() -> None:
    """Import and run ``vlm-edge``; exit with its status.

    The work is done when ``main`` returns, so stop signals that arrive while the process
    exits (a second SIGTERM, SIGHUP or Ctrl-C) are ignored: the status stays what the run
    reported, with no traceback from the exit.
    """
    from vlm_export.runtime.cli import main

    code = main()
    with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C just as main returned
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
    exit_with(code)
