"""Command-line glue for TensorRT: the export options and ``vlm-export build-engine BUNDLE``.

``build-engine`` builds an engine for this machine's GPU from a bundle's ONNX; ``build-engine
--register FILE`` adds an engine built elsewhere (the trtexec line) under its versioned name.
Either way the engine is checked against ONNX Runtime CPU before it is recorded
(``tensorrt.install`` does the work). It prints the equivalent trtexec line first, with the
``--register`` line that adds that engine to the bundle.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm_export.core.errors import UserError
from vlm_export.core.paths import PathArg, guard_arguments
from vlm_export.export.bundle.staging import BUNDLE_RW, check_bundle_intact
from vlm_export.export.tensorrt.build import (
    DEFAULT_FP32_LAYER_TYPES,
    DEFAULT_WORKSPACE_MB,
    ORIGIN_REGISTERED,
    EngineRecord,
    check_build_options,
)
from vlm_export.export.tensorrt.install import (
    add_engine_to_bundle,
    add_rung_engines_to_bundle,
    add_text_engine_to_bundle,
    register_command,
    register_engine_in_bundle,
    trtexec_hint,
)
from vlm_export.runtime.engines.checks import parity as engine_parity
from vlm_export.runtime.engines.select import PRECISIONS, TensorRTUnavailableError, query_device

REGISTER_HELP = (
    "add an engine built elsewhere (e.g. with the printed trtexec line) instead of building one: "
    "it is loaded with this machine's TensorRT, compared with ONNX Runtime CPU, copied into the "
    "bundle as <onnx>.trt<version>.sm<gpu>.<precision>.engine and recorded with its sha256; "
    "needs TensorRT's Python bindings and the GPU it was built for"
)


def _add_build_options(parser: Any, default_precision: str | None = "fp16") -> None:
    """--precision, --workspace, --timing-cache on a parser or an argument group."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default_precision,
        help="engine precision; fp16 keeps LayerNorm and softmax in fp32 (default: fp16; with "
        "--register: read from a FILE named *.fp16.engine or *.fp32.engine)",
    )
    parser.add_argument(
        "--workspace",
        type=int,
        default=DEFAULT_WORKSPACE_MB,
        metavar="MB",
        help=f"TensorRT builder workspace limit in MB (default: {DEFAULT_WORKSPACE_MB})",
    )
    parser.add_argument(
        "--timing-cache",
        type=PathArg("state", Path),
        default=None,
        metavar="FILE",
        help="TensorRT timing cache: read if it exists, written after the build (faster rebuilds)",
    )


def add_tensorrt_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --tensorrt, --precision, --workspace and --timing-cache to the export command."""
    group = parser.add_argument_group("TensorRT")
    group.add_argument(
        "--tensorrt",
        action="store_true",
        help="also build a TensorRT engine for this machine's GPU into the bundle (checked "
        "against ONNX Runtime CPU first)",
    )
    _add_build_options(group)


def preflight_tensorrt(args: argparse.Namespace) -> None:
    """With --tensorrt, fail before the export if the engine cannot be built here."""
    if getattr(args, "tensorrt", False):
        check_build_options(args.precision, args.workspace, DEFAULT_FP32_LAYER_TYPES)
        try:
            query_device()
        except TensorRTUnavailableError as exc:
            raise TensorRTUnavailableError(
                f"{exc}; or export without --tensorrt and build the engine on the device with "
                "`vlm-export build-engine BUNDLE` (or the trtexec line it prints)"
            ) from None


def print_trtexec_hint(
    bundle_dir: str | Path, precision: str, workspace_mb: int, shown_as: str | Path | None = None
) -> None:
    """Print the trtexec line and the --register line that adds its engine to the bundle
    (``shown_as``: the bundle's path in them, when ``bundle_dir`` is not where it will be)."""
    line, name = trtexec_hint(bundle_dir, precision, workspace_mb)
    shown = shown_as or bundle_dir
    register = register_command(shown, Path(shown) / name, precision)
    print(f"equivalent trtexec line (run in {shown}):\n  {line}")
    print(
        "an engine built by trtexec is used only once registered (checked against ONNX Runtime, "
        f"renamed, recorded with its sha256):\n  {register}"
    )


def describe_record(record: EngineRecord) -> str:
    """One line about an engine added to a bundle, with its parity numbers."""
    verb = "registered" if record.origin == ORIGIN_REGISTERED else "built"
    rung = f" (ladder rung {record.rung})" if record.rung else ""
    line = (
        f"{verb} {record.file}{rung}: {record.precision}, TensorRT {record.tensorrt_version}, "
        f"{record.device_name} (compute {record.compute_capability}), "
        f"{record.nbytes / 2**20:.1f} MiB"
    )
    if record.parity is not None:
        line += f"; against {record.parity['reference']}: {engine_parity.describe(record.parity)}"
    return line


def run_tensorrt_step(
    args: argparse.Namespace, bundle_dir: str | Path, shown_as: str | Path | None = None
) -> EngineRecord | None:
    """After an export with --tensorrt: print the trtexec line, build, record; else do nothing.
    ``shown_as``: the bundle's name in messages (its final path while it is being written)."""
    if not getattr(args, "tensorrt", False):
        return None
    print_trtexec_hint(bundle_dir, args.precision, args.workspace, shown_as)
    record = add_engine_to_bundle(
        bundle_dir, args.precision, args.workspace, args.timing_cache, overwrite=True
    )
    print(describe_record(record))
    for rung in add_rung_engines_to_bundle(
        bundle_dir, args.precision, args.workspace, args.timing_cache, overwrite=True
    ):
        print(describe_record(rung))
    text = add_text_engine_to_bundle(
        bundle_dir, args.precision, args.workspace, args.timing_cache, overwrite=True
    )
    if text is not None:
        print(describe_record(text))
    return record


def build_engine_parser() -> argparse.ArgumentParser:
    """The parser of ``vlm-export build-engine``."""
    parser = argparse.ArgumentParser(
        prog="vlm-export build-engine",
        description=(
            "Build a TensorRT engine for this machine's GPU into an existing bundle, or add one\n"
            "built elsewhere with --register. Either way the engine is compared with ONNX\n"
            "Runtime CPU on the same inputs (embedding cosine >= 0.999 for fp16, 0.9999 for\n"
            "fp32) before it is recorded in the manifest; a failing engine is not kept. A\n"
            "ladder bundle (--drop-rates) gets one engine per rung, each checked against its\n"
            "rung's graph, so --backend tensorrt runs every rung."
        ),
        epilog=(
            "examples:\n"
            "  vlm-export build-engine bundles/vitb16-tca --precision fp16\n"
            "  vlm-export build-engine bundles/vitb16-tca \\\n"
            "      --register bundles/vitb16-tca/image_encoder.fp16.engine   # built by trtexec"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundle", type=BUNDLE_RW, metavar="BUNDLE", help="bundle folder")
    _add_build_options(parser, default_precision=None)
    parser.set_defaults(workspace=None)
    parser.add_argument(
        "--register", type=PathArg("file", Path), metavar="ENGINE_FILE", help=REGISTER_HELP
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild (or replace) an engine the bundle already lists for this TensorRT, GPU "
        "and precision",
    )
    parser.add_argument(
        "--no-text-engine",
        dest="text_engine",
        action="store_false",
        help="build the image engine only (by default a bundle with a text engine also gets "
        "text_encoder.trt<version>.sm<cc>.<precision>.engine, profile from the manifest)",
    )
    return parser


def _register_main(args: argparse.Namespace) -> EngineRecord:
    if args.workspace is not None or args.timing_cache is not None:
        raise UserError("--workspace and --timing-cache apply to building, not to --register")
    return register_engine_in_bundle(args.bundle, args.register, args.precision, args.overwrite)


def _build_main(args: argparse.Namespace) -> EngineRecord:
    precision = args.precision or "fp16"
    workspace = DEFAULT_WORKSPACE_MB if args.workspace is None else args.workspace
    print_trtexec_hint(args.bundle, precision, workspace)
    record = add_engine_to_bundle(
        args.bundle, precision, workspace, args.timing_cache, args.overwrite
    )
    for rung in add_rung_engines_to_bundle(
        args.bundle, precision, workspace, args.timing_cache, args.overwrite
    ):
        print(describe_record(rung))
    if args.text_engine:
        text = add_text_engine_to_bundle(
            args.bundle, precision, workspace, args.timing_cache, args.overwrite
        )
        if text is not None:
            print(describe_record(text))
    return record


def build_engine_main(argv: Sequence[str] | None = None) -> int:
    """Run ``vlm-export build-engine BUNDLE [--register FILE]``: add an engine to a bundle.

    Returns the exit status: 0 on success, 2 with a one-line error on stderr (as vlm-export).
    """
    parser = build_engine_parser()
    args = parser.parse_args(argv)
    try:
        guard_arguments(parser, args)  # before any work
        check_bundle_intact(args.bundle)
        record = _register_main(args) if args.register is not None else _build_main(args)
    except UserError as exc:
        print(f"vlm-export build-engine: error: {exc}", file=sys.stderr)
        return 2
    print(describe_record(record))
    if (
        args.register is not None
        and args.register.resolve() != (args.bundle / record.file).resolve()
    ):
        print(
            f"{args.register} was copied into the bundle as {record.file}; it is no longer needed"
        )
    return 0
