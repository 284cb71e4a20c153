"""The ``vlm-export`` console script, kept tiny.

Its first statements install a SIGINT handler, before torch or anything heavy is imported: a
Ctrl-C while the command's modules load prints one line and exits 130 at once (nothing has been
written yet), never a traceback. ``main`` then takes Ctrl-C over as a KeyboardInterrupt.
"""

import os
import signal


def _interrupted_at_start(signum: int, frame: object) -> None:
    os.write(2, b"vlm-export: interrupted; nothing was written\n")
    os._exit(130)


_interrupted_at_start.quick_exit = True  # type: ignore[attr-defined]  # see core/interrupts
if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # started ignoring it: keep that
    signal.signal(signal.SIGINT, _interrupted_at_start)

from vlm_export.core.interrupts import exit_with  # noqa: E402 - after the handler on purpose


def entry() -> None:
    """Import and run ``vlm-export``; exit with its status."""
    from vlm_export.export.cli import main

    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is done: the status stays
    exit_with(code)
