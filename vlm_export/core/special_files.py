"""Outputs that are not regular files: devices and FIFOs are written through, the rest refused.

An output that names an existing character device (``/dev/null``, ``/dev/stdout``, a terminal)
or a FIFO is opened and written, never renamed over: that is what those files are for, and a
rename would put a regular file where the device node or pipe was. Anything else that exists and
is neither a regular file nor, for a folder output, a folder (a socket, a block device, a
symbolic link loop) is refused in one line before any work (``check_output``).

Opening a FIFO waits for its reader (a warning says so once). ``open_stream`` waits without
blocking in the kernel, so that SIGINT, SIGTERM or SIGHUP ends the wait: the signal goes on to
the handler the command had (its stop request learns of it) and the open raises (Ctrl-C:
KeyboardInterrupt; otherwise ``StoppedWaiting``, one line). A command whose own handler took a
stop signal before the wait calls ``request_stop`` so that the wait ends at once too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from vlm_export.core.errors import UserError, shown_path

log = logging.getLogger(__name__)
NEW, FILE, FOLDER, STREAM = "new", "file", "folder", "stream"
#: how often a FIFO without a reader is tried again
READER_POLL_S = 0.05
_STANDARD = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


_stop_requested = threading.Event()


def request_stop() -> None:
    """A command was asked to stop: a wait for a FIFO's reader, now or later, ends at once."""
    _stop_requested.set()


def clear_stop_request() -> None:
    """The command that asked to stop has ended (its signal handlers are put back)."""
    _stop_requested.clear()


class SpecialFileError(UserError):
    """An output that is neither a regular file, a folder, a device written through, nor new."""


class StoppedWaiting(UserError):
    """A stop signal came while waiting for a FIFO's reader: nothing was written to it."""


def own_descriptor(path: str | Path) -> int | None:
    """The open file descriptor of this process that ``path`` names (``/dev/stdout``,
    ``/dev/fd/1``, ``/proc/self/fd/1``), else None."""
    text = os.path.abspath(os.fspath(path))
    number = _STANDARD.get(text)
    if number is None:
        match = re.fullmatch(rf"/(?:proc/(?:self|thread-self|{os.getpid()})/fd|dev/fd)/(\d+)", text)
        number = int(match.group(1)) if match else None
    if number is None:
        return None
    try:
        os.fstat(number)
    except OSError:
        return None
    return number


def kind_of(path: str | Path) -> tuple[str, str]:
    """What ``path`` is, links followed: (``new``|``file``|``folder``|``stream``|``other``,
    words for it such as "a FIFO" or "a symbolic link loop"). A path that cannot be looked at
    (no such file, no permission) counts as new: creating it says what is wrong. A descriptor
    of this process (``/dev/stdout``) is a stream whatever it is open on: replacing the file
    it names would leave the command's own output in a deleted file."""
    if own_descriptor(path) is not None:
        return STREAM, "an open file descriptor"
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "other", "a symbolic link loop"
        return NEW, "a new name"
    if stat.S_ISREG(mode):
        return FILE, "a file"
    if stat.S_ISDIR(mode):
        return FOLDER, "a folder"
    if stat.S_ISCHR(mode):
        return STREAM, "a character device"
    if stat.S_ISFIFO(mode):
        return STREAM, "a FIFO"
    if stat.S_ISSOCK(mode):
        return "other", "a socket"
    if stat.S_ISBLK(mode):
        return "other", "a block device"
    return "other", "a special file"


def is_stream(path: str | Path) -> bool:
    """True when ``path`` is an existing character device or FIFO (written through)."""
    return kind_of(path)[0] == STREAM


def check_output(role: str | None, path: str | Path, folder: bool = False) -> None:
    """Refuse (SpecialFileError) an output that this write could not honour, before any work.

    A file output may be new, a regular file, a character device or a FIFO; a folder output
    (``folder``) new, a folder, or a file (the command says whether a file may stand there).
    """
    kind, words = kind_of(path)
    if kind in ((NEW, FILE, FOLDER) if folder else (NEW, FILE, STREAM)):
        return
    named = f"{role} {shown_path(path)}" if role else shown_path(path)
    wanted = "a folder" if folder else "a file (a character device or FIFO is written through)"
    raise SpecialFileError(f"{named} is {words}, not {wanted}: give another path")


def check_regular(role: str | None, path: str | Path) -> None:
    """Refuse a file that is read back and replaced (a state) unless it is new or regular."""
    kind, words = kind_of(path)
    if kind in (NEW, FILE):
        return
    named = f"{role} {shown_path(path)}" if role else shown_path(path)
    raise SpecialFileError(
        f"{named} is {words}, not a regular file: a state file is read back and replaced; "
        "give a file path"
    )


def open_stream(path: str | Path, mode: str = "wb", **options: Any) -> IO:
    """Open an existing character device or FIFO for writing (``mode`` ``w``/``a``, text or
    binary; ``options`` go to ``open``). A FIFO without a reader is waited for; a stop signal
    ends the wait (see the module's docstring). OSError when it cannot be opened."""
    own = own_descriptor(path)
    if own is not None:  # written where the descriptor stands, after what Python buffered
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        return os.fdopen(os.dup(own), mode.replace("x", "w"), **options)
    flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if "a" in mode:
        flags |= os.O_APPEND
    fd = _open_waiting(path, flags)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    try:
        return os.fdopen(fd, mode.replace("x", "w"), **options)
    except BaseException:
        os.close(fd)
        raise


def open_output(path: str | Path, mode: str, **options: Any) -> IO:
    """``open(path, mode, **options)`` for an output written in place (a log of lines), with a
    FIFO's reader waited for as ``open_stream`` does. OSError when it cannot be opened."""
    if is_stream(path):
        return open_stream(path, mode, **options)
    return open(path, mode, **options)  # noqa: SIM115 (the caller closes it)


def _open_waiting(path: str | Path, flags: int) -> int:
    told = False
    with _stop_signals_noted() as noted:
        while True:
            try:
                return os.open(path, flags)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: a FIFO that no one reads yet
                    raise
            if noted or _stop_requested.is_set():
                break
            if not told:
                log.warning(
                    "waiting for a reader of the FIFO %s (Ctrl-C to stop)", shown_path(path)
                )
                told = True
            time.sleep(READER_POLL_S)
    if not noted:
        raise StoppedWaiting(f"stopped before a reader of {shown_path(path)} came: nothing written")
    signum, previous = noted[0]
    if callable(previous):
        previous(signum, None)  # the command's own stop request; Python's Ctrl-C raises here
    name = signal.Signals(signum).name
    raise StoppedWaiting(f"stopped ({name}) while waiting for a reader of {shown_path(path)}")


@contextmanager
def _stop_signals_noted() -> Iterator[list[tuple[int, Callable | int | None]]]:
    """While active (main thread only), SIGINT, SIGTERM and SIGHUP (unless ignored) are noted in
    the yielded list with the handler they replaced, which is put back afterwards."""
    noted: list[tuple[int, Callable | int | None]] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return
    wanted = [signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)]
    previous = {sig: signal.getsignal(sig) for sig in wanted if sig is not None}
    previous = {sig: handler for sig, handler in previous.items() if handler is not signal.SIG_IGN}

    def note(signum: int, frame: Any) -> None:
        noted.append((signum, previous[signum]))

    for sig in previous:
        signal.signal(sig, note)
    try:
        yield noted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
