"""``vlm-export build-litert BUNDLE``: add a LiteRT (.tflite) graph of the image tower."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from vlm_export.export.bundle.staging import BUNDLE_RW
from vlm_export.export.litert.build import MIN_COSINE, add_litert_to_bundle
from vlm_export.export.progress import Progress
from vlm_export.export.subcommand import run_subcommand
from vlm_export.runtime.engines.checks import parity as engine_parity


def build_litert_parser() -> argparse.ArgumentParser:
    """The parser of ``vlm-export build-litert``."""
    parser = argparse.ArgumentParser(
        prog="vlm-export build-litert",
        description=(
            "Rebuild the bundle's image tower in PyTorch from its manifest (model, weights,\n"
            "condensation) and convert it with litert-torch into a LiteRT (TensorFlow Lite)\n"
            "graph, added to the bundle as <onnx>.fp32.tflite with the manifest's tensor names\n"
            "(image NCHW). It is compared with the bundle's ONNX graph on ONNX Runtime CPU on\n"
            f"random and the bundle's reference images (embedding cosine >= {MIN_COSINE}, token\n"
            "fates equal) and is not kept if it fails. Run it with `vlm-edge run --backend\n"
            'litert`. Needs pip install ".[export,litert-export]" (litert-torch) and the\n'
            "bundle's weights: its open_clip tag (cached or downloaded), or random weights with\n"
            "their recorded seed."
        ),
        epilog="example:\n  vlm-export build-litert bundles/vitb32-tca",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundle", type=BUNDLE_RW, metavar="BUNDLE", help="bundle folder")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a .tflite graph the bundle already lists"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def build_litert_main(argv: Sequence[str] | None = None) -> int:
    """Run ``vlm-export build-litert``; 0 on success, 2 with a one-line error on stderr."""

    def build(args: argparse.Namespace) -> str:
        record = add_litert_to_bundle(args.bundle, args.overwrite, Progress(2, quiet=args.quiet))
        return (
            f"added {record['file']}: {record['bytes'] / 2**20:.1f} MiB, "
            f"{len(record['operators'])} operator types; against {engine_parity.REFERENCE}: "
            f"{engine_parity.describe(record['parity'])}"
        )

    return run_subcommand(build_litert_parser(), argv, build)
