"""``vlm-export build-ncnn BUNDLE``: add the image encoder as an ncnn graph (.param/.bin)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from vlm_export.export.bundle.staging import BUNDLE_RW
from vlm_export.export.ncnn.install import add_ncnn_to_bundle, describe_report
from vlm_export.export.subcommand import run_subcommand


def build_ncnn_parser() -> argparse.ArgumentParser:
    """The parser of ``vlm-export build-ncnn``."""
    parser = argparse.ArgumentParser(
        prog="vlm-export build-ncnn",
        description=(
            "Convert a bundle's image encoder to ncnn (<onnx>.ncnn.param/.bin, fp32) with pnnx.\n"
            "Where the ncnn Python package is installed, the graph is compared with ONNX\n"
            "Runtime CPU first (embedding cosine >= 0.9999, every token fate equal); a failing\n"
            "graph is not kept. Operations ncnn has no layer for are named in the error."
        ),
        epilog="example:\n  vlm-export build-ncnn bundles/vitb16-tca",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundle", type=BUNDLE_RW, metavar="BUNDLE", help="bundle folder")
    parser.add_argument(
        "--overwrite", action="store_true", help="rebuild an ncnn graph the bundle already lists"
    )
    return parser


def build_ncnn_main(argv: Sequence[str] | None = None) -> int:
    """Run ``vlm-export build-ncnn``: 0 on success, 2 with a one-line error on stderr."""

    def build(args: argparse.Namespace) -> str:
        record = add_ncnn_to_bundle(args.bundle, overwrite=args.overwrite)
        return (
            f"built {record.file} + {record.weights}: {record.converter}, fp32; "
            f"{describe_report(record.parity)}"
        )

    return run_subcommand(build_ncnn_parser(), argv, build)
