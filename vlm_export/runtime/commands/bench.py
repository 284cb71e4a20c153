"""``vlm-edge bench BUNDLE``: every available backend and precision on this device, side by side.

Per engine: batch-1 latency (median and p90 over interleaved rounds after warm-up), parity with
the fp32 ONNX Runtime CPU reference (embedding cosine, token-fate agreement) on a few images
(synthetic unless ``--images DIR``), and the resident memory it added while opening and running.
Engines that cannot run here (backend not installed, no bf16 on this CPU, no INT8 graph in the
bundle, no TensorRT) are listed with the reason. The results are printed as a table, optionally
written as JSON, and recorded beside the bundle as ``bench.<device>.json``, from which
``--backend auto`` later takes the fastest engine that passed parity.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
from datetime import datetime, timezone
from typing import Any

import numpy as np

from vlm_export.core.atomic import WriteError, atomic_write_bytes
from vlm_export.core.errors import UserError
from vlm_export.core.manifest import IMAGE_INPUT
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.commands import (
    BUNDLE,
    OUT,
    SOURCE,
    add_drift_argument,
    add_verify_arguments,
    status,
    verify_mode,
)
from vlm_export.runtime.engines.checks import measure
from vlm_export.runtime.engines.checks.bench_record import (
    RECORD_FORMAT,
    device_description,
    device_fingerprint,
    write_record,
)
from vlm_export.runtime.engines.checks.parity import REFERENCE_PROVIDERS
from vlm_export.runtime.engines.factory import BACKEND_PRECISIONS, capped_threads, open_backend
from vlm_export.runtime.engines.ladder.ladder import ladder_rungs, open_ladder, tensorrt_rungs_built
from vlm_export.runtime.io.preprocess import Preprocessor
from vlm_export.runtime.io.sources import open_source

DEFAULT_BACKENDS = ("onnxruntime", "openvino", "tensorrt", "ncnn", "litert")
#: backends bench runs only when named (--backends): rknn needs a Rockchip board
NAMED_BACKENDS = (*DEFAULT_BACKENDS, "rknn")
DEFAULT_PRECISIONS = ("fp32", "bf16", "fp16", "int8")
#: runs of each ladder rung in a row before any rung is timed (lazy allocations, caches)
RUNG_WARM_RUNS = 2
#: the most rounds (timed or warm-up) bench takes: 10,000 rounds of ViT-B/16 on a CPU are hours
MAX_ROUNDS = 10_000


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand."""
    parser = subparsers.add_parser(
        "bench",
        help="compare backends and precisions on this device (latency, parity, memory)",
        description="Run every available backend and precision on this device: batch-1 latency "
        "(median and p90 over interleaved rounds), parity with fp32 ONNX Runtime (embedding "
        "cosine, token-fate agreement) and added memory. The results are recorded beside the "
        "bundle (bench.<device>.json); --backend auto then uses the fastest engine that passed.",
    )
    parser.add_argument("bundle", type=BUNDLE, help="bundle folder written by vlm-export")
    parser.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help=f"comma-separated backends (default: {','.join(DEFAULT_BACKENDS)})",
    )
    parser.add_argument(
        "--precisions",
        default=",".join(DEFAULT_PRECISIONS),
        help="comma-separated precisions (default: all each backend has: onnxruntime fp32/int8, "
        "openvino fp32/bf16/int8, tensorrt the engine for this GPU, ncnn fp32, litert fp32)",
    )
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument(
        "--threads", type=int, help="inference threads (ONNX Runtime, OpenVINO, ncnn, LiteRT)"
    )
    parser.add_argument(
        "--images",
        type=SOURCE,
        help="image folder for the parity check (default: 3 synthetic images)",
    )
    parser.add_argument(
        "--baseline",
        type=BUNDLE,
        metavar="FULL_BUNDLE",
        help="a full-tower bundle of the same model (e.g. exported with --method zeroshot): its "
        "engines are timed in the same interleaved rounds, so the table shows what condensation "
        "buys on this device",
    )
    parser.add_argument("--json", type=OUT, metavar="FILE", help="also write the results here")
    parser.add_argument(
        "--no-record", action="store_true", help="do not record the results beside the bundle"
    )
    add_drift_argument(parser)
    add_verify_arguments(parser)
    return parser


def _names(text: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        shown = ", ".join(unknown) or repr(text)
        raise UserError(f"unknown {what} {shown} (choose from {', '.join(known)})")
    return names


def _images(bundle: Bundle, folder: str | None) -> tuple[list[np.ndarray], str]:
    if folder is None:
        return measure.synthetic_images(_image_shape(bundle), 3), "3 synthetic images"
    preprocess = Preprocessor.from_manifest(bundle.manifest)
    with open_source(folder) as source:
        paths = [frame.data for _, frame in zip(range(3), source, strict=False)]
    return [preprocess.from_path(path)[None] for path in paths], f"{len(paths)} images of {folder}"


def _candidates(backends: list[str], precisions: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for backend in backends:
        if backend == "tensorrt":
            pairs.append(("tensorrt", "engine"))
            continue
        pairs.extend((backend, p) for p in BACKEND_PRECISIONS[backend] if p in precisions)
    return pairs


def _open(bundle: Bundle, backend: str, precision: str, threads: int | None, drift: bool = False):
    if backend in ("tensorrt", "rknn"):  # their own engine file: no threads, one precision
        return open_backend(bundle, backend, allow_drift=drift)
    if backend == "onnxruntime":
        return open_backend(
            bundle,
            backend,
            list(REFERENCE_PROVIDERS),
            threads,
            precision=precision,
            allow_drift=drift,
        )
    return open_backend(bundle, backend, threads=threads, precision=precision, allow_drift=drift)


def open_baseline(bundle: Bundle, path: str, verify: str) -> Bundle:
    """The ``--baseline`` bundle: a full tower of ``bundle``'s model, or a one-line refusal."""
    baseline = Bundle.open(path, verify=verify)
    if baseline.manifest.get("condensation"):
        raise UserError(
            f"--baseline must be a full tower, but it condenses tokens ({baseline.method}); "
            "export one with --method zeroshot"
        )
    keys = ("name", "pretrained", "image_size", "patch_size", "width", "layers")
    ours, theirs = bundle.manifest["model"], baseline.manifest["model"]
    differ = [key for key in keys if ours.get(key) != theirs.get(key)]
    if differ:
        raise UserError(
            f"--baseline is another model ({', '.join(differ)} differ: "
            f"{str(theirs.get(differ[0]))[:80]} vs {str(ours.get(differ[0]))[:80]})"
        )
    return baseline


def _baseline_row(
    baseline: Bundle, backend: str, precision: str, threads: int | None, stack
) -> tuple[dict[str, Any], Any]:
    """A full-tower row (and its engine, or None when it cannot run here)."""
    row: dict[str, Any] = {"backend": backend, "precision": precision}
    watch = measure.MemoryWatch()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = _open(baseline, backend, precision, threads)
    except (UserError, RuntimeError) as exc:
        row["skipped"] = " ".join(str(exc).split())
        return row, None
    stack.callback(engine.close)
    engine.infer(measure.synthetic_images(_image_shape(baseline), 1)[0])
    watch.sample()
    row.update(engine=engine.description, memory_mb=watch.delta_mb)
    return row, engine


def _image_shape(bundle: Bundle) -> list[int]:
    return [int(v) for v in bundle.engine_io("inputs")[IMAGE_INPUT]["shape"]]


def measure_bundle(
    bundle: Bundle, args: argparse.Namespace, baseline: Bundle | None = None
) -> dict[str, Any]:
    """Open, check and time every requested engine; the record ``bench`` prints and keeps.

    With a full-tower ``baseline`` its engines (same backends and precisions) run in the same
    interleaved rounds; their rows go under ``baseline``, never among the results that
    ``--backend auto`` chooses from.
    """
    backends = _names(args.backends, NAMED_BACKENDS, "backend(s)")
    precisions = _names(args.precisions, DEFAULT_PRECISIONS, "precision(s)")
    if not 1 <= args.rounds <= MAX_ROUNDS or not 0 <= args.warmup <= MAX_ROUNDS:
        raise UserError(
            f"--rounds must be 1 to {MAX_ROUNDS:,} and --warmup 0 to {MAX_ROUNDS:,}, got "
            f"{args.rounds:,} and {args.warmup:,}"
        )
    threads = capped_threads(args.threads)
    images, image_text = _images(bundle, args.images)
    results: list[dict[str, Any]] = []
    full_rows: list[dict[str, Any]] = []
    runners: dict[Any, Any] = {}
    with contextlib.ExitStack() as stack:
        watch = measure.MemoryWatch()
        reference = open_backend(
            bundle,
            "onnxruntime",
            list(REFERENCE_PROVIDERS),
            threads,
            precision="fp32",
            allow_drift=args.allow_drift,
        )
        stack.callback(reference.close)
        cases = measure.reference_runs(reference, images, bundle.manifest)
        watch.sample()
        for backend, precision in _candidates(backends, precisions):
            row: dict[str, Any] = {"backend": backend, "precision": precision}
            results.append(row)
            if (backend, precision) == ("onnxruntime", "fp32"):
                engine, row["memory_mb"] = reference, watch.delta_mb
            else:
                watch = measure.MemoryWatch()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        engine = _open(bundle, backend, precision, threads, args.allow_drift)
                except (UserError, RuntimeError) as exc:
                    row.update(passed=False, skipped=" ".join(str(exc).split()))
                    continue
                stack.callback(engine.close)
            row["engine"] = engine.description
            row.update(measure.parity(engine, cases, precision))
            watch.sample()
            row.setdefault("memory_mb", watch.delta_mb)
            runners[len(results) - 1] = lambda e=engine: e.infer(images[0])
            if baseline is not None:
                full, full_engine = _baseline_row(baseline, backend, precision, threads, stack)
                full_rows.append(full)
                if full_engine is not None:
                    key = ("baseline", len(full_rows) - 1)
                    runners[key] = lambda e=full_engine: e.infer(images[0])
        timings = measure.interleaved_latency(runners, args.rounds, args.warmup)
    for key, timing in timings.items():
        if isinstance(key, tuple):
            full_rows[key[1]].update(timing)
        else:
            results[key].update(timing)
    ladder = _measure_rungs(bundle, args, threads, backends, precisions, images[0])
    return {
        "format": RECORD_FORMAT,
        "bundle": bundle.fingerprint,
        "engine": bundle.engine_fingerprint,
        "model": bundle.manifest["model"]["name"],
        "method": bundle.method,
        "device_fingerprint": device_fingerprint(),
        "device": device_description(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "threads": threads,
        "images": image_text,
        "reference": "onnxruntime CPU fp32",
        "results": results,
        **({"ladder": ladder} if ladder else {}),
        **(
            {"baseline": {"bundle": baseline.fingerprint, "rows": full_rows}}
            if baseline is not None
            else {}
        ),
    }


def _measure_rungs(
    bundle: Bundle,
    args: argparse.Namespace,
    threads: int | None,
    backends: list[str],
    precisions: list[str],
    image: np.ndarray,
) -> list[dict[str, Any]]:
    """A ladder bundle: every rung timed on ONNX Runtime and OpenVINO in every precision its
    rungs run (fp32; int8 with INT8 rungs; OpenVINO bf16 where it runs) and on TensorRT where
    build-engine built every rung, each rung warmed
    (``RUNG_WARM_RUNS`` runs in a row) before any is timed, then timed in interleaved rounds
    across rungs and backends, so that a rung's record is its own latency, not a cold start."""
    rungs = ladder_rungs(bundle.manifest)
    if not rungs:
        return []
    rows: list[dict[str, Any]] = []
    runners = {}
    with contextlib.ExitStack() as stack:
        for backend, precision in _candidates(backends, precisions):
            if backend == "tensorrt":
                if not tensorrt_rungs_built(bundle.manifest, len(rungs)):
                    continue
            elif backend not in ("onnxruntime", "openvino") or precision == "fp16":
                continue
            if precision == "int8" and not all(rung.int8 for rung in rungs):
                continue
            watch = measure.MemoryWatch()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ladder = open_ladder(
                        bundle,
                        backend,
                        threads=threads,
                        precision=precision,
                        allow_drift=args.allow_drift,
                    )
            except (UserError, RuntimeError):
                continue
            stack.callback(ladder.close)
            for rung, engine in zip(rungs, ladder.engines, strict=True):
                engine.infer(image)
                watch.sample()
                runners[len(rows)] = lambda e=engine: e.infer(image)
                rows.append(
                    {
                        "backend": backend,
                        "precision": precision,
                        "rung": rung.index,
                        "drop_rate": rung.drop_rate,
                        "tokens": rung.tokens,
                        "gflops": rung.gflops,
                    }
                )
            for row in rows[-len(rungs) :]:
                row["ladder_memory_mb"] = watch.delta_mb
                row["sharing"] = ladder.sharing
        timings = measure.interleaved_latency(
            runners, args.rounds, args.warmup, warm_each=RUNG_WARM_RUNS
        )
        for index, timing in timings.items():
            rows[index].update(timing)
    return rows


#: what a ladder's ``sharing`` means, as the bench prints it
SHARING_WORDS = {
    "prepacked": "the rungs share one packed copy of the weights",
    "mapped": "the rungs share the mapped weights, each packs its own",
    "per-rung": "every rung holds its own weights",
}


def rung_table(record: dict[str, Any]) -> list[str]:
    """A ladder bundle's rung timings as aligned text lines, then the memory each backend's
    rungs took together and how they hold the weights (none for one engine)."""
    rows = record.get("ladder") or []
    if not rows:
        return []
    lines = [
        f"{'backend':<12} {'precision':<9} {'rung':>4} {'drop rate':>9} {'tokens':>6} "
        f"{'GFLOPs':>7} {'median ms':>9} {'p90 ms':>8}"
    ]
    for row in rows:
        lines.append(
            f"{row['backend']:<12} {row.get('precision', 'fp32'):<9} {row['rung']:>4} "
            f"{row['drop_rate']:>9g} {row['tokens']:>6} "
            f"{row['gflops']:>7.2f} {row['median_ms']:>9.1f} {row['p90_ms']:>8.1f}"
        )
    ladders = {(row["backend"], row.get("precision", "fp32")): row for row in rows}
    for (backend, precision), row in ladders.items():
        if "ladder_memory_mb" in row:
            how = SHARING_WORDS.get(str(row.get("sharing")), "")
            lines.append(
                f"{backend} {precision}: all rungs added {row['ladder_memory_mb']:.0f} MB resident"
                + (f" ({how})" if how else "")
            )
    return lines


def baseline_table(record: dict[str, Any]) -> list[str]:
    """The full tower's rows beside the condensed engine's, as aligned text lines."""
    rows = (record.get("baseline") or {}).get("rows") or []
    if not rows:
        return []
    condensed = {(r["backend"], r["precision"]): r for r in record["results"]}
    header = f"{'backend':<12} {'precision':<9} {'median ms':>9} {'p90 ms':>8} {'mem MB':>7}"
    lines = [f"{header}  result"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"{row['backend']:<12} {row['precision']:<9} skipped: {row['skipped']}")
            continue
        verdict = ""
        ours = condensed.get((row["backend"], row["precision"]), {})
        if ours.get("median_ms") and row["median_ms"]:
            verdict = f"condensed runs in {ours['median_ms'] / row['median_ms']:.2f}x its time"
        lines.append(
            f"{row['backend']:<12} {row['precision']:<9} {row['median_ms']:>9.1f} "
            f"{row['p90_ms']:>8.1f} {row['memory_mb']:>7.0f}  {verdict}"
        )
    return lines


def table(record: dict[str, Any]) -> list[str]:
    """The results as aligned text lines."""
    header = f"{'backend':<12} {'precision':<9} {'median ms':>9} {'p90 ms':>8} {'cosine min':>10} "
    header += f"{'fate agr':>8} {'mem MB':>7}  result"
    lines = [header]
    reference = next(
        (r for r in record["results"] if (r["backend"], r["precision"]) == ("onnxruntime", "fp32")),
        None,
    )
    for row in record["results"]:
        if "skipped" in row:
            lines.append(f"{row['backend']:<12} {row['precision']:<9} skipped: {row['skipped']}")
            continue
        fate = row.get("token_fate_agreement")
        verdict = "passed" if row["passed"] else f"FAILED (< {row['cosine_threshold']})"
        if reference and reference.get("median_ms") and row is not reference:
            verdict += f", {row['median_ms'] / reference['median_ms']:.2f}x onnxruntime fp32"
        lines.append(
            f"{row['backend']:<12} {row['precision']:<9} {row['median_ms']:>9.1f} "
            f"{row['p90_ms']:>8.1f} {row['embedding_cosine_min']:>10.6f} "
            f"{'-' if fate is None else f'{fate:.4f}':>8} {row['memory_mb']:>7.0f}  {verdict}"
        )
    return lines


def handle(args: argparse.Namespace) -> int:
    """Run ``vlm-edge bench``."""
    bundle = Bundle.open(args.bundle, verify=verify_mode(args))
    baseline = None
    if args.baseline is not None:
        baseline = open_baseline(bundle, args.baseline, verify_mode(args))
    record = measure_bundle(bundle, args, baseline)
    print(
        f"{record['model']} ({record['method']}) on {record['device']}; {record['images']}, "
        f"{record['rounds']} interleaved rounds"
    )
    print("\n".join(table(record)))
    rungs = rung_table(record)
    if rungs:
        print("ladder rungs (vlm-edge run --target-ms picks by p90):")
        print("\n".join(rungs))
    full = baseline_table(record)
    if full:
        print("full tower (--baseline), timed in the same rounds:")
        print("\n".join(full))
    text = json.dumps(record, indent=2) + "\n"
    if args.json is not None:
        atomic_write_bytes(args.json, text.encode("utf-8"))
    if not args.no_record:
        try:
            path = write_record(bundle.path, record)
            status(f"recorded in {path} (--backend auto uses the fastest engine that passed)")
        except WriteError as exc:
            status(f"results not recorded beside the bundle: {exc}")
    return 0
