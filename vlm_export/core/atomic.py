"""Atomic file and folder writes: readers see the old content or the new, never a partial one.

Every write goes to a temporary file (or folder) beside its target, named
``.{target name}.vlm-tmp-XXXXXXXX``, which is fsynced and renamed over the target. A symbolic link
is written through: the link's final target is replaced, the link stays a link. A write killed
half-way (kill -9, power loss) leaves the target as it was plus such a temporary file; the next
successful write of the same target removes its own leftovers (``stale_temps``: only names of that
pattern, older than the write, that no live run holds), and ``report_interrupted_first_save``
names the ones left by a first save that never finished (no target yet). A run holds its
temporary file or folder with an exclusive ``flock`` (``claim``) while it works: a concurrent
write of the same target never removes it, however long it has not changed.

A target that is a character device or a FIFO (``/dev/null``, a pipe a reader waits on) is
written through instead, never renamed over (see ``vlm_export.core.special_files``); a socket,
a block device or a symbolic link loop is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from vlm_export.core.errors import UserError, shown_path
from vlm_export.core.special_files import STREAM, check_output, kind_of, open_stream

TEMP_MARK = ".vlm-tmp-"
#: output for a character device or FIFO held in memory before it spills to a temporary file
SPOOL_BYTES = 16 << 20
#: mkstemp's random part: 8 of ``[a-z0-9_]``
_RANDOM = r"[a-z0-9_]{8}"
#: the signals that stop a command as an interrupt (Ctrl-C; SIGTERM, see core.interrupts)
_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, which would race with other threads.
_UMASK = _read_umask()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class WriteError(UserError):
    """A file or folder cannot be written where the user asked (permissions, a file in the way)."""


def final_target(path: str | Path) -> Path:
    """The path a write of ``path`` replaces: symbolic links (also in folders) followed."""
    return Path(os.path.realpath(os.path.abspath(path)))


def temp_prefix(target: Path) -> str:
    """The name prefix of the temporary files and folders written for ``target``."""
    return f".{target.name}{TEMP_MARK}"


def claim(path: Path) -> int:
    """Hold an exclusive flock on ``path`` (this run's temporary file or folder) while the
    returned descriptor stays open: ``stale_temps`` never counts it as a leftover."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_claimed(path: Path) -> bool:
    """True while a run (this one too) holds ``path`` with ``claim``; opening never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def stale_temps(target: str | Path, before: float | None = None) -> list[Path]:
    """Leftover temporary files and folders of ``target`` (last changed before ``before``);
    one that a live run holds (``claim``) is in use, never a leftover.

    Matches only ``.{name}.vlm-tmp-XXXXXXXX`` and the older ``.{name}.XXXXXXXX.tmp`` names.
    """
    target = Path(target)
    pattern = re.compile(
        rf"^\.{re.escape(target.name)}(?:{re.escape(TEMP_MARK)}{_RANDOM}|\.{_RANDOM}\.tmp)$"
    )
    found = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    for entry in entries:
        if not pattern.match(entry.name):
            continue
        with contextlib.suppress(OSError):
            old = before is None or entry.stat(follow_symlinks=False).st_mtime < before
            if old and not is_claimed(Path(entry.path)):
                found.append(Path(entry.path))
    return sorted(found)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def remove_stale_temps(target: str | Path, before: float) -> list[Path]:
    """Remove ``target``'s leftovers older than ``before`` (a write in progress is newer, or
    held by its run)."""
    stale = stale_temps(target, before)
    for path in stale:
        _remove(path)
    return stale


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _format_size(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def report_interrupted_first_save(path: str | Path) -> str | None:
    """When ``path`` does not exist but temporary files of a save to it do, remove them and
    return one line saying so (a first save was killed: nothing was saved); else None."""
    target = final_target(path)
    if target.exists():
        return None
    stale = stale_temps(target, before=time.time())
    if not stale:
        return None
    sizes = _format_size(sum(_size(p) for p in stale))
    names = ", ".join(p.name for p in stale[:3]) + (" ..." if len(stale) > 3 else "")
    for stale_path in stale:
        _remove(stale_path)
    return (
        f"an interrupted save left {names} ({sizes}) and no {path}: nothing was saved there; "
        "removed the leftovers, starting fresh"
    )


def check_can_create(path: str | Path, folder: bool = False) -> None:
    """Raise WriteError unless ``path`` could be created or replaced, before any work is done.

    The first existing ancestor must be a writable folder; a file ``path`` must not be a folder.
    A character device or FIFO (written through) must be writable; a socket, a block device or
    a link loop is refused (``special_files.check_output``).
    """
    shown = Path(path)
    if not folder and kind_of(path)[0] == STREAM:
        if not os.access(path, os.W_OK):
            raise WriteError(f"cannot write {shown}: no write permission")
        return
    path = final_target(path)
    if not folder and os.path.isdir(path):
        raise WriteError(f"{shown} is a folder, not a file")
    check_output(None, shown, folder)
    ancestor = path.parent
    while not os.path.exists(ancestor):  # False also where a folder above may not be searched
        ancestor = ancestor.parent
    if not os.path.isdir(ancestor):
        raise WriteError(f"cannot create {shown}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise WriteError(f"cannot create {shown}: no write permission in {ancestor}")
    _check_name_length(path, ancestor, shown)


def _check_name_length(target: Path, folder: Path, shown: Path) -> None:
    """WriteError when the temporary name beside ``target`` (``temp_prefix`` + 8) is longer than
    the file system of ``folder`` (its first existing ancestor) takes: the name could be written
    directly, but not atomically."""
    try:
        most = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return
    length = len(os.fsencode(target.name))
    extra = len(os.fsencode(temp_prefix(target))) + 8 - length
    if length + extra > most:
        raise WriteError(
            f"cannot write {shown_path(shown)}: its name is {length} bytes, and a name written "
            f"safely (beside a temporary copy) may have at most {most - extra} on this file "
            "system: give a shorter name"
        )


def _mode_for(target: Path, default: int) -> int:
    """Keep the permission bits of the file being replaced; a new file gets ``default``."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return default


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``.

    A symbolic link ``path`` is written through (its target is replaced). On an exception the
    temporary file is removed and ``path`` keeps its previous content; an OSError (no
    permission, disk full, a file in the way) becomes a one-line WriteError. After a successful
    write, leftovers of earlier interrupted writes of the same target are removed. A character
    device or FIFO is opened and written instead (a FIFO waits for its reader).
    """
    shown = Path(path)
    kind, words = kind_of(path)
    if kind == STREAM:
        with _written_through(path, mode) as handle:
            yield handle
        return
    if kind == "other":
        raise WriteError(f"cannot write {shown}: it is {words}, not a file")
    target = final_target(path)
    started = time.time()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(target), dir=target.parent)
    except OSError as exc:
        raise WriteError(f"cannot write {shown}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, mode) as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # held until closed: see claim
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _mode_for(target, 0o666 & ~_UMASK))  # mkstemp makes it private
        os.replace(tmp_name, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write {shown}: {exc.strerror or exc}") from None
        raise
    remove_stale_temps(target, before=started)


@contextlib.contextmanager
def _written_through(path: str | Path, mode: str) -> Iterator:
    """Collect the output in a spooled temporary file (seekable, as a zip archive needs), then
    copy it whole into ``path`` (a character device or FIFO): nothing reaches it when the block
    fails, and a FIFO is opened only once the output is ready. OSError becomes WriteError."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, mode="w+b") as spool:
        if "b" in mode:
            yield spool
        else:
            text = io.TextIOWrapper(spool, encoding="utf-8", newline="")
            yield text
            text.flush()
            text.detach()
        spool.seek(0)
        try:
            with open_stream(path, "wb") as handle:
                shutil.copyfileobj(spool, handle)
        except OSError as exc:
            raise WriteError(f"cannot write {Path(path)}: {exc.strerror or exc}") from None


class PublishedLog:
    """A text log of lines (``vlm-edge run --out``) that replaces ``path`` once it is worth it.

    The lines go to a temporary file beside ``path``; ``publish`` renames it over ``path`` and
    the log is written on in place from then on (readers may follow it as it grows). Closed
    without ``publish`` (a run that failed, or was stopped, before its first decision), an
    existing file stays as it was; where there was none, the lines written (error records) are
    put in place, and nothing when there are none. A symbolic link is written through; an
    existing file's permission bits are kept; the folder must exist (OSError otherwise).
    Line-buffered UTF-8; the other file methods are the handle's.
    """

    def __init__(self, path: str | Path) -> None:
        self._target = final_target(path)
        fd, self._tmp = tempfile.mkstemp(prefix=temp_prefix(self._target), dir=self._target.parent)
        os.chmod(self._tmp, _mode_for(self._target, 0o666 & ~_UMASK))  # mkstemp: private
        self._handle = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a log between lines is no leftover: see claim
        self.published = False
        self._written = False
        self._started = time.time()

    def write(self, text: str) -> int:
        """Write ``text`` (to the temporary file until published)."""
        self._written = self._written or bool(text)
        return self._handle.write(text)

    def publish(self) -> None:
        """Put the log in place of ``path`` (once; what it holds so far is flushed first)."""
        if not self.published:
            self._handle.flush()
            os.replace(self._tmp, self._target)
            self.published = True
            remove_stale_temps(self._target, before=self._started)  # of runs killed earlier

    def close(self) -> None:
        """Close; unpublished, put what was written where no file stands, else remove it."""
        if not self.published and self._written and not os.path.lexists(self._target):
            with contextlib.suppress(OSError):  # a write error is reported by the writer
                self.publish()
        try:
            self._handle.close()
        finally:
            if not self.published:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._tmp)

    def __getattr__(self, name: str) -> object:
        return getattr(self._handle, name)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path, "wb") as handle:
        handle.write(data)


def _handle(handler: object, signum: int, frame: FrameType | None) -> None:
    """Do what ``handler`` (a signal's previous disposition) does with the signal."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while the block runs, then handle them as they would have been:
    a block of renames is done whole or not at all. Python runs signal handlers in the main
    thread only, between its bytecodes; in another thread the block simply runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in _INTERRUPTS}
    held: list[tuple[int, FrameType | None]] = []
    over = False

    def defer(signum: int, frame: FrameType | None) -> None:
        if over:  # arrived while the handlers were being put back
            _handle(previous[signum], signum, frame)
        else:
            held.append((signum, frame))

    try:
        for sig, handler in previous.items():
            if handler is not None:  # None: not set from Python, left alone
                signal.signal(sig, defer)
        yield
    finally:
        over = True
        for sig, handler in previous.items():
            if signal.getsignal(sig) is defer:
                signal.signal(sig, handler)
        for signum, frame in held:
            _handle(previous[signum], signum, frame)


def _swap_in(tmp: Path, target: Path, overwrite: bool, shown: str | Path) -> None:
    """Rename the folder ``tmp`` to ``target``. An existing ``target`` (only with ``overwrite``)
    is moved aside first and removed after; on an exception at either rename it is put back,
    or, where the new folder already stands, removed all the same."""
    if not target.exists():
        os.replace(tmp, target)
        return
    if not overwrite:
        raise FileExistsError(
            f"{shown} was written (by another run?) while this one worked; nothing was "
            "replaced (pass --overwrite to replace it)"
        )
    old = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    try:
        os.replace(target, old)  # an empty folder: replaced by the old bundle
        os.replace(tmp, target)
    except BaseException:
        if not target.exists():
            os.replace(old, target)
        shutil.rmtree(old, ignore_errors=True)  # empty, or the old folder the new one replaced
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(
    path: str | Path, overwrite: bool = False, placed: Callable[[], None] | None = None
) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` that becomes ``path`` only if the block succeeds.

    With ``overwrite`` an existing ``path`` is replaced (after the new folder is complete; the
    caller decides whether it may be: see export.bundle.writer.check_output_folder); otherwise
    the caller must have checked that ``path`` does not exist. A symbolic link is written through.
    ``placed()`` is called once the new folder stands at ``path``. Ctrl-C and SIGTERM wait while
    the folders are swapped and ``placed()`` runs: ``path`` holds the old folder or the new one,
    whole, and nothing is left parked beside it.
    """
    target = final_target(path)
    started = time.time()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    held: int | None = None
    try:
        held = claim(tmp)  # another run's clean-up leaves it alone
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private; the bundle is an ordinary folder
        yield tmp
        with _interrupts_deferred():  # the old folder or the new one, whole, stands at target
            _swap_in(tmp, target, overwrite, path)
            if placed is not None:
                placed()
        _fsync_dir(target.parent)
    except BaseException as exc:
        vanished = not tmp.is_dir()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and vanished:
            raise WriteError(
                f"cannot write {path}: its temporary folder {tmp.name} was removed while this "
                "run worked (by another run writing it?); nothing was written"
            ) from None
        raise
    finally:
        if held is not None:
            os.close(held)
    remove_stale_temps(target, before=started)
