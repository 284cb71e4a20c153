"""Command-line pieces shared by ``vlm-edge learn``, ``eval`` and ``merge`` (not a command)."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from vlm_export.core.atomic import final_target
from vlm_export.core.errors import UserError
from vlm_export.runtime.rail.models import LearnerOptions
from vlm_export.runtime.rail.primal import ROUTES


def add_shots_argument(parser: argparse.ArgumentParser, zero: str) -> None:
    """``--shots N``: training images per class, the first N by file name."""
    parser.add_argument(
        "--shots",
        type=int,
        default=16,
        metavar="N",
        help=f"training images per class: the first N by file name (default 16; 0: {zero})",
    )


def add_primal_arguments(parser: argparse.ArgumentParser) -> None:
    """The primal learner's options (defaults: the bundle's adaptation.rail.primal)."""
    group = parser.add_argument_group("primal RAIL (default: the bundle's adaptation.rail)")
    group.add_argument("--route", choices=ROUTES, help="cholesky (default; mergeable) or woodbury")
    group.add_argument("--hidden-dim", type=int, metavar="N", help="random hidden layer width d_h")
    group.add_argument("--seed", type=int, help="seed of the random hidden layer")


def learner_options(args: argparse.Namespace, form: str | None) -> LearnerOptions:
    """The learner options given on the command line."""
    return LearnerOptions(form, args.hidden_dim, args.seed, args.route)


def show_progress(args: argparse.Namespace) -> bool:
    """A progress line on stderr: only on a terminal and without --quiet."""
    return not args.quiet and sys.stderr.isatty()


def check_shots(shots: int) -> None:
    """--shots is a count (0: every image)."""
    if shots < 0:
        raise UserError(f"--shots must be 0 or more, got {shots}")


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when two paths name the same file: the same path after links, or two names of one
    existing file (hard links, bind mounts). Existing or not; a link loop is no error."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


#: what tells one version of a file from another: (device, inode, mtime in ns, size)
FileIdentity = tuple[int, int, int, int]


def file_identity(path: str | Path) -> FileIdentity | None:
    """The identity of the file at ``path`` (links followed), None when there is none: a file
    replaced (an atomic save) or rewritten since shows another."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size


@contextlib.contextmanager
def saving_unchanged(path: str, identity: FileIdentity | None, doing: str) -> Iterator[None]:
    """Hold a lock on the folder of ``path`` while the block saves over it, refusing first
    (UserError) when the file no longer has ``identity``: another run saved it meanwhile, and
    saving over it would lose that run's work. Every command that saves learner states takes
    the lock, so a check and its save never interleave with another's."""
    if os.path.exists(path) and not os.path.isfile(path):  # a device or FIFO: written through
        yield
        return
    folder = final_target(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        if file_identity(path) != identity:
            raise UserError(
                f"{path} changed while {doing} (another run saved it); nothing saved: run again"
            )
        yield
    finally:
        os.close(descriptor)  # and the lock with it
