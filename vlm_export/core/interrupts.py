"""Ctrl-C that lands inside an import: noticed even when the import turns it into another error.

A SIGINT while a C extension initialises (NumPy, ONNX Runtime) raises KeyboardInterrupt inside
the extension's own import code, which often reports it as an ImportError ("bad install, please
reinstall"). ``ctrl_c_noticed`` records every Ctrl-C while it is active, so that the command can
say "interrupted" (exit 130) instead of passing on that misleading error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any


def interrupted(exc: BaseException) -> bool:
    """True when a KeyboardInterrupt is in the exception's chain (cause or context)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


@contextlib.contextmanager
def _raising(
    sig: int, exception: type[BaseException], takes_over: Callable[[Any], bool]
) -> Iterator[list[int]]:
    """While active, signal ``sig`` raises ``exception`` in the main thread (each one appended
    to the yielded list; none once ``work_written``), where ``takes_over(previous handler)``;
    the previous handler is put back afterwards unless someone replaced ours meanwhile."""
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if _WRITTEN.is_set():
            return
        received.append(signum)
        raise exception

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(sig) if main else None
    watching = main and takes_over(previous)
    if watching:
        signal.signal(sig, handler)
    try:
        yield received
    finally:
        if watching and signal.getsignal(sig) is handler:
            signal.signal(sig, previous)


def ctrl_c_noticed() -> contextlib.AbstractContextManager[list[int]]:
    """While active, each Ctrl-C is appended to the yielded list (and raised as usual).

    Only in the main thread and only while Python's default handler, or a launcher's quick
    exit (a handler marked ``quick_exit``, see ``vlm_export.runtime.launch``), is installed; it
    is put back afterwards. Other handlers (a command's own stop request) are left alone.
    """
    return _raising(
        signal.SIGINT,
        KeyboardInterrupt,
        lambda previous: (
            previous is signal.default_int_handler or getattr(previous, "quick_exit", False)
        ),
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt (``sigterm_interrupts``): cleanups run as for Ctrl-C."""


def sigterm_interrupts() -> contextlib.AbstractContextManager[list[int]]:
    """While active, SIGTERM raises ``Terminated`` in the main thread (each one is appended to
    the yielded list), so that temporary files and folders are removed as after a Ctrl-C
    (``timeout``, ``docker stop`` and systemd send SIGTERM). Only where SIGTERM has its default
    disposition; put back afterwards."""
    return _raising(signal.SIGTERM, Terminated, lambda previous: previous is signal.SIG_DFL)


#: set once a command's work is written (``work_written``): the handlers here then ignore
#: Ctrl-C and SIGTERM; cleared when ``exit_status_of`` starts a command
_WRITTEN = threading.Event()


def work_written() -> None:
    """From here on the Ctrl-C and SIGTERM handlers of this module ignore the signal: the work
    is done and in place, and an interrupt now would report it as not written."""
    _WRITTEN.set()


def exit_status_of(main: Callable[[], int], message: str) -> int:
    """Run a command's ``main``: its status, or ``message`` on stderr and 130 when Ctrl-C was
    pressed, even if an import turned the interrupt into another error. A standard stream the
    command was started without (``>&-``: Python's ``sys.stdout`` is None) writes to the null
    device, as if redirected there."""
    _WRITTEN.clear()
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115
    with ctrl_c_noticed() as pressed:
        try:
            return main()
        except (Exception, KeyboardInterrupt) as exc:
            if not (pressed or interrupted(exc)):
                raise
    print(message, file=sys.stderr)
    return 130


def exit_with(code: int) -> None:
    """Exit with ``code``. After a Ctrl-C (130) the streams are flushed and the process ends at
    once: a KeyboardInterrupt that went through a C extension's import (NumPy runs Python code
    from C) leaves Python's "unhandled Ctrl-C" flag set, and Python would then end itself by
    SIGINT (status -2) instead of the 130 the command reported."""
    if code != 130:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(130)
