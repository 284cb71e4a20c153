"""``vlm-edge eval-tta BUNDLE DATA_DIR``: the TCA paper's test-time protocol on a labelled set.

The test images stream at batch 1 in a seeded random order, the same for every method: zero-shot
and TCA on the bundle's condensing engine, and with ``--baseline FULL_BUNDLE`` zero-shot on the
full tower. Reported per method: top-1 accuracy, expected calibration error (15 equal-width bins),
per-class accuracy, the engine's GFLOPs and frames per second. ``--state`` saves the stream every
``--save-every`` images and on Ctrl-C, and resumes it: the resumed run decides exactly as an
uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core import live_line
from vlm_export.core.atomic import atomic_write_bytes, check_can_create
from vlm_export.core.errors import UserError
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.commands import (
    BUNDLE,
    OUT,
    STATE,
    add_crop_argument,
    add_engine_arguments,
    media_tree,
    open_engine,
    status,
    stop_signals,
    verify_mode,
)
from vlm_export.runtime.commands._rail import show_progress
from vlm_export.runtime.datasets.layouts import EvalSet, joined, load_test_set
from vlm_export.runtime.datasets.registry import DatasetSpec, dataset_names, get_dataset
from vlm_export.runtime.draw.reliability import reliability_diagram
from vlm_export.runtime.evaluation import UNREADABLE, EvalStream, MethodStream, stream_order
from vlm_export.runtime.pipeline import METHOD_STAGES, Pipeline
from vlm_export.runtime.rail.dataset import read_layout
from vlm_export.runtime.tca.calibration import (
    ECE_BINS,
    expected_calibration_error,
    per_class_accuracy,
    reliability_bins,
)

TITLES = {"baseline": "zero-shot (full tower)", "zeroshot": "zero-shot", "tca": "TCA"}


def _seed(text: str) -> int:
    """--seed: a whole number >= 0 (NumPy's generators take no negative seed)."""
    if not (text.isascii() and text.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text[:40]!r}")
    return int(text)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval-tta`` subcommand."""
    parser = subparsers.add_parser(
        "eval-tta",
        help="test-time adaptation protocol: zero-shot vs TCA on a labelled test set",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundle", type=BUNDLE, help="a condensing (tca) bundle")
    parser.add_argument(
        "data",
        type=media_tree(4),
        help="test set: class-per-folder (DATA/<class>/<images>), one folder per domain "
        "(DATA/<domain>/<class>/<images>) or a --dataset layout",
    )
    parser.add_argument(
        "--dataset",
        help=f"map a paper dataset's usual layout to its classes ({', '.join(dataset_names())})",
    )
    parser.add_argument(
        "--seed", type=_seed, default=1, help="seed of the stream order, >= 0 (default 1)"
    )
    parser.add_argument(
        "--baseline", type=BUNDLE, help="a full-tower bundle of the same classes: zero-shot"
    )
    parser.add_argument("--limit", type=int, help="stream only the first N images of the order")
    parser.add_argument(
        "--ignore-unknown",
        action="store_true",
        help="leave out classes the bundle does not have (default: refuse)",
    )
    parser.add_argument("--json", type=OUT, help="write the results as JSON here")
    parser.add_argument("--plot", type=OUT, help="write a reliability diagram (PNG) here")
    parser.add_argument("--per-class", action="store_true", help="print per-class accuracy")
    parser.add_argument("--state", type=STATE, help="save progress here and resume from it")
    parser.add_argument(
        "--save-every", type=int, default=200, help="save --state every N images (default 200)"
    )
    add_crop_argument(parser)
    add_engine_arguments(parser)
    return parser


def _check_outputs(args: argparse.Namespace) -> None:
    if args.save_every < 1:
        raise UserError(f"--save-every must be at least 1, got {args.save_every}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    for path in (args.json, args.plot, args.state):
        if path:
            check_can_create(path)


def _open_bundles(args: argparse.Namespace) -> tuple[Bundle, Bundle | None]:
    bundle = Bundle.open(args.bundle, verify=verify_mode(args))
    if not METHOD_STAGES[bundle.method].tca:
        raise UserError(
            f"eval-tta compares zero-shot with TCA on one engine: {args.bundle} has no token "
            f"condensation (method {bundle.method}); export it with --method tca, and pass a "
            "full-tower bundle as --baseline"
        )
    baseline = None
    if args.baseline:
        baseline = Bundle.open(args.baseline, verify=verify_mode(args))
        if METHOD_STAGES[baseline.method].tca:
            raise UserError(
                f"--baseline {args.baseline} condenses tokens (method {baseline.method}): give a "
                "full-tower bundle (exported with --method zeroshot)"
            )
        if list(baseline.classes) != list(bundle.classes):
            raise UserError(
                f"--baseline {args.baseline} has other classes than {args.bundle} "
                f"({baseline.num_classes} vs {bundle.num_classes}); export both with one list"
            )
    return bundle, baseline


def _test_set(args: argparse.Namespace, bundle: Bundle, dataset: DatasetSpec | None) -> EvalSet:
    """The labelled test images: of every domain folder (DATA/<domain>/<class>/), or of DATA."""
    root = Path(args.data)
    if dataset is not None:  # the dataset's own layout
        return load_test_set(bundle, root, dataset, args.ignore_unknown)
    layout = read_layout(bundle, root, bundle.domains)
    status(layout.describe())
    folders = list(layout.folders.values()) or [root]
    return joined([load_test_set(bundle, f, None, args.ignore_unknown) for f in folders])


def _gflops(bundle: Bundle) -> float | None:
    flops = bundle.manifest.get("flops") or {}
    value = flops.get("condensed_gflops") or flops.get("full_gflops")
    return float(value) if value is not None else None


def summarize(stream: EvalStream, bundles: dict[str, Bundle]) -> dict[str, Any]:
    """Per method: accuracy, ECE, per-class accuracy, GFLOPs and fps over the readable images."""
    done = stream.position
    labels = stream.labels[stream.order[:done]]
    readable = np.all([m.predictions[:done] != UNREADABLE for m in stream.methods], axis=0)
    results: dict[str, Any] = {}
    for method in stream.methods:
        predicted = method.predictions[:done][readable]
        truth = labels[readable]
        correct = predicted == truth
        confidence = method.confidences[:done][readable]
        bins = reliability_bins(confidence, correct)
        bundle = bundles[method.name]
        results[method.name] = {
            "title": TITLES[method.name],
            "images": int(readable.sum()),
            "top1": float(correct.mean()) if correct.size else None,
            "ece": expected_calibration_error(confidence, correct) if correct.size else None,
            "gflops": _gflops(bundle),
            "fps": float(readable.sum() / method.seconds) if method.seconds else None,
            "per_class": {
                bundle.classes[c]: acc for c, acc in per_class_accuracy(truth, predicted).items()
            },
            "reliability": {
                "edges": bins.edges.tolist(),
                "counts": bins.counts.tolist(),
                "confidence": [None if np.isnan(v) else float(v) for v in bins.confidence],
                "accuracy": [None if np.isnan(v) else float(v) for v in bins.accuracy],
            },
        }
    return results


def report_lines(results: dict[str, Any], per_class: bool) -> list[str]:
    """The comparison table (and per-class accuracy when asked)."""
    lines = [f"{'method':<24}{'top-1 %':>9}{'ECE %':>8}{'GFLOPs':>9}{'fps':>8}"]
    for result in results.values():
        top1 = "-" if result["top1"] is None else f"{100 * result['top1']:.2f}"
        ece = "-" if result["ece"] is None else f"{100 * result['ece']:.2f}"
        gflops = "-" if result["gflops"] is None else f"{result['gflops']:.2f}"
        fps = "-" if result["fps"] is None else f"{result['fps']:.1f}"
        lines.append(f"{result['title']:<24}{top1:>9}{ece:>8}{gflops:>9}{fps:>8}")
    if per_class:
        names = list(next(iter(results.values()))["per_class"])
        width = max(12, *(len(n) + 2 for n in names))
        heads = "".join(f"{r['title'][:14]:>16}" for r in results.values())
        lines += ["", f"{'class':<{width}}{heads}"]
        for name in names:
            row = "".join(f"{100 * r['per_class'][name]:>16.1f}" for r in results.values())
            lines.append(f"{name:<{width}}{row}")
    return lines


class _SaveOnSignal:
    """SIGINT / SIGTERM / SIGHUP (unless ignored: nohup) stop the stream between images (the
    state is then saved)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __bool__(self) -> bool:
        return self.signal is not None


def _stream(
    args: argparse.Namespace,
    test: EvalSet,
    bundle: Bundle,
    baseline: Bundle | None,
    stack: contextlib.ExitStack,
) -> EvalStream:
    order = stream_order(len(test), args.seed)[: args.limit]
    methods = []
    for name, which, method in (
        ("baseline", baseline, "zeroshot"),
        ("zeroshot", bundle, "zeroshot"),
        ("tca", bundle, "tca"),
    ):
        if which is None:
            continue
        backend = open_engine(which, args)  # one engine each: TCA's anchors are its own
        stack.callback(backend.close)
        pipeline = Pipeline(which, backend, method, crop=args.crop)
        methods.append(MethodStream.start(name, pipeline, len(order)))
    return EvalStream(test.paths, test.labels, order, methods)


def handle(args: argparse.Namespace) -> int:
    """Stream the test set through every method, print (and write) the comparison."""
    _check_outputs(args)
    dataset = get_dataset(args.dataset) if args.dataset else None
    bundle, baseline = _open_bundles(args)
    test = _test_set(args, bundle, dataset)
    if test.unknown:
        status(
            f"left out {len(test.unknown)} classes the bundle does not have: "
            f"{', '.join(test.unknown[:10])}"
        )
    if test.empty:
        status(f"{len(test.empty)} classes have no images: {', '.join(test.empty[:10])}")
    bundles = {"baseline": baseline, "zeroshot": bundle, "tca": bundle}
    stop = _SaveOnSignal()
    with contextlib.ExitStack() as stack:
        stream = _stream(args, test, bundle, baseline, stack)
        if args.state and Path(args.state).exists():
            stream.resume(args.state, bundle.fingerprint)
            status(f"resumed {args.state} at image {stream.position} of {len(stream.order)}")
        for signum in stop_signals():
            previous = signal.signal(signum, stop)
            stack.callback(signal.signal, signum, previous)
        progress = _progress_line if show_progress(args) else None
        while stream.position < len(stream.order) and not stop:
            stream.run(stream.position + args.save_every, progress, lambda: bool(stop))
            if args.state:
                stream.save(args.state, bundle.fingerprint)
        live_line.finish()
    if stop:
        where = f"; resume with --state {args.state}" if args.state else ""
        status(f"stopped at image {stream.position} of {len(stream.order)}{where}")
    results = summarize(stream, bundles)
    errors = len(stream.errors)
    print(
        f"{stream.position} images, {errors} unreadable, {bundle.num_classes} classes, "
        f"seed {args.seed}",
        flush=True,
    )
    print("\n".join(report_lines(results, args.per_class)), flush=True)
    for position, message in stream.errors[:5]:
        status(f"image {position}: {message}")
    if stream.position and len(stream.errors) == stream.position:
        status("error: no test image could be read")
        return 1
    if stop:  # results of part of the set would pass for the whole: --json and --plot wait
        if args.json or args.plot:
            status("--json and --plot are written when the whole test set is done")
        return 130 if stop.signal == signal.SIGINT else 0
    _write_outputs(args, stream, results, bundle)
    return 0


def _progress_line(done: int, total: int) -> None:
    live_line.draw(f"{done}/{total} images")


def _write_outputs(
    args: argparse.Namespace, stream: EvalStream, results: dict[str, Any], bundle: Bundle
) -> None:
    if args.json:
        document = {
            "bundle": {"path": str(bundle.path), "fingerprint": bundle.fingerprint},
            "data": str(args.data),
            "dataset": args.dataset,
            "seed": args.seed,
            "crop": stream.methods[0].pipeline.preprocessor.crop,
            "images": stream.position,
            "unreadable": [{"position": p, "error": m} for p, m in stream.errors],
            "ece_bins": ECE_BINS,
            "results": results,
        }
        text = json.dumps(document, indent=2, allow_nan=False) + "\n"
        atomic_write_bytes(args.json, text.encode())
        status(f"results written to {args.json}")
    if args.plot:
        buffer = io.BytesIO()
        reliability_diagram(results).save(buffer, format="PNG")
        atomic_write_bytes(args.plot, buffer.getvalue())
        status(f"reliability diagram written to {args.plot}")
