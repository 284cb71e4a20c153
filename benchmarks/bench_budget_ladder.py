"""A ladder of token budgets on this CPU: shared weights, the latency staircase, memory, a stream.

Four parts (``--parts``, default ``sharing``), each saved into one JSON
(``benchmarks/results/budget_ladder_<model>.json``, merged, so parts can be rerun alone) with a
PNG beside it:

- ``sharing`` (the default; about 3 minutes on ViT-B-32 once the bundles are exported): each
  rung of a ladder (``--sharing-rates``, default 0, 0.035, 0.06, 0.1) against a bundle exported
  at that rate alone, timed in one run of interleaved rounds (every engine warmed first):
  ONNX Runtime rungs sharing one pre-packed copy of the weights (the default), rungs sharing the
  mapped weights without pre-packing, and the one-engine bundles. Then resident memory added by
  opening and running the one-engine bundle of rung 0's rate and the ladder (pre-packed, mapped,
  one session per rung unshared; ``--openvino``: also OpenVINO), each in a fresh process.
- ``staircase``: batch-1 latency against kept tokens in fine drop-rate steps (``--steps``), for
  ONNX Runtime fp32, OpenVINO fp32 and (``--int8``) the QDQ INT8 graph of every rung on both
  (calibrated on synthetic images). Rungs are timed one at a time (one session in memory), in
  ``--passes`` passes over all rungs; each rung's median is the median over its passes, so load
  drift during the sweep is spread over all rungs. Also as ratios to rung 0 of the same backend.
- ``memory``: bundle size on disk and resident memory added by opening and running a 4-rung
  ladder (0, 0.035, 0.06, 0.1) against a one-engine bundle (r = 0.035), each in a fresh process:
  ONNX Runtime pre-packed and shared, mapped and not pre-packed, unshared, and OpenVINO; plus
  the latency cost of not pre-packing (mapped against unshared sessions, interleaved).
- ``stream``: the same frames through the 4-rung ladder (TCA pipeline) at a fixed budget and
  with ``--adapt-budget``, the two runs taking turns frame by frame (so both see the same load),
  while the script starts CPU-burning processes (one per core) for the middle third. The
  target is ``--target-ms`` or ``--target-factor`` (1.25) x rung 0's p90 measured just before;
  the JSON has every frame time, its rung, and the fraction of frames meeting the target in each
  run (all frames, the loaded third and the rest).

Exports (random weights, ``--pretrained none``) and INT8 graphs stay in ``--work`` and are reused,
so an interrupted run resumes (the first ``sharing`` run exports five ViT-B-32 bundles). Develop
on ``--model vlm-test-tiny``:

    python benchmarks/bench_budget_ladder.py --work DIR                       # sharing, ViT-B-32
    python benchmarks/bench_budget_ladder.py --model ViT-B-16 --parts staircase,memory,stream \\
        --steps 0:0.2:0.01 --int8 --passes 3 --rounds 5 --frames 240 --work DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch

from vlm_export.export.int8 import graph as int8_graph
from vlm_export.export.pipeline import ExportOptions, export_bundle
from vlm_export.models.condensing_tower import CondensingVisionTower
from vlm_export.models.loading import load_clip
from vlm_export.models.schedule import CondensationConfig, ScheduleError
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.backends.onnxruntime_backend import OnnxRuntimeBackend
from vlm_export.runtime.engines.backends.openvino_backend import OpenVinoBackend
from vlm_export.runtime.engines.base import BundleGraph
from vlm_export.runtime.engines.checks import measure
from vlm_export.runtime.engines.factory import graph_view
from vlm_export.runtime.engines.ladder.budget import BudgetController, choose_rung
from vlm_export.runtime.engines.ladder.ladder import LadderBackend, ladder_rungs, open_ladder
from vlm_export.runtime.pipeline import Pipeline
from vlm_export.runtime.tca.stage import build_reservoir

CLASSES = ["cat", "dog", "bird", "car", "bus", "truck", "ship", "plane", "horse", "frog"]
LADDER = [0.0, 0.035, 0.06, 0.1]
SINGLE = 0.035


def parse_steps(text: str) -> list[float]:
    """``0:0.2:0.01`` (start:stop:step, stop included) or ``0,0.035,0.1``."""
    if ":" in text:
        start, stop, step = (float(v) for v in text.split(":"))
        return [round(start + i * step, 6) for i in range(int(round((stop - start) / step)) + 1)]
    return [float(v) for v in text.split(",")]


def feasible(model: str, rates: list[float]) -> tuple[list[float], dict[str, str]]:
    """The rates whose schedules exist, one per distinct schedule; the others with the reason."""
    visual = load_clip(model, "none").model.visual
    kept, skipped, seen = [], {}, set()
    for rate in rates:
        try:
            tower = CondensingVisionTower(visual, CondensationConfig(drop_rate=rate))
        except ScheduleError as exc:
            skipped[str(rate)] = str(exc)
            continue
        key = tuple(tower.tokens_per_block) + (tower.schedule[-1].tokens_out,)
        if key in seen:
            skipped[str(rate)] = "same schedule as a smaller rate"
            continue
        seen.add(key)
        kept.append(rate)
    return kept, skipped


def export(work: Path, name: str, model: str, rates: list[float]) -> Path:
    """A bundle in ``work/name`` (reused when already there with these rates)."""
    out = work / name
    if (out / "manifest.json").is_file():
        manifest = json.loads((out / "manifest.json").read_text())
        have = [r["drop_rate"] for r in (manifest.get("ladder") or {}).get("rungs", [])] or [
            manifest["condensation"]["drop_rate"]
        ]
        if have == rates:
            return out
    torch.manual_seed(0)
    print(f"exporting {name}: {model}, drop rates {rates}", flush=True)
    options = ExportOptions(
        method="tca",
        model=model,
        pretrained="none",
        domains=[("things", CLASSES)],
        templates="single",
        condensation=CondensationConfig(drop_rate=rates[0]),
        drop_rates=rates if len(rates) > 1 else None,
        out=out,
        overwrite=True,
        quiet=True,
        text_encoder=False,
    )
    return export_bundle(options)


def _time(engine: Any, image: np.ndarray, rounds: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        engine.infer(image)
    times = []
    for _ in range(rounds):
        time.sleep(measure.SETTLE_S)
        start = time.perf_counter()
        engine.infer(image)
        times.append((time.perf_counter() - start) * 1000)
    return times


def _openers(bundle: Bundle, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Per engine kind: a function of a rung that opens it (one at a time)."""
    openers: dict[str, Any] = {
        "onnxruntime fp32": lambda rung: OnnxRuntimeBackend(
            graph_view(bundle, rung.onnx), ["CPUExecutionProvider"], args.threads
        ),
        "openvino fp32": lambda rung: OpenVinoBackend(
            bundle, "fp32", args.threads, graph=bundle.path / rung.onnx
        ),
    }
    if args.int8:
        images = measure.synthetic_images(
            [int(v) for v in bundle.engine_io("inputs")["image"]["shape"]], 8, seed=5
        )
        for rung in ladder_rungs(bundle.manifest):
            target = work / "int8" / f"rung{rung.index}.onnx"
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                print(f"quantizing rung {rung.index} (drop rate {rung.drop_rate})", flush=True)
                int8_graph.quantize_graph(bundle.path / rung.onnx, target, bundle.manifest, images)
        int8 = work / "int8"
        openers["onnxruntime int8"] = lambda rung: OnnxRuntimeBackend(
            BundleGraph(int8, graph_view(bundle, f"rung{rung.index}.onnx").manifest),
            ["CPUExecutionProvider"],
            args.threads,
        )
        openers["openvino int8"] = lambda rung: OpenVinoBackend(
            bundle, "int8", args.threads, graph=int8 / f"rung{rung.index}.onnx"
        )
    return openers


def staircase(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rates, skipped = feasible(args.model, parse_steps(args.steps))
    bundle = Bundle.open(export(work, "staircase", args.model, rates), verify=False)
    rungs = ladder_rungs(bundle.manifest)
    image = measure.synthetic_images(
        [int(v) for v in bundle.engine_io("inputs")["image"]["shape"]], 1
    )[0]
    openers = _openers(bundle, work, args)
    times: dict[str, dict[int, list[float]]] = {kind: {} for kind in openers}
    for number in range(args.passes):
        for kind, opener in openers.items():
            for rung in rungs:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    engine = opener(rung)
                medians = times[kind].setdefault(rung.index, [])
                medians.append(float(np.median(_time(engine, image, args.rounds, args.warmup))))
                engine.close()
                del engine
            print(f"pass {number + 1}/{args.passes} {kind} done", flush=True)
    records = ladder_rungs(bundle.manifest)
    schedules = bundle.manifest["ladder"]["rungs"]
    series = {}
    for kind, per_rung in times.items():
        base = np.asarray(per_rung[0])  # each pass's rung 0: the host's speed swings between passes
        series[kind] = [
            {
                "drop_rate": rung.drop_rate,
                "tokens_out": rung.tokens,
                "tokens_summed": int(sum(schedules[rung.index]["tokens_per_block"])),
                "gflops": rung.gflops,
                "median_ms": float(np.median(per_rung[rung.index])),
                "pass_medians_ms": per_rung[rung.index],
                "ratio_to_rung0": float(np.median(np.asarray(per_rung[rung.index]) / base)),
            }
            for rung in records
        ]
    return {
        "rates": rates,
        "skipped": skipped,
        "series": series,
        "passes": args.passes,
        "rounds": args.rounds,
        "int8": "QDQ (vlm-export quantize's default scope), 8 synthetic calibration images"
        if args.int8
        else "not run (--int8)",
    }


MEMORY_PROBE = """
import json, sys, numpy as np
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.checks.measure import pss_bytes, rss_bytes
import onnxruntime
try:
    import openvino
except ImportError:
    pass
kind, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
bundle = Bundle.open(path, verify=False)
image = np.zeros([int(v) for v in bundle.engine_io("inputs")["image"]["shape"]], np.float32)
base, base_pss = rss_bytes(), pss_bytes()
if kind.startswith("single"):
    from vlm_export.runtime.engines.factory import open_backend
    engine = open_backend(bundle, kind.split("-")[1], threads=threads)
    engine.infer(image)
    sharing = "one engine"
else:
    from vlm_export.runtime.engines.ladder.ladder import open_ladder
    _, backend, share = kind.split("-")
    engine = open_ladder(
        bundle, backend, threads=threads, share_memory=share != "unshared",
        prepack=share != "mapped",
    )
    for index in range(len(engine.rungs)):
        engine.select(index)
        engine.infer(image)
    sharing = engine.sharing
pss = pss_bytes()
print(json.dumps({
    "rss_added_mb": (rss_bytes() - base) / 2**20,
    "pss_added_mb": None if pss is None else (pss - base_pss) / 2**20,
    "sharing": sharing,
}))
"""


def _probe(kind: str, path: Path, threads: int) -> dict[str, Any]:
    """Resident memory added by opening and running ``kind`` in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, kind, str(path), str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def sharing(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Each rung of a ladder against a bundle exported at that rate alone, interleaved in one
    run: rungs sharing one pre-packed copy of the weights (the default), rungs sharing the
    mapped weights without pre-packing, and the one-engine bundles; then resident memory."""
    rates = parse_steps(args.sharing_rates)
    name = "ladder4" if rates == LADDER else "ladder-" + "-".join(f"{r:g}" for r in rates)
    ladder_path = export(work, name, args.model, rates)
    single_paths = [export(work, f"single-{rate:g}", args.model, [rate]) for rate in rates]
    bundle = Bundle.open(ladder_path, verify=False)
    image = measure.synthetic_images(
        [int(v) for v in bundle.engine_io("inputs")["image"]["shape"]], 1
    )[0]
    prepacked = open_ladder(bundle, "onnxruntime", threads=args.threads)
    mapped = open_ladder(bundle, "onnxruntime", threads=args.threads, prepack=False)
    singles = [
        OnnxRuntimeBackend(Bundle.open(path, verify=False), ["CPUExecutionProvider"], args.threads)
        for path in single_paths
    ]
    ladders = {"prepacked": prepacked, "mapped": mapped}
    openvino_singles = []
    if args.openvino:
        ladders["openvino"] = open_ladder(bundle, "openvino", threads=args.threads)
        openvino_singles = [
            OpenVinoBackend(Bundle.open(path, verify=False), "fp32", args.threads)
            for path in single_paths
        ]
    runners: dict[Any, Any] = {}
    for index in range(len(rates)):
        runners[("single", index)] = lambda e=singles[index]: e.infer(image)
        for kind, ladder in ladders.items():
            runners[(kind, index)] = lambda e=ladder.engines[index]: e.infer(image)
        if openvino_singles:
            runners[("openvino single", index)] = lambda e=openvino_singles[index]: e.infer(image)
    timings = measure.interleaved_latency(runners, args.sharing_rounds, args.warmup, warm_each=2)
    sharing_modes = {kind: ladder.sharing for kind, ladder in ladders.items()}
    for engine in [*ladders.values(), *singles, *openvino_singles]:
        engine.close()
    rungs = []
    for index, rate in enumerate(rates):
        single = timings[("single", index)]["median_ms"]
        baseline = {kind: single for kind in sharing_modes}
        if openvino_singles:  # OpenVINO rungs against OpenVINO one-engine bundles
            baseline["openvino"] = timings[("openvino single", index)]["median_ms"]
        rungs.append(
            {
                "drop_rate": rate,
                "median_ms": {kind: timings[(kind, index)]["median_ms"] for kind in sharing_modes}
                | {"single": single}
                | ({"openvino single": baseline["openvino"]} if openvino_singles else {}),
                "p90_ms": {
                    kind: timings[(kind, index)]["p90_ms"]
                    for kind in ("single", "prepacked", "mapped")
                },
                "over_single": {
                    kind: timings[(kind, index)]["median_ms"] / baseline[kind]
                    for kind in sharing_modes
                },
            }
        )
        print(
            f"rung {index} (drop rate {rate:g}): single {single:.1f} ms, "
            + ", ".join(f"{kind} x{ratio:.3f}" for kind, ratio in rungs[-1]["over_single"].items()),
            flush=True,
        )
    probes = {
        "single-onnxruntime": single_paths[0],
        "ladder-onnxruntime-prepacked": ladder_path,
        "ladder-onnxruntime-mapped": ladder_path,
        "ladder-onnxruntime-unshared": ladder_path,
    }
    if args.openvino:
        probes |= {
            "single-openvino": single_paths[0],
            "ladder-openvino-shared": ladder_path,
            "ladder-openvino-unshared": ladder_path,
        }
    rss = {}
    for kind, path in probes.items():
        rss[kind] = _probe(kind, path, args.threads)
        print(
            f"{kind}: {rss[kind]['rss_added_mb']:.0f} MB resident, "
            f"{rss[kind]['pss_added_mb'] or float('nan'):.0f} MB proportional "
            f"({rss[kind]['sharing']})",
            flush=True,
        )

    def over_one(kind: str, measure_key: str) -> float:
        backend = kind.split("-")[1]
        return rss[kind][measure_key] / rss[f"single-{backend}"][measure_key]

    return {
        "rates": rates,
        "rounds": args.sharing_rounds,
        "sharing": sharing_modes,
        "rungs": rungs,
        "rss_added_mb": {kind: row["rss_added_mb"] for kind, row in rss.items()},
        "pss_added_mb": {kind: row["pss_added_mb"] for kind, row in rss.items()},
        "rss_over_one_engine": {
            kind: over_one(kind, "rss_added_mb") for kind in rss if kind.startswith("ladder-")
        },
        "pss_over_one_engine": {
            kind: over_one(kind, "pss_added_mb")
            for kind in rss
            if kind.startswith("ladder-") and rss[kind]["pss_added_mb"] is not None
        },
        "one_engine": f"bundle exported at drop rate {rates[0]:g} alone, same backend",
    }


def _bundle_bytes(path: Path) -> dict[str, int]:
    files = json.loads((path / "manifest.json").read_text())["files"]
    image = {k: v["bytes"] for k, v in files.items() if k.startswith("image_encoder")}
    return {"image_files_bytes": sum(image.values()), "files": len(image)}


def memory(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    ladder = export(work, "ladder4", args.model, LADDER)
    single = export(work, "single", args.model, [SINGLE])
    probes = {
        "single-onnxruntime": single,
        "ladder-onnxruntime-prepacked": ladder,
        "ladder-onnxruntime-mapped": ladder,
        "ladder-onnxruntime-unshared": ladder,
        "single-openvino": single,
        "ladder-openvino-shared": ladder,
        "ladder-openvino-unshared": ladder,
    }
    rss = {}
    for kind, path in probes.items():
        rss[kind] = _probe(kind, path, args.threads)["rss_added_mb"]
        print(f"{kind}: {rss[kind]:.0f} MB", flush=True)
    bundle = Bundle.open(ladder, verify=False)
    image = measure.synthetic_images(
        [int(v) for v in bundle.engine_io("inputs")["image"]["shape"]], 1
    )[0]
    shared = open_ladder(bundle, "onnxruntime", threads=args.threads, prepack=False)
    plain = open_ladder(bundle, "onnxruntime", threads=args.threads, share_memory=False)
    runners = {}
    for index in range(len(shared.rungs)):
        runners[("shared", index)] = lambda e=shared.engines[index]: e.infer(image)
        runners[("prepacked", index)] = lambda e=plain.engines[index]: e.infer(image)
    timings = measure.interleaved_latency(runners, args.rounds, args.warmup)
    shared.close()
    plain.close()
    cost = {
        str(index): timings[("shared", index)]["median_ms"]
        / timings[("prepacked", index)]["median_ms"]
        for index in range(len(LADDER))
    }
    return {
        "ladder_rates": LADDER,
        "single_rate": SINGLE,
        "disk": {"ladder": _bundle_bytes(ladder), "single": _bundle_bytes(single)},
        "rss_added_mb": rss,
        "shared_over_prepacked_latency": cost,
    }


#: a competing process: one core busy until it is ended
BURN = "while True:\n    sum(i * i for i in range(100000))"


def _burners() -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(os.cpu_count() or 1)]


def _stop(burners: list[subprocess.Popen]) -> None:
    for burner in burners:
        burner.terminate()
        burner.wait()


def _stream_both(
    bundle: Bundle,
    ladders: dict[str, LadderBackend],
    frames: list[np.ndarray],
    count: int,
    start: int,
    controller: BudgetController,
) -> dict[str, list[dict[str, Any]]]:
    """The fixed and the adaptive run frame by frame in turn, so that both see the same load
    (the competing processes here, and whatever else shares the machine)."""
    pipelines = {}
    for name, ladder in ladders.items():
        ladder.select(start)
        pipelines[name] = Pipeline(bundle, ladder, "tca", build_reservoir(bundle))
    load_from, load_to = count // 3, 2 * count // 3
    burners: list[subprocess.Popen] = []
    series: dict[str, list[dict[str, Any]]] = {name: [] for name in ladders}
    try:
        for index in range(count):
            if index == load_from:
                burners = _burners()
            if index == load_to:
                _stop(burners)
                burners = []
            for name, pipeline in pipelines.items():
                result = pipeline.process_tensor(frames[index % len(frames)], index)
                frame_ms = result.timings["total"]
                ladder = ladders[name]
                loaded = load_from <= index < load_to
                series[name].append({"ms": frame_ms, "rung": ladder.active, "loaded": loaded})
                if name == "adaptive":
                    rung = controller.observe(frame_ms)
                    if rung is not None:
                        ladder.select(rung)
    finally:
        _stop(burners)
    return series


def _meets(series: list[dict[str, Any]], target: float, loaded: bool | None = None) -> float:
    chosen = [row for row in series if loaded is None or row["loaded"] == loaded]
    return sum(row["ms"] <= target for row in chosen) / max(len(chosen), 1)


def stream(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rates = parse_steps(args.stream_rates) if args.stream_rates else LADDER
    name = "ladder4" if rates == LADDER else "stream-" + "-".join(f"{r:g}" for r in rates)
    bundle = Bundle.open(export(work, name, args.model, rates), verify=False)
    ladder = open_ladder(bundle, "onnxruntime", threads=args.threads)
    shape = [int(v) for v in bundle.engine_io("inputs")["image"]["shape"]]
    frames = [image[0] for image in measure.synthetic_images(shape, 8, seed=11)]
    pipelines = [Pipeline(bundle, ladder, "tca", build_reservoir(bundle)) for _ in ladder.rungs]
    times: list[list[float]] = [[] for _ in ladder.rungs]
    for round_index in range(14):  # interleaved, whole frames as the controller sees them
        for index, pipeline in enumerate(pipelines):
            ladder.select(index)
            frame = frames[round_index % len(frames)]
            times[index].append(pipeline.process_tensor(frame, round_index).timings["total"])
    p90 = [float(np.percentile(values[2:], 90)) for values in times]
    target = args.target_ms or args.target_factor * p90[0]
    choice = choose_rung(p90, rates, target)
    window = max(4, args.frames // 30)
    controller = BudgetController(p90, target, start=choice.index, window=window)
    ladders = {
        "fixed": ladder,
        "adaptive": open_ladder(bundle, "onnxruntime", threads=args.threads),
    }
    runs = _stream_both(bundle, ladders, frames, args.frames, choice.index, controller)
    for opened in ladders.values():
        opened.close()
    return {
        "rates": rates,
        "target_ms": target,
        "target_factor": None if args.target_ms else args.target_factor,
        "rung_p90_ms_unloaded": p90,
        "start": {"rung": choice.index, "reason": choice.reason},
        "window": window,
        "burners": os.cpu_count(),
        "frames": args.frames,
        "met_fraction": {
            name: {
                "all": _meets(run, target),
                "loaded": _meets(run, target, True),
                "unloaded": _meets(run, target, False),
            }
            for name, run in runs.items()
        },
        "switches_adaptive": controller.switches,
        "series": runs,
    }


#: how the sharing plot names each way rungs share weights
SHARING_LABELS = {
    "prepacked": "ONNX Runtime, pre-packed",
    "mapped": "ONNX Runtime, mapped",
    "openvino": "OpenVINO, one model",
}


def _memory_kind(kind: str) -> str:
    """The memory probe of a sharing mode: ONNX Runtime's by name, OpenVINO's shared ladder."""
    return "ladder-openvino-shared" if kind == "openvino" else f"ladder-onnxruntime-{kind}"


def _plot_sharing(axis: Any, result: dict[str, Any]) -> None:
    """Each rung's latency over a bundle exported at its rate alone, by how rungs share."""
    data = result["sharing"]
    rungs = data["rungs"]
    kinds = list(rungs[0]["over_single"])
    width = 0.8 / len(kinds)
    memory = data.get("pss_over_one_engine") or data["rss_over_one_engine"]
    for offset, kind in enumerate(kinds):
        axis.bar(
            [i + offset * width for i in range(len(rungs))],
            [rung["over_single"][kind] for rung in rungs],
            width,
            label=f"{SHARING_LABELS.get(kind, kind)} (memory x{memory[_memory_kind(kind)]:.2f})",
        )
    axis.axhline(1.03, color="k", ls="--", lw=1, label="target 1.03")
    axis.set_xticks([i + width * (len(kinds) - 1) / 2 for i in range(len(rungs))])
    axis.set_xticklabels([f"r = {rung['drop_rate']:g}" for rung in rungs])
    axis.set_ylim(0.8, max(1.4, *(max(r["over_single"].values()) for r in rungs)) + 0.05)
    axis.set_ylabel("rung latency / a bundle exported at that rate alone")
    axis.set_title(f"{result['model']}: ladder rungs sharing weights")
    axis.legend(fontsize=8)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    parts = [part for part in ("sharing", "staircase", "stream") if part in result]
    if not parts:
        return
    figure, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.2), squeeze=False)
    for axis, part in zip(axes[0], parts, strict=True):
        if part == "sharing":
            _plot_sharing(axis, result)
        elif part == "staircase":
            for kind, rows in result["staircase"]["series"].items():
                axis.plot(
                    [row["tokens_summed"] for row in rows],
                    [row["ratio_to_rung0"] for row in rows],
                    marker="o",
                    markersize=3,
                    label=kind,
                )
            axis.set_xlabel("tokens summed over all blocks (rung schedule)")
            axis.set_ylabel("batch-1 latency / the full budget's (per pass, median)")
            axis.set_title(f"{result['model']}: latency against kept tokens")
            axis.legend(fontsize=8)
        else:
            data = result["stream"]
            for name, run in data["series"].items():
                met = data["met_fraction"][name]["all"]
                axis.plot([row["ms"] for row in run], label=f"{name} ({met:.0%} met T)", lw=1)
            axis.axhline(data["target_ms"], color="k", ls="--", lw=1, label="target T")
            frames = data["frames"]
            axis.axvspan(frames // 3, 2 * frames // 3, color="0.9", label="competing load")
            axis.set_xlabel("frame")
            axis.set_ylabel("frame time, ms")
            axis.set_title("fixed budget against --adapt-budget")
            axis.legend(fontsize=8)
    common.save_plot(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument(
        "--parts", default="sharing", help="sharing (default), staircase, memory, stream"
    )
    parser.add_argument(
        "--sharing-rates", default="0,0.035,0.06,0.1", help="the sharing part's ladder"
    )
    parser.add_argument(
        "--sharing-rounds", type=int, default=20, help="interleaved rounds of the sharing part"
    )
    parser.add_argument(
        "--openvino", action="store_true", help="sharing part: also OpenVINO's memory"
    )
    parser.add_argument("--steps", default="0:0.2:0.01", help="start:stop:step or a list")
    parser.add_argument(
        "--stream-rates",
        help="the stream's ladder (default 0,0.035,0.06,0.1; a wider one absorbs more load)",
    )
    parser.add_argument("--int8", action="store_true", help="also INT8 graphs of every rung")
    parser.add_argument("--passes", type=int, default=3, help="staircase passes over all rungs")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per rung and pass")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--frames", type=int, default=240, help="frames per stream run")
    parser.add_argument("--target-ms", type=float, help="stream target in ms")
    parser.add_argument(
        "--target-factor",
        type=float,
        default=1.25,
        help="without --target-ms: the target is this x rung 0's unloaded p90 (default 1.25)",
    )
    parser.add_argument("--work", type=Path, help="folder for bundles and graphs (reused)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-ladder-"))
    work.mkdir(parents=True, exist_ok=True)
    path = common.RESULTS / f"budget_ladder_{args.model}.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    result.update(
        {
            "benchmark": "bench_budget_ladder",
            "model": args.model,
            "weights": "random (--pretrained none)",
            "machine": common.machine(),
            "threads": args.threads,
        }
    )
    parts = {"sharing": sharing, "staircase": staircase, "memory": memory, "stream": stream}
    for name in args.parts.split(","):
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        result[name] = {"started_utc": started, **parts[name](args, work)}
        print(f"{name} done", flush=True)
        common.write_json(path, result)
    plot(result, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
