"""``vlm-edge run BUNDLE SOURCE``: classify every frame of a source, one record per frame.

Records are JSON lines, or readable lines and a closing table on a terminal (``--format``).
Video and camera records carry their timestamp in ms. Live sources (cameras, streams, GStreamer
pipelines) are read on a capture thread that hands over the newest frame: when the engine is
slower than the camera, stale frames are dropped (and counted) instead of queueing up.

Methods rail and tca+rail fuse the (TCA-corrected) logits with a RAIL state from ``vlm-edge
learn`` or ``merge`` (``--rail-state``: a learner or inference state). The TCA reservoir state
(``--state``) is loaded if the file exists, saved every ``--save-every`` frames and on every way
out: the end of the source, an error, Ctrl-C (exit 130) or SIGTERM (an orderly stop: exit 0).
Output lines are written whole and flushed, so an interrupted run leaves a valid JSONL file.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from vlm_export.core import live_line
from vlm_export.core.atomic import check_can_create
from vlm_export.core.errors import UserError
from vlm_export.runtime import api
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.commands import (
    BUNDLE,
    INTO,
    OUT,
    READ,
    SOURCE,
    STATE,
    add_budget_arguments,
    add_crop_argument,
    add_engine_arguments,
    add_source_arguments,
    open_engine,
    source_options,
    status,
    verify_mode,
)
from vlm_export.runtime.commands._annotated import AnnotatedOutput
from vlm_export.runtime.commands._run_loop import (
    RunStats,
    StopRequest,
    process_all,
    stop_on_signals,
)
from vlm_export.runtime.commands._run_output import (
    FORMATS,
    choose_format,
    open_output,
    open_writer,
    short_name,
)
from vlm_export.runtime.commands.classes import add_label_space_arguments, compute_label_space
from vlm_export.runtime.engines.factory import capped_threads
from vlm_export.runtime.engines.ladder.ladder import BudgetRun, open_budgeted, runs_ladder
from vlm_export.runtime.io.capture import NewestFrame
from vlm_export.runtime.io.display import Window
from vlm_export.runtime.io.sources import ImageFiles, Source, open_source
from vlm_export.runtime.pipeline import METHOD_STAGES, METHODS, Pipeline, check_min_score
from vlm_export.runtime.rail.models import describe, open_fusion
from vlm_export.runtime.tca.reservoir_config import ANCHOR_RULES, EVICTION_MODES
from vlm_export.runtime.tca.stage import build_reservoir


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``run`` subcommand."""
    parser = subparsers.add_parser(
        "run",
        help="classify images, a video or a camera stream",
        description="Classify every frame of SOURCE with BUNDLE; one record per frame (readable "
        "on a terminal, JSON lines otherwise). Cameras and streams are read on a capture thread: "
        "each step takes the newest frame, stale ones are dropped and counted.",
    )
    parser.add_argument("bundle", type=BUNDLE, help="bundle folder written by vlm-export")
    parser.add_argument(
        "source",
        type=SOURCE,
        help="image file, folder, glob ('frames/*.png'), video file, camera index (0), "
        "stream URL (rtsp://...) or GStreamer pipeline ('... ! appsink')",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        help="default: the bundle's method (rail and tca+rail need --rail-state; without it, "
        "zeroshot and tca)",
    )
    parser.add_argument(
        "--rail-state",
        type=READ,
        metavar="FILE",
        help="RAIL learner or inference state (vlm-edge learn) for methods rail and tca+rail",
    )
    parser.add_argument(
        "--out", type=OUT, help="write the records here (JSON lines unless --format text)"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="text: a readable line per frame and a closing table; jsonl: one JSON record per "
        "line (default auto: text on a terminal without --out, else jsonl)",
    )
    parser.add_argument(
        "--show",
        action="store_true",
        help="show each frame with its label in a window (needs OpenCV with a GUI: opencv-python)",
    )
    parser.add_argument("--topk", type=int, default=5, help="classes per record (default 5)")
    parser.add_argument(
        "--min-score",
        type=float,
        metavar="S",
        help="report a frame whose best score is below S (0-1) as unknown (label -1, class "
        "'unknown', top-k kept); pick S from eval-tta's reliability diagram",
    )
    parser.add_argument(
        "--state", type=STATE, help="reservoir state file: resumed if it exists, kept up to date"
    )
    parser.add_argument(
        "--save-every",
        type=int,
        default=100,
        metavar="N",
        help="save the state every N frames (default 100; 0: only at the end)",
    )
    parser.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")
    parser.add_argument(
        "--save-annotated",
        type=INTO,
        metavar="PATH",
        help="also save every frame with its label, score and fps drawn on it: a folder of PNGs "
        "for images, a video file (.mp4) for video and camera sources",
    )
    parser.add_argument(
        "--annotate-fate",
        action="store_true",
        help="with --save-annotated: tint the patch grid by token fate (condensing bundles)",
    )
    add_crop_argument(parser)
    add_source_arguments(parser)
    add_engine_arguments(parser)
    add_budget_arguments(parser)
    labels = parser.add_argument_group("classes for this run (the bundle is not changed)")
    labels.add_argument(
        "--classes",
        type=READ,
        metavar="FILE",
        help="classify with these classes (needs a text engine)",
    )
    add_label_space_arguments(labels, domain=False)
    tca = parser.add_argument_group("TCA reservoir (default: the bundle's adaptation.tca)")
    tca.add_argument("--capacity", type=int, help="entries per class (M)")
    tca.add_argument("--tau", type=float, help="layer-weight temperature")
    tca.add_argument("--lam", type=float, help="correction scale lambda")
    tca.add_argument("--beta", type=float, help="affinity sharpness beta")
    tca.add_argument("--eviction", choices=EVICTION_MODES)
    tca.add_argument("--anchor-rule", choices=ANCHOR_RULES)
    return parser


def default_method(bundle: Bundle, rail_state: bool) -> str:
    """The bundle's method as the Python API decides it (noted when RAIL fusion is dropped)."""
    method = api.default_method(bundle, rail_state)
    if api.fusion_dropped(bundle, rail_state):
        status(
            f"note: without --rail-state, method {bundle.method} is not available in this "
            f"runtime; running {method}"
        )
    return method


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "capacity": args.capacity,
        "tau": args.tau,
        "lam": args.lam,
        "beta": args.beta,
        "eviction": args.eviction,
        "anchor_rule": args.anchor_rule,
    }


def _check_args(args: argparse.Namespace, method: str) -> None:
    if args.save_every < 0:
        raise UserError(f"--save-every must be 0 or more, got {args.save_every}")
    if args.max_frames is not None and args.max_frames < 1:
        raise UserError(f"--max-frames must be at least 1, got {args.max_frames}")
    if args.annotate_fate and not args.save_annotated:
        raise UserError("--annotate-fate needs --save-annotated PATH")
    stages = METHOD_STAGES[method]
    if not stages.tca:
        given = [f"--{k.replace('_', '-')}" for k, v in _overrides(args).items() if v is not None]
        given += ["--state"] if args.state else []
        if given:
            raise UserError(f"{', '.join(given)} need --method tca or tca+rail (running {method})")
    if stages.fusion and not args.rail_state:
        raise UserError(f"method {method} needs --rail-state FILE (a state from vlm-edge learn)")
    if args.rail_state and not stages.fusion:
        raise UserError(f"--rail-state needs --method rail or tca+rail (running {method})")


def _names(source: Source) -> list[str]:
    """Source names as the text format shows them (for its column width)."""
    if isinstance(source, ImageFiles):
        return [path.name for path in source.paths]
    return [short_name(str(getattr(source, "source_id", ""))) + "@0000.000s"]


def _save(pipeline: Pipeline, path: str) -> None:
    pipeline.save_state(path)
    reservoir = pipeline.reservoir
    entries = int(reservoir.counts().sum()) if reservoir else 0
    status(f"state saved to {path} ({entries} reservoir entries)")


def _open_backend(bundle: Bundle, args: argparse.Namespace) -> tuple[Any, BudgetRun | None]:
    """The engine, or a ladder bundle's rungs (each record then carries its drop rate), started
    for --target-ms and switched by --adapt-budget."""
    precision = getattr(args, "precision", None)
    if not runs_ladder(
        bundle, args.backend, precision, args.target_ms, args.adapt_budget, args.measure
    ):
        return open_engine(bundle, args), None
    providers = args.providers.split(",") if args.providers else None
    return open_budgeted(
        bundle,
        args.backend,
        providers,
        capped_threads(args.threads),
        getattr(args, "precision", None),
        target_ms=args.target_ms,
        adapt=bool(args.adapt_budget),
        measure_first=bool(args.measure),
        allow_drift=bool(args.allow_drift),
    )


def handle(args: argparse.Namespace) -> int:
    """Run the pipeline over the source; return the exit status."""
    if args.out:
        check_can_create(args.out)  # before the bundle and engine load, not after
    reading = source_options(args)
    check_min_score(args.min_score)
    bundle = Bundle.open(args.bundle, verify=verify_mode(args))
    if args.classes:
        if len(bundle.domains) != 1:  # new_labels would ask for --domain, which run lacks
            raise UserError(
                f"run --classes replaces the classes of a one-domain bundle; this bundle has "
                f"{len(bundle.domains)} domains: change one with vlm-edge classes BUNDLE FILE "
                "--domain NAME, then run the bundle"
            )
        space = compute_label_space(bundle, args.classes, args.templates, None, args.text_backend)
        bundle = bundle.with_classes(space.labels, space.text_embeddings, space.domains)
        status(f"{len(space.labels)} classes from {args.classes} ({space.embedded} embedded)")
    elif args.templates:
        raise UserError("--templates needs --classes FILE")
    method = args.method or default_method(bundle, bool(args.rail_state))
    _check_args(args, method)
    reservoir = fusion = None
    if METHOD_STAGES[method].tca:
        resumed = bool(args.state) and Path(args.state).exists()
        reservoir = build_reservoir(bundle, _overrides(args), args.state)
        if resumed:
            status(f"resumed state {args.state} ({int(reservoir.counts().sum())} entries)")
            if reservoir.dropped_entries:
                status(
                    f"dropped {reservoir.dropped_entries} reservoir entries of classes the "
                    "bundle no longer has"
                )
    if args.rail_state:
        fusion = open_fusion(args.rail_state, bundle)
        status(f"RAIL state {args.rail_state}: {describe(fusion.adapter)}")
    fmt = choose_format(args.format, args.out, sys.stdout)
    # ``signals`` is left last: stop signals stay handled until the state is saved and closed
    with contextlib.ExitStack() as signals, contextlib.ExitStack() as stack:
        source = stack.enter_context(open_source(args.source, reading))
        annotated = None
        if args.save_annotated:  # before the capture thread: it reads the source's kind and fps
            annotated = AnnotatedOutput(
                args.save_annotated, source, bundle, args.annotate_fate, args.crop
            )
            stack.enter_context(annotated)
        names = _names(source)
        if source.live:
            source = stack.enter_context(NewestFrame(source))
        window = Window() if args.show else None  # a headless OpenCV says so before the run
        if window is not None:
            stack.callback(window.close)
        backend, budget = _open_backend(bundle, args)
        stack.callback(backend.close)
        pipeline = Pipeline(
            bundle, backend, method, reservoir, fusion, args.topk, args.min_score, args.crop
        )
        pipeline.preprocessor.max_pixels = args.max_pixels
        writer = open_writer(fmt, stack.enter_context(open_output(args.out)), names, bundle.classes)
        status(
            f"{method} on {backend.description}; {source.description}; crop "
            f"{pipeline.preprocessor.crop}"
        )
        for note in getattr(backend, "notes", ()):  # e.g. TensorRT engines for other devices
            status(f"note: {note}")
        if budget is not None:
            status(f"budget: {budget.reason}")
        progress = not args.quiet and sys.stderr.isatty() and fmt == "jsonl"
        stats = RunStats(source.total, progress=progress)
        stop = StopRequest()
        signals.enter_context(stop_on_signals(stop))
        try:
            process_all(pipeline, source, writer, stats, args, stop, window, annotated, budget)
        except KeyboardInterrupt:
            stop.ending, stop.code = "interrupted (Ctrl-C)", 130
        finally:
            live_line.finish()  # the last count stays on the screen, the lines below it
            if args.state and pipeline.reservoir is not None:
                if stop.forced:
                    status(f"forced stop: {args.state} keeps its last periodic save")
                else:
                    _save(pipeline, args.state)
            if not stop.forced:
                with contextlib.suppress(OSError):  # a closed pipe: said once, by the caller
                    writer.finish()
            for line in stats.summary():
                status(line)
            if isinstance(source, NewestFrame) and source.dropped:
                status(f"{source.dropped} stale frames dropped to stay real-time (newest first)")
    if stop.ending:
        status(stop.ending)
    if stats.frames and stats.frames == stats.errors:
        status("error: no frame could be read")
        return 1
    return stop.code
