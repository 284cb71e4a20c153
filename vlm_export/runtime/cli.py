"""The ``vlm-edge`` command, built from the command modules in ``vlm_export.runtime.commands``.

Command module protocol: every public module of that package (name not starting with ``_``) is
one subcommand and defines

    add_parser(subparsers) -> argparse.ArgumentParser
        add its subcommand (``subparsers.add_parser(name, ...)``) with its arguments, return it;
    handle(args: argparse.Namespace) -> int
        run it and return the exit status; raise a UserError subclass for a user mistake.

User mistakes print one line ``vlm-edge: error: ...`` and exit 1; warnings print one line each.
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
from vlm_export.runtime import commands
from vlm_export.runtime.errors import UserError

PROG = "vlm-edge"


def command_modules() -> list[ModuleType]:
    """The subcommand modules, sorted by name."""
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
    print(f"{PROG}: WARNING: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vlm-edge``; returns the exit status."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _one_line_warning
        try:
            return int(args.handler(args))
        except UserError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
