"""``vlm-export build-rknn BUNDLE --target rk3588``: add a Rockchip NPU graph to a bundle.

Parses, then ``rknn.build.add_rknn_to_bundle`` converts, checks in the simulator and records.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence

from vlm_export.export.bundle.staging import BUNDLE_RW
from vlm_export.export.progress import Progress
from vlm_export.export.rknn.build import TARGETS, RknnRecord, add_rknn_to_bundle
from vlm_export.export.subcommand import run_subcommand
from vlm_export.runtime.engines.checks import parity as engine_parity


def describe_record(record: RknnRecord) -> str:
    """One line about an RKNN graph added to a bundle, with its simulator parity."""
    on_cpu = ", ".join(f"{op} {count}" for op, count in record.cpu_ops.items()) or "none"
    return (
        f"added {record.file}: {record.target}, {record.precision}, rknn-toolkit2 "
        f"{record.toolkit_version}, {record.nbytes / 2**20:.1f} MiB; layers on the CPU: {on_cpu}; "
        f"simulator against {engine_parity.REFERENCE}: {engine_parity.describe(record.parity)}"
    )


def build_rknn_parser() -> argparse.ArgumentParser:
    """The parser of ``vlm-export build-rknn``."""
    parser = argparse.ArgumentParser(
        prog="vlm-export build-rknn",
        description=(
            "Convert a bundle's image encoder into an RKNN graph for a Rockchip NPU with\n"
            "rknn-toolkit2 (x86-64 Linux), in fp16. The graph is run in the toolkit's simulator\n"
            "against ONNX Runtime CPU (embedding cosine >= "
            f"{engine_parity.MIN_EMBEDDING_COSINE['fp16']}; token fates reported) and is\n"
            "recorded in the manifest only when it passes. On the board, run it with\n"
            "`vlm-edge run BUNDLE ... --backend rknn` (rknn-toolkit-lite2)."
        ),
        epilog="example:\n  vlm-export build-rknn bundles/vitb16-tca --target rk3588",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundle", type=BUNDLE_RW, metavar="BUNDLE", help="bundle folder")
    parser.add_argument(
        "--target", choices=TARGETS, default=TARGETS[0], help="the Rockchip SoC (default: rk3588)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="rebuild an RKNN graph the bundle already has"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def build_rknn_main(argv: Sequence[str] | None = None) -> int:
    """Run ``vlm-export build-rknn``; 0 on success, 2 with a one-line error on stderr."""

    def build(args: argparse.Namespace) -> str:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")  # the toolkit's deprecation notices
            progress = Progress(2, quiet=args.quiet)
            record = add_rknn_to_bundle(args.bundle, args.target, args.overwrite, progress)
        return describe_record(record)

    return run_subcommand(build_rknn_parser(), argv, build)
