"""``vlm-edge eval BUNDLE DATA_ROOT --order D1,D2,...``: the X-TAIL protocol on the device.

DATA_ROOT holds one folder per domain: ``DATA_ROOT/<domain>/train/<class>/`` and
``.../test/<class>/``, or, without that split, ``DATA_ROOT/<domain>/<class>/`` whose first --shots
images per class (file-name order) train and the rest test. Domains are learned in --order, one
after another, and after every step each domain's test set is classified over the bundle's whole
label space: the full accuracy table (future domains included) for zero-shot and for each RAIL
form, with Transfer, Average and Last (spec/rail.md section 1).

With ``--rail-state FILE`` (a learner or inference state of ``learn`` or ``merge``) nothing is
learned: the state and zero-shot are tested on each domain's test images, one row each.

Every image is embedded once: training images by the plain tower (no anchors), test images by the
base method, ``zeroshot`` or ``tca`` (a fresh TCA reservoir per test domain, images in file-name
order). The features are kept in memory and shared by all forms.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from os.path import realpath
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.atomic import atomic_file, atomic_write_bytes, check_can_create
from vlm_export.core.errors import UserError
from vlm_export.core.json_text import dumps
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.commands import (
    BUNDLE,
    OUT,
    READ,
    add_engine_arguments,
    media_tree,
    open_engine,
    status,
    verify_mode,
)
from vlm_export.runtime.commands._rail import (
    add_primal_arguments,
    add_shots_argument,
    check_shots,
    learner_options,
    show_progress,
)
from vlm_export.runtime.draw.heatmap import heatmap
from vlm_export.runtime.draw.style import stack, text_block
from vlm_export.runtime.engines.base import EngineBackend
from vlm_export.runtime.pipeline import METHOD_STAGES, Pipeline
from vlm_export.runtime.rail.dataset import DomainData, domain_data, read_layout
from vlm_export.runtime.rail.embed import embed_images
from vlm_export.runtime.rail.fusion import RailFusion, fuse
from vlm_export.runtime.rail.models import (
    FORMS,
    LearnerOptions,
    check_options,
    describe,
    fusion_beta,
    new_learner,
    open_fusion,
)
from vlm_export.runtime.rail.xtail import accuracy, run_xtail, xtail_metrics

BASES = ("zeroshot", "tca")
METRICS = ("transfer", "average", "last")

TrainSet = list[tuple[np.ndarray, np.ndarray]]
TestSet = list[tuple[np.ndarray, np.ndarray, np.ndarray]]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand."""
    parser = subparsers.add_parser(
        "eval",
        help="X-TAIL evaluation: learn domains in order, test on all after each step",
        description="Run the X-TAIL protocol over DATA_ROOT/<domain>/{train,test}/<class>/ (or "
        "DATA_ROOT/<domain>/<class>/, split by --shots; for one domain DATA_ROOT may be its "
        "folder): the full accuracy table and Transfer, Average, Last for zero-shot and RAIL. "
        "With --rail-state: that state's accuracy on each domain, learning nothing.",
    )
    parser.add_argument(
        "bundle", type=BUNDLE, metavar="BUNDLE", help="bundle folder written by vlm-export"
    )
    parser.add_argument(
        "data_root",
        type=media_tree(4),
        metavar="DATA_ROOT",
        help="one folder per domain (see the description)",
    )
    parser.add_argument(
        "--order", required=True, metavar="D1,D2,...", help="the domains in learning order"
    )
    add_shots_argument(parser, "every training image; needs train/ and test/ folders")
    parser.add_argument(
        "--test-per-class", type=int, metavar="N", help="test on the first N images per class"
    )
    parser.add_argument(
        "--form", choices=(*FORMS, "both"), help="RAIL form(s) to learn (default both)"
    )
    parser.add_argument(
        "--rail-state",
        type=READ,
        metavar="FILE",
        help="evaluate this learner or inference state (vlm-edge learn, merge) on the test "
        "images instead of learning the domains in order",
    )
    parser.add_argument(
        "--method",
        choices=BASES,
        help="the stages before fusion: zeroshot, or tca (test logits corrected by TCA, as in "
        "tca+rail); default: the bundle's",
    )
    parser.add_argument("--json", type=OUT, metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--plot",
        type=OUT,
        metavar="FILE",
        help="also draw the accuracy tables as heatmaps with their metrics (a .png file)",
    )
    add_primal_arguments(parser)
    add_engine_arguments(parser)
    return parser


def _order(bundle: Bundle, text: str) -> list[str]:
    order = [name.strip() for name in text.split(",") if name.strip()]
    if not order:
        raise UserError("--order names no domain")
    repeated = sorted({name for name in order if order.count(name) > 1})
    if repeated:
        raise UserError(f"--order names {', '.join(repeated)} more than once")
    for name in order:
        bundle.domain_class_indices(name)
    return order


def _embed(
    bundle: Bundle,
    backend: EngineBackend,
    data: list[DomainData],
    base: str,
    progress: bool,
    max_pixels: int | None,
    learn: bool = True,
) -> tuple[TrainSet, TestSet]:
    """Training features (plain tower; none unless ``learn``) and test features and logits (base
    method), per domain."""
    plain = Pipeline(bundle, backend, "zeroshot")
    plain.preprocessor.max_pixels = max_pixels
    paths = [path for domain in data for path in domain.train.paths] if learn else []
    features, _ = embed_images(plain, paths, "training images", progress)
    bounds = np.cumsum([0] + [len(domain.train) if learn else 0 for domain in data])
    train = [
        (features[start:stop], domain.train.labels)
        for domain, start, stop in zip(data, bounds[:-1], bounds[1:], strict=True)
    ]
    test = []
    for domain in data:
        pipeline = plain if base == "zeroshot" else Pipeline(bundle, backend, "tca")
        pipeline.preprocessor.max_pixels = max_pixels
        what = f"test images of {domain.name}"
        test_features, logits = embed_images(pipeline, domain.test.paths, what, progress)
        test.append((test_features, logits, domain.test.labels))
    return train, test


def _result(table: np.ndarray, **settings: Any) -> dict[str, Any]:
    return {"table": table.tolist(), **xtail_metrics(table), **settings}


def evaluate(
    bundle: Bundle, train: TrainSet, test: TestSet, forms: list[str], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Accuracy tables and metrics for zero-shot and each RAIL form."""
    beta = fusion_beta(bundle.manifest)
    results = {"zeroshot": _result(run_xtail(train, test))}
    for form in forms:
        options = learner_options(args, form) if form == "primal" else LearnerOptions(form)
        learner = new_learner(bundle, form, options)
        if form == "primal":
            settings = {"hidden_dim": learner.hidden_dim, "ridge": learner.ridge}
            settings.update(seed=learner.seed, route=learner.route)
        else:
            settings = {"gamma": learner.gamma, "ridge": learner.ridge}
        start = time.perf_counter()
        results[form] = _result(run_xtail(train, test, learner, beta), beta=beta, **settings)
        status(f"{form}: {len(train)} learning steps in {time.perf_counter() - start:.1f} s")
    return results


def evaluate_state(test: TestSet, fusion: RailFusion) -> dict[str, dict[str, Any]]:
    """Accuracy on each domain of zero-shot and of a RAIL state's ``fusion`` (nothing learned)."""
    zeroshot, rail = [], []
    for features, logits, labels in test:
        zeroshot.append(accuracy(logits, labels))
        adapter = fusion.adapter.predict(features)
        rail.append(
            accuracy(fuse(logits, adapter, fusion.adapter.learned_mask, fusion.beta), labels)
        )
    return {
        "zeroshot": {"accuracy": zeroshot, "average": float(np.mean(zeroshot))},
        "rail": {"accuracy": rail, "average": float(np.mean(rail)), "beta": fusion.beta},
    }


def state_lines(order: list[str], results: dict[str, dict[str, Any]], path: str) -> list[str]:
    """The accuracy of each method (rows) on each domain (columns) and its average, in %."""
    width = max(10, *(len(name) + 2 for name in order))
    lines = [f"accuracy (%) on each domain (columns) of zero-shot and of {path} (nothing learned)"]
    lines += ["", f"{'method':<12}" + "".join(f"{n:>{width}}" for n in [*order, "Average"])]
    for method, result in results.items():
        values = [*result["accuracy"], result["average"]]
        lines.append(f"{method:<12}" + "".join(f"{_percent(v):>{width}}" for v in values))
    return lines


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def report_lines(order: list[str], results: dict[str, dict[str, Any]]) -> list[str]:
    """The tables (accuracy in %, a row per learning step, a column per domain) and metrics."""
    width = max(10, *(len(name) + 2 for name in order))
    label = max(len(f"{len(order)} after {name}") for name in order) + 4
    lines = ["accuracy (%) on each domain (columns) after each learning step (rows)"]
    for method, result in results.items():
        lines += ["", f"{method:<{label}}" + "".join(f"{name:>{width}}" for name in order)]
        for step, row in enumerate(result["table"]):
            name = f"{step + 1} after {order[step]}"
            lines.append(f"  {name:<{label - 2}}" + "".join(f"{_percent(v):>{width}}" for v in row))
    lines += ["", f"{'method':<{label}}" + "".join(f"{m.title():>{width}}" for m in METRICS)]
    for method, result in results.items():
        values = "".join(f"{_percent(result[m]):>{width}}" for m in METRICS)
        lines.append(f"{method:<{label}}{values}")
    return lines


def plot(order: list[str], results: dict[str, dict[str, Any]], path: str) -> None:
    """Write the accuracy tables side by side as heatmaps, each with its metrics, as a PNG."""
    rows = [f"{step + 1} after {name}" for step, name in enumerate(order)]
    maps = []
    lines = [
        "X-TAIL accuracy (%) on each domain (columns) after each learning step (rows)",
        "above the diagonal: domains not learned yet",
    ]
    for method, result in results.items():
        if "table" not in result:  # --rail-state: one row per method, drawn together below
            continue
        note = ", ".join(f"{m.title()} {_percent(result[m])}" for m in METRICS)
        maps.append(heatmap(np.array(result["table"], dtype=float), rows, order, method, note))
    if not maps:
        table = np.array([result["accuracy"] for result in results.values()], dtype=float)
        averages = ", ".join(f"{m} {_percent(r['average'])}" for m, r in results.items())
        maps.append(heatmap(table, list(results), order, "RAIL state", f"Average: {averages}"))
        lines = ["accuracy (%) on each domain (columns) of zero-shot and the state (rows)"]
    title = text_block(lines, 16)
    figure = stack([title, stack(maps, vertical=False, gap=40)], vertical=True, gap=16, pad=16)
    with atomic_file(path) as handle:
        figure.save(handle, format="PNG")


def _check_plot(path: str, json_path: str | None, data_root: str) -> None:
    """--plot: a .png file that is not --json and not inside DATA_ROOT (read as data next time)."""
    if Path(path).suffix.lower() != ".png" or not Path(path).stem:
        raise UserError(f"--plot writes a PNG: give a file name ending in .png ({path!r})")
    real = Path(realpath(path))
    if json_path is not None and real == Path(realpath(json_path)):
        raise UserError(f"--plot and --json are the same file ({path}): give two names")
    if Path(realpath(data_root)) in real.parents:
        raise UserError(
            f"--plot {path} is inside DATA_ROOT: the next run would read it as an image; "
            "write it elsewhere"
        )
    check_can_create(path)


def handle(args: argparse.Namespace) -> int:
    """Embed, run the protocol for every form, print (and write) the results."""
    check_shots(args.shots)
    if args.test_per_class is not None and args.test_per_class < 1:
        raise UserError(f"--test-per-class must be at least 1, got {args.test_per_class}")
    if args.json:
        check_can_create(args.json)
    if args.plot is not None:
        _check_plot(args.plot, args.json, args.data_root)
    forms = list(FORMS) if args.form in (None, "both") else [args.form]
    if args.rail_state:
        names = ("form", "hidden_dim", "seed", "route")
        given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
        if given:
            raise UserError(f"--rail-state is learned already: {', '.join(given)} is for learning")
        forms = []
    if forms == ["dual"]:
        check_options(learner_options(args, "dual"), "dual")
    bundle = Bundle.open(args.bundle, verify=verify_mode(args))
    fusion = None
    if args.rail_state:  # read before the test set is embedded: a bad state fails at once
        fusion = open_fusion(args.rail_state, bundle)
        status(f"RAIL state {args.rail_state}: {describe(fusion.adapter)}")
    base = args.method or ("tca" if METHOD_STAGES[bundle.method].tca else "zeroshot")
    order = _order(bundle, args.order)
    layout = read_layout(bundle, Path(args.data_root), order)
    status(layout.describe())
    data = [domain_data(bundle, layout, name, args.shots, args.test_per_class) for name in order]
    if args.rail_state:
        status(f"testing {args.rail_state} on {', '.join(order)} without learning")
    else:
        status(f"learning {', '.join(order)} in order ({', '.join(forms)}), testing after each")
    learn = not args.rail_state
    with contextlib.ExitStack() as stack:
        backend = open_engine(bundle, args)
        stack.callback(backend.close)
        start = time.perf_counter()
        progress = show_progress(args)
        train, test = _embed(bundle, backend, data, base, progress, args.max_pixels, learn)
    images = sum((len(d.train) if learn else 0) + len(d.test) for d in data)
    status(
        f"embedded {images} images on {backend.description} in {time.perf_counter() - start:.1f} s"
        f" (base {base})"
    )
    if fusion is not None:
        results = evaluate_state(test, fusion)
        print("\n".join(state_lines(order, results, args.rail_state)), flush=True)
    else:
        results = evaluate(bundle, train, test, forms, args)
        print("\n".join(report_lines(order, results)), flush=True)
    if args.json:
        document = {
            "bundle": {"path": str(bundle.path), "fingerprint": bundle.fingerprint},
            "order": order,
            "shots": args.shots,
            "test_per_class": args.test_per_class,
            "base": base,
            "rail_state": args.rail_state,
            "domains": [
                {
                    "name": d.name,
                    "split": "folders" if d.split else "shots",
                    "classes": [bundle.classes[i] for i in d.train.classes],
                    "train_images": len(d.train),
                    "test_images": len(d.test),
                }
                for d in data
            ],
            "results": results,
        }
        atomic_write_bytes(args.json, (dumps(document, indent=2) + "\n").encode())
        status(f"results written to {args.json}")
    if args.plot:
        plot(order, results, args.plot)
        status(f"accuracy heatmaps drawn in {args.plot}")
    return 0
