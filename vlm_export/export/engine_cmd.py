"""Command-line glue for TensorRT: the export options and ``vlm-export build-engine BUNDLE``.

``build-engine`` builds an engine for this machine's GPU from a bundle's ONNX and records it in
the manifest (``engines`` and ``files``), written atomically. It needs TensorRT and cuda-python
but not torch, so it can run on the device. It always prints the equivalent trtexec line first,
so that a machine with trtexec but without TensorRT's Python bindings can build the same engine.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm_export.export.tensorrt_build import (
    DEFAULT_FP32_LAYER_TYPES,
    DEFAULT_WORKSPACE_MB,
    EngineRecord,
    build_engine,
    check_build_options,
    engine_file_name,
    fp32_node_names,
    trtexec_command,
)
from vlm_export.runtime.atomic import atomic_write_bytes
from vlm_export.runtime.engine_select import (
    PRECISIONS,
    DeviceInfo,
    TensorRTUnavailableError,
    query_device,
)
from vlm_export.runtime.errors import UserError
from vlm_export.runtime.manifest import MANIFEST_NAME, read_manifest


def _add_build_options(parser: Any) -> None:
    """--precision, --workspace, --timing-cache on a parser or an argument group."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp16",
        help="engine precision; fp16 keeps LayerNorm and softmax in fp32 (default: fp16)",
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
        type=Path,
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
        help="also build a TensorRT engine for this machine's GPU into the bundle",
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


def _device_or_none() -> DeviceInfo | None:
    try:
        return query_device()
    except TensorRTUnavailableError:
        return None


def planned_engine_name(stem: str, precision: str, device: DeviceInfo | None) -> str:
    """The engine file name for ``device``; without TensorRT here, a name without version/GPU."""
    if device is None:
        return f"{stem}.{precision}.engine"
    return engine_file_name(stem, device.tensorrt_version, device.compute_capability, precision)


def trtexec_hint(bundle_dir: str | Path, precision: str, workspace_mb: int) -> str:
    """The trtexec line that builds this bundle's engine, to run inside the bundle folder."""
    bundle_dir = Path(bundle_dir)
    onnx_name = read_manifest(bundle_dir)["engine"]["onnx"]
    check_build_options(precision, workspace_mb, DEFAULT_FP32_LAYER_TYPES)
    layers = fp32_node_names(bundle_dir / onnx_name) if precision == "fp16" else []
    name = planned_engine_name(Path(onnx_name).stem, precision, _device_or_none())
    return trtexec_command(onnx_name, name, precision, workspace_mb, fp32_layers=layers)


def record_engine(manifest: dict[str, Any], record: EngineRecord) -> dict[str, Any]:
    """Add ``record`` to ``engines`` (replacing an entry of that file) and to ``files``."""
    engines = [entry for entry in manifest.get("engines") or [] if entry.get("file") != record.file]
    manifest["engines"] = [*engines, record.to_manifest()]
    manifest["files"][record.file] = {"sha256": record.sha256, "bytes": record.nbytes}
    return manifest


def add_engine_to_bundle(
    bundle_dir: str | Path,
    precision: str = "fp16",
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | Path | None = None,
    overwrite: bool = False,
) -> EngineRecord:
    """Build an engine for this GPU into ``bundle_dir`` and record it in the manifest atomically.

    An engine of the same name (same TensorRT release, GPU and precision) already in the manifest
    is rebuilt only with ``overwrite``.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    check_build_options(precision, workspace_mb, DEFAULT_FP32_LAYER_TYPES)
    onnx_path = bundle_dir / manifest["engine"]["onnx"]
    name = planned_engine_name(onnx_path.stem, precision, query_device())
    listed = any(entry.get("file") == name for entry in manifest.get("engines") or [])
    if listed and not overwrite:
        raise UserError(f"{name} is already in the bundle; pass --overwrite to rebuild it")
    record = build_engine(
        onnx_path,
        bundle_dir,
        precision=precision,
        workspace_mb=workspace_mb,
        timing_cache=timing_cache,
        batch_size=int(manifest["engine"]["batch_size"]),
    )
    manifest = record_engine(manifest, record)
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write_bytes(bundle_dir / MANIFEST_NAME, text.encode("utf-8"))
    return record


def describe_record(record: EngineRecord) -> str:
    """One line about a built engine."""
    return (
        f"built {record.file}: {record.precision}, TensorRT {record.tensorrt_version}, "
        f"{record.device_name} (compute {record.compute_capability}), "
        f"{record.nbytes / 2**20:.1f} MiB"
    )


def run_tensorrt_step(args: argparse.Namespace, bundle_dir: str | Path) -> EngineRecord | None:
    """After an export with --tensorrt: print the trtexec line, build, record; else do nothing."""
    if not getattr(args, "tensorrt", False):
        return None
    print(
        f"equivalent trtexec line (run in the bundle folder):\n  "
        f"{trtexec_hint(bundle_dir, args.precision, args.workspace)}"
    )
    record = add_engine_to_bundle(
        bundle_dir, args.precision, args.workspace, args.timing_cache, overwrite=True
    )
    print(describe_record(record))
    return record


def build_engine_parser() -> argparse.ArgumentParser:
    """The parser of ``vlm-export build-engine``."""
    parser = argparse.ArgumentParser(
        prog="vlm-export build-engine",
        description="Build a TensorRT engine for this machine's GPU into an existing bundle.",
    )
    parser.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle folder")
    _add_build_options(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild an engine the bundle already lists for this TensorRT, GPU and precision",
    )
    return parser


def build_engine_main(argv: Sequence[str] | None = None) -> int:
    """Run ``vlm-export build-engine BUNDLE``: build an engine into a bundle and record it.

    Returns the exit status: 0 on success, 2 with a one-line error on stderr (as vlm-export).
    """
    args = build_engine_parser().parse_args(argv)
    try:
        hint = trtexec_hint(args.bundle, args.precision, args.workspace)
        print(f"equivalent trtexec line (run in {args.bundle}):\n  {hint}")
        record = add_engine_to_bundle(
            args.bundle, args.precision, args.workspace, args.timing_cache, args.overwrite
        )
    except UserError as exc:
        print(f"vlm-export build-engine: error: {exc}", file=sys.stderr)
        return 2
    print(describe_record(record))
    return 0
