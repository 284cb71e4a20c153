"""The ``vlm-edge`` command, built from the command modules in ``vlm_export.runtime.commands``.

Command module protocol: every public module of that package (name not starting with ``_``) is
one subcommand and defines

    add_parser(subparsers) -> argparse.ArgumentParser
        add its subcommand (``subparsers.add_parser(name, ...)``) with its arguments, return it;
    handle(args: argparse.Namespace) -> int
        run it and return the exit status; raise a UserError subclass for a user mistake.

Every path option is typed with a ``core.paths.PathArg``: before a command runs, the write
guard checks that no output is, or lies inside, what the run reads (``guard_arguments``).

User mistakes print one line ``vlm-edge: error: ...`` and exit 1; warnings (Python's and the
library's logged ones, see ``vlm_export.runtime.log``) print one line each.

A closed standard output (``vlm-edge run ... | head -1``) ends the command quietly with exit status
141, what a shell reports for a command killed by SIGPIPE (128 + 13), so ``set -o pipefail``
scripts still see that the output was cut short. The command's own cleanup runs first (``run``
saves its state in a ``finally``); standard output is then pointed at the null device so the
interpreter's last flush cannot print a BrokenPipeError traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import TextIO

from vlm_export import __version__
from vlm_export.core import live_line
from vlm_export.core.errors import UserError, describe_os_error
from vlm_export.core.interrupts import exit_status_of
from vlm_export.core.paths import PathArg, guard_arguments, path_actions, role_of
from vlm_export.core.pipes import EXIT_BROKEN_PIPE
from vlm_export.core.pipes import stdout_to_devnull as _stdout_to_devnull
from vlm_export.runtime.log import one_line_messages
from vlm_export.runtime.terminal import printable

PROG = "vlm-edge"
#: path kinds that name a folder (core.paths.PathArg): an empty one asks for a folder
FOLDER_KINDS = ("tree", "bundle-rw", "into", "folder")


def command_modules() -> list[ModuleType]:
    """The subcommand modules, sorted by name."""
    from vlm_export.runtime import commands  # imported here: Ctrl-C while importing is caught

    names = sorted(
        info.name
        for info in pkgutil.iter_modules(commands.__path__)
        if not info.name.startswith("_")
    )
    return [importlib.import_module(f"{commands.__name__}.{name}") for name in names]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per command module."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run vlm-export bundles on the device (no torch): classify images, videos "
        "and camera frames with zero-shot CLIP and on-device adaptation.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in command_modules():
        module.add_parser(subparsers).set_defaults(handler=module.handle)
    return parser


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    live_line.end()
    print(f"{PROG}: WARNING: {printable(str(message))}", file=sys.stderr, flush=True)


def refuse_empty_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a path option given empty (``--state "$UNSET"``): never taken for "not given",
    nor for the current folder."""
    for action in path_actions(parser, args):
        value = getattr(args, action.dest, None)
        if not isinstance(action.type, PathArg) or value is None:
            continue
        if any(not str(item).strip() for item in (value if isinstance(value, list) else [value])):
            noun = "folder" if action.type.kind in FOLDER_KINDS else "path"
            raise UserError(f"{role_of(action)} is empty: give a {noun}")


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    with warnings.catch_warnings(), one_line_messages(PROG):
        warnings.simplefilter("default")
        warnings.showwarning = _one_line_warning
        try:
            refuse_empty_paths(parser, args)
            guard_arguments(parser, args)  # before any work
            return int(args.handler(args))
        except UserError as exc:
            live_line.end()  # a progress line showing: the error starts a line of its own
            print(f"{PROG}: error: {printable(str(exc))}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            raise
        except OSError as exc:  # a permission or I/O error that no command turned into a line
            live_line.end()
            print(f"{PROG}: error: {printable(describe_os_error(exc))}", file=sys.stderr)
            return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vlm-edge``; returns the exit status.

    Ctrl-C at any point (while importing, loading the bundle, or running) ends with one line
    and exit status 130; a write error on standard output is one line and status 1.
    """
    # e.g. NumPy's import broken by Ctrl-C
    return exit_status_of(lambda: _main(argv), f"{PROG}: interrupted")


def _main(argv: Sequence[str] | None) -> int:
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        parser = build_parser()
        if not argv:  # like git: what there is to run, and a status that says nothing ran
            print(parser.format_help(), end="", file=sys.stderr)
            return 2
        args = parser.parse_args(argv)
        code = _dispatch(parser, args)
        sys.stdout.flush()  # a reader gone away shows here, not as a traceback at exit
        return code
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        live_line.end()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # standard output on a full disk, its error not yet reported
        _stdout_to_devnull()
        live_line.end()
        print(
            f"{PROG}: error: cannot write standard output: {describe_os_error(exc)}",
            file=sys.stderr,
        )
        return 1
