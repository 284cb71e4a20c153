"""The shape every ``vlm-export`` subcommand that adds to a bundle shares: parse, guard the paths,
do the work, print its one-line result; a user mistake is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from vlm_export.core import live_line
from vlm_export.core.errors import UserError
from vlm_export.core.paths import guard_arguments
from vlm_export.export.bundle.staging import check_bundle_intact


def run_subcommand(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    work: Callable[[argparse.Namespace], str],
) -> int:
    """Run ``work`` on the parsed, path-guarded arguments, once the bundle's files match its
    manifest, and print the line it returns: 0; a UserError ends any progress line and prints
    ``<prog>: error: <message>``: 2."""
    args = parser.parse_args(argv)
    try:
        guard_arguments(parser, args)  # before any work
        check_bundle_intact(args.bundle)
        line = work(args)
    except UserError as exc:
        live_line.end()  # a progress line cut short: the error starts a line of its own
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(line)
    return 0
