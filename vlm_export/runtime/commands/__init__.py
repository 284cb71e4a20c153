"""Subcommands of ``vlm-edge``, one module each (protocol: see ``vlm_export.runtime.cli``).

Helpers shared by the commands live here.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from vlm_export.core import live_line
from vlm_export.core.paths import PathArg
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.base import EngineBackend
from vlm_export.runtime.engines.factory import BACKENDS, PRECISIONS, capped_threads, open_backend
from vlm_export.runtime.io.preprocess import CROP_MODES, DEFAULT_MAX_PIXELS
from vlm_export.runtime.io.sources import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    SourceOptions,
    parse_size,
)
from vlm_export.runtime.terminal import printable


def status(message: str) -> None:
    """One line on stderr, prefixed with the program name (names in it made printable); a
    progress line showing is erased first."""
    live_line.end()
    print(f"vlm-edge: {printable(message)}", file=sys.stderr, flush=True)


def stop_signals() -> list[signal.Signals]:
    """The signals that stop a long command between frames: SIGTERM always; SIGINT and SIGHUP
    unless ignored at the start (a script's background job, nohup, screen: the user asked the
    command to outlive a Ctrl-C of the script or the terminal)."""
    signals = [signal.SIGTERM]
    for name in ("SIGINT", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
            signals.append(number)
    return signals


def format_bytes(size: float) -> str:
    """A byte count in B, KB, MB or GB (powers of 1024)."""
    units = ("B", "KB", "MB", "GB")
    index = 0
    while size >= 1024 and index < len(units) - 1:
        size /= 1024
        index += 1
    return f"{size:.0f} B" if index == 0 else f"{size:.1f} {units[index]}"


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Backend choice, bundle verification and progress, as ``vlm-edge run`` has them."""
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument(
        "--providers", help="ONNX Runtime providers in order, comma-separated (e.g. cuda,cpu)"
    )
    parser.add_argument(
        "--threads", type=int, help="ONNX Runtime / OpenVINO / ncnn / LiteRT inference threads"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="engine precision: onnxruntime fp32|int8, openvino fp32|bf16|int8, litert fp32 (int8 "
        "runs the "
        "bundle's quantized graph; bf16 needs a CPU with bf16); default fp32",
    )
    parser.add_argument(
        "--precision-fallback",
        action="store_true",
        help="run fp32 when the CPU lacks the requested bf16 (default: refuse)",
    )
    add_drift_argument(parser)
    add_verify_arguments(parser)
    parser.add_argument(
        "--quiet", action="store_true", help="no progress line (shown when stderr is a terminal)"
    )
    parser.add_argument(
        "--max-pixels",
        type=_max_pixels,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse images larger than N pixels before decoding them (default "
        f"{DEFAULT_MAX_PIXELS:,}; 0 = no limit)",
    )


def add_drift_argument(parser: argparse.ArgumentParser) -> None:
    """--allow-drift: run an engine whose reference embeddings drifted, with a warning."""
    parser.add_argument(
        "--allow-drift",
        action="store_true",
        help="run the engine even when its embeddings of the bundle's reference images fall "
        "below its precision's cosine bound (a warning instead of a refusal; a collapsed "
        "engine is refused anyway)",
    )


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """How a source is read: --stride for files, --camera-size and --camera-fps for cameras."""
    group = parser.add_argument_group("reading the source")
    group.add_argument(
        "--stride",
        type=int,
        default=1,
        metavar="N",
        help="every Nth frame of a video, folder or glob (skipped video frames are not decoded)",
    )
    group.add_argument(
        "--camera-size",
        metavar="WxH",
        help="ask a camera (an index) for this frame size, e.g. 1280x720",
    )
    group.add_argument(
        "--camera-fps", type=float, metavar="F", help="ask a camera (an index) for F frames/s"
    )


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """--target-ms, --adapt-budget and --measure: the token budget of a ladder bundle."""
    budget = parser.add_argument_group("token budget (ladder bundles: vlm-export --drop-rates)")
    budget.add_argument(
        "--target-ms",
        type=float,
        metavar="MS",
        help="start on the largest budget whose p90 latency, recorded by vlm-edge bench on this "
        "device, meets MS per frame (none does: the fastest, the smallest budget worth running)",
    )
    budget.add_argument(
        "--adapt-budget",
        action="store_true",
        default=None,
        help="with --target-ms: switch rungs while running when the moving p90 frame time "
        "crosses MS (with hysteresis)",
    )
    budget.add_argument(
        "--measure",
        action="store_true",
        default=None,
        help="with --target-ms: time the rungs now when vlm-edge bench recorded none",
    )


def add_crop_argument(parser: argparse.ArgumentParser) -> None:
    """--crop: how a frame of another shape becomes the engine's input."""
    parser.add_argument(
        "--crop",
        choices=tuple(CROP_MODES),
        help="center: the centre square, as the model was trained (default: the bundle's "
        "preprocessing, center for CLIP); letterbox: the whole frame, padded; squash: the whole "
        "frame, stretched. A 16:9 frame loses 44%% of its width to center",
    )


def source_options(args: argparse.Namespace) -> SourceOptions:
    """The :class:`SourceOptions` of ``add_source_arguments``'s flags."""
    size = parse_size(args.camera_size) if args.camera_size else None
    return SourceOptions(args.stride, size, args.camera_fps)


def add_verify_arguments(parser: argparse.ArgumentParser, what: str = "the bundle's") -> None:
    """--verify cached|full and --no-verify: how the bundle's files are checked at start."""
    parser.add_argument(
        "--verify",
        choices=("cached", "full"),
        default="cached",
        help=f"sha256 check of {what} files: cached (default) hashes only files changed since "
        "they last matched; full hashes every file",
    )
    parser.add_argument(
        "--no-verify", action="store_true", help=f"skip the sha256 check of {what} files"
    )


def verify_mode(args: argparse.Namespace) -> str:
    """The verification mode the options ask for: off, cached or full."""
    if getattr(args, "no_verify", False):
        return "off"
    return str(getattr(args, "verify", "cached"))


def _max_pixels(text: str) -> int:
    """--max-pixels: a whole number >= 0."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(
            f"expected a whole number >= 0 (0 = no limit), got {text!r}"
        )
    return int(text)


def is_media_file(path: Path) -> bool:
    """A file a source or data folder reads: an image or video extension."""
    return path.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS


#: argparse ``type`` of each path option: what the write guard (core.paths) checks before any work
BUNDLE = PathArg("tree")  # a bundle the command reads
BUNDLE_RW = PathArg("bundle-rw")  # a bundle the command writes into (its job)
READ = PathArg("file")
SOURCE = PathArg("source", keep=is_media_file)
OUT = PathArg("out")
INTO = PathArg("into")
STATE = PathArg("state")


def media_tree(depth: int) -> PathArg:
    """A data folder: its image and video files up to ``depth`` levels down are read."""
    return PathArg("tree", depth=depth, keep=is_media_file)


def open_engine(bundle: Bundle, args: argparse.Namespace) -> EngineBackend:
    """The engine backend the options ask for."""
    providers = args.providers.split(",") if args.providers else None
    return open_backend(
        bundle,
        args.backend,
        providers,
        capped_threads(args.threads),
        precision=getattr(args, "precision", None),
        fallback=getattr(args, "precision_fallback", False),
        allow_drift=bool(getattr(args, "allow_drift", False)),
    )
