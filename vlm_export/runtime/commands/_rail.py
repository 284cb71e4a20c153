"""Command-line pieces shared by ``vlm-edge learn``, ``eval`` and ``merge`` (not a command)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
