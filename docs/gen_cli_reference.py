"""Write docs/reference/cli.md: every command's ``--help``, taken from the argparse parsers.

    python docs/gen_cli_reference.py           # rewrite the page
    python docs/gen_cli_reference.py --check   # exit 1 when the page is not current

Help is formatted 100 columns wide and without colour, whatever the terminal, so the page is the
same on every machine with the same Python; tests/test_docs.py checks that it is current.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reference" / "cli.md"
WIDTH = "100"
HEADER = """# CLI reference

Every command's `--help`, generated from the argparse parsers by `docs/gen_cli_reference.py`
(do not edit by hand: run `python docs/gen_cli_reference.py` after changing an option).
"""


@contextlib.contextmanager
def fixed_terminal() -> Iterator[None]:
    """argparse formats for COLUMNS; fix it (and switch colour off) while help is formatted."""
    saved = {key: os.environ.get(key) for key in ("COLUMNS", "NO_COLOR", "PYTHON_COLORS")}
    os.environ.update(COLUMNS=WIDTH, NO_COLOR="1", PYTHON_COLORS="0")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subparsers here only
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def help_texts() -> list[tuple[str, str]]:
    """(command line, --help text) of vlm-export, its subcommands, vlm-edge and each command."""
    from vlm_export.export.cli import build_parser as export_parser
    from vlm_export.export.int8.quantize_cmd import quantize_parser
    from vlm_export.export.litert.cmd import build_litert_parser
    from vlm_export.export.ncnn.cmd import build_ncnn_parser
    from vlm_export.export.rknn.cmd import build_rknn_parser
    from vlm_export.export.tensorrt.engine_cmd import build_engine_parser
    from vlm_export.runtime.cli import build_parser as edge_parser

    with fixed_terminal():
        texts = [
            ("vlm-export", export_parser().format_help()),
            ("vlm-export build-engine", build_engine_parser().format_help()),
            ("vlm-export quantize", quantize_parser().format_help()),
            ("vlm-export build-ncnn", build_ncnn_parser().format_help()),
            ("vlm-export build-rknn", build_rknn_parser().format_help()),
            ("vlm-export build-litert", build_litert_parser().format_help()),
        ]
        edge = edge_parser()
        texts.append(("vlm-edge", edge.format_help()))
        for name, sub in sorted(_subcommands(edge).items()):
            texts.append((f"vlm-edge {name}", sub.format_help()))
    return texts


def render() -> str:
    """The whole page."""
    parts = [HEADER]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    parts.append(f"Formatted by Python {version}'s argparse, {WIDTH} columns.\n")
    for command, text in help_texts():
        parts.append(f"## {command}\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


def main() -> int:
    """Write the page, or with --check say whether it is current."""
    parser = argparse.ArgumentParser(description="Generate docs/reference/cli.md.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is not current")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = PAGE.is_file() and PAGE.read_text(encoding="utf-8") == text
        print("current" if current else f"{PAGE.relative_to(ROOT)} is out of date")
        return 0 if current else 1
    from vlm_export.core.atomic import atomic_write_bytes

    atomic_write_bytes(PAGE, text.encode("utf-8"))
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
