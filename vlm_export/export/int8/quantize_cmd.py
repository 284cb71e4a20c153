"""``vlm-export quantize BUNDLE --calibration DIR``, and the export's ``--int8-calibration DIR``.

Parses, then ``quantize.quantize_bundle`` calibrates, quantizes, gates and adds the INT8 graph.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path

from vlm_export.core.errors import UserError
from vlm_export.core.paths import PathArg
from vlm_export.export.bundle.staging import BUNDLE_RW
from vlm_export.export.int8.calibration import HELD_OUT_EVERY
from vlm_export.export.int8.gate import MIN_COSINE, describe_gate
from vlm_export.export.int8.graph import DEFAULT_SCOPE, SCOPES
from vlm_export.export.int8.quantize import METHODS, GraphRecord, quantize_bundle
from vlm_export.export.progress import Progress
from vlm_export.export.subcommand import run_subcommand


def describe_record(record: GraphRecord, bundle_dir: str | Path) -> str:
    """One line about an INT8 graph added to a bundle: what was written, where, how close."""
    if record.weights is not None:
        kind, nbytes = "int8 OpenVINO IR (NNCF)", record.nbytes + record.weights["bytes"]
    else:
        kind, nbytes = "int8 QDQ", record.nbytes
    return (
        f"added {record.file} to {bundle_dir}: {kind}, {nbytes / 2**20:.1f} MiB; "
        f"against the fp32 graph: {describe_gate(record.parity)}"
    )


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """The export command's --int8-calibration option."""
    parser.add_argument(
        "--int8-calibration",
        type=PathArg("tree", Path),
        metavar="DIR",
        help="also add an INT8 graph calibrated on the images in DIR (as `vlm-export quantize`; "
        "100-500 images from the deployment camera, spread over the classes)",
    )


def run_quantize_step(
    args: argparse.Namespace, bundle_dir: str | Path, shown_as: str | Path | None = None
) -> GraphRecord | None:
    """After an export with --int8-calibration: quantize, gate, record; else do nothing.
    ``shown_as``: the bundle's name in messages (its final path while it is being written)."""
    if getattr(args, "int8_calibration", None) is None:
        return None
    progress = Progress(2, quiet=getattr(args, "quiet", False))
    record = quantize_bundle(bundle_dir, args.int8_calibration, overwrite=True, progress=progress)
    print(describe_record(record, shown_as or bundle_dir))
    return record


def quantize_parser() -> argparse.ArgumentParser:
    """The parser of ``vlm-export quantize``."""
    parser = argparse.ArgumentParser(
        prog="vlm-export quantize",
        description=(
            "Add a statically quantized INT8 image encoder (ONNX, QDQ form; or with\n"
            "--method nncf an OpenVINO IR by NNCF) to a bundle, calibrated on your images with\n"
            "the bundle's own preprocessing. Condensation, anchor selection, LayerNorm and\n"
            "softmax stay float. The graph is compared with\n"
            f"the fp32 graph on calibration and held-out images (embedding cosine >= {MIN_COSINE}\n"
            "for every image; top-1 agreement on the bundle's classes reported) and is not\n"
            "written if it fails. A ladder bundle (--drop-rates) gets one INT8 graph per\n"
            "rung, each gated against its own rung, their int8 weights stored once.\n"
            "Run it with `vlm-edge run --precision int8`."
        ),
        epilog=(
            "Bring 100-500 images from the deployment camera, spread over the classes.\n"
            "example:\n  vlm-export quantize bundles/vitb16-tca --calibration calib/ "
            "--held-out holdout/"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundle", type=BUNDLE_RW, metavar="BUNDLE", help="bundle folder")
    parser.add_argument(
        "--calibration",
        type=PathArg("tree", Path),
        required=True,
        metavar="DIR",
        help="calibration images",
    )
    parser.add_argument(
        "--held-out",
        type=PathArg("tree", Path),
        metavar="DIR",
        help=f"images for the gate only (default: every {HELD_OUT_EVERY}th calibration image is "
        "held out of calibration)",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=METHODS[0],
        help="qdq (default): ONNX Runtime's QDQ ONNX graph, which every backend reads; nncf: an "
        "OpenVINO IR by NNCF's transformer preset (SmoothQuant, fast bias correction, the "
        "condensation in its ignored scope), run by --backend openvino (needs nncf)",
    )
    parser.add_argument(
        "--scope",
        choices=SCOPES,
        default=None,
        help="which products become int8: mlp (default; the MLPs, two thirds of the FLOPs), "
        "blocks (every transformer-block projection), attention (blocks, and the blocks' "
        "attention scores and scores-times-values products), all (every weight product: blocks, "
        "the patch embedding and the final projection); the wider, the faster and the further "
        f"from fp32 (--method qdq only; default {DEFAULT_SCOPE})",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an INT8 graph the bundle already has"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def quantize_main(argv: Sequence[str] | None = None) -> int:
    """Run ``vlm-export quantize``; 0 on success, 2 with a one-line error on stderr."""

    def quantize(args: argparse.Namespace) -> str:
        if args.method == "nncf" and args.scope is not None:
            raise UserError("--scope applies to --method qdq; NNCF chooses what to quantize")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            progress = Progress(2, quiet=args.quiet)
            record = quantize_bundle(
                args.bundle,
                args.calibration,
                args.held_out,
                args.overwrite,
                args.scope or DEFAULT_SCOPE,
                progress,
                args.method,
            )
        return describe_record(record, args.bundle)

    return run_subcommand(quantize_parser(), argv, quantize)
