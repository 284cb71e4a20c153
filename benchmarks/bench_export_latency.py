"""ONNX Runtime CPU latency of full vs condensed towers, next to their GFLOPs; and PyTorch eager.

Exports ViT-B-16 (random weights: latency does not depend on the weights' values) full and
condensed (r=0.035 and r=0.1, K=2), then times batch-1 inference interleaved (one run of each
model per round, so machine noise hits all alike) and reports medians and condensed/full ratios.
The same towers also run in PyTorch eager, interleaved with ORT, for the ORT-vs-eager ratio.
With matplotlib (the ``[plot]`` extra) it draws latency against GFLOPs beside the JSON
(``export_latency_<model>.png``); ``--replot`` redraws it from the saved JSON without measuring.

    python benchmarks/bench_export_latency.py [--model ViT-B-16] [--rounds 30] [--threads 2]
    python benchmarks/bench_export_latency.py --replot
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import common
import numpy as np
import onnxruntime as ort
import torch

from vlm_export.export.graph.onnx_export import export_onnx, io_names
from vlm_export.models.condensing_tower import CondensingVisionTower
from vlm_export.models.flops import closed_form_gflops
from vlm_export.models.loading import load_clip
from vlm_export.models.schedule import CondensationConfig

VARIANTS = {"full": None, "r0.035_K2": (0.035, 2), "r0.1_K2": (0.1, 2)}


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def plot(report: dict, path: Path) -> None:
    """Median latency against GFLOPs per engine, with latency proportional to GFLOPs dashed."""
    plt = common.pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    gflops = report["gflops"]
    names = sorted(gflops, key=gflops.get)
    xs = [gflops[name] for name in names]
    series = (("ort", "ONNX Runtime CPU"), ("torch", "PyTorch eager"))
    for engine, label in series:
        ys = [report["median_ms"][f"{engine}/{name}"] for name in names]
        axes.plot(xs, ys, "o-", label=label)
        full = report["median_ms"][f"{engine}/full"]
        scaled = [full * x / gflops["full"] for x in xs]
        axes.plot(xs, scaled, "--", color=axes.lines[-1].get_color(), alpha=0.5, linewidth=1)
        for x, y, name in zip(xs, ys, names, strict=True):
            axes.annotate(name, (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    axes.plot([], [], "k--", alpha=0.5, linewidth=1, label="proportional to GFLOPs")
    axes.set_xlabel("GFLOPs per image (closed form)")
    axes.set_ylabel("median latency, batch 1 (ms)")
    axes.set_ylim(bottom=0)
    axes.margins(x=0.1)
    axes.set_title(
        f"{report['model']}: latency against GFLOPs ({report['threads']} CPU threads, "
        f"{report['rounds']} rounds)",
        fontsize=10,
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    common.save_plot(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the PNG from the saved JSON"
    )
    args = parser.parse_args()
    out = common.RESULTS / f"export_latency_{args.model}.json"
    if args.replot:
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    visual = load_clip(args.model, "none").model.visual.eval()
    towers, sessions, feeds, eager = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name, params in VARIANTS.items():
            config = None if params is None else CondensationConfig(*params)
            tower = CondensingVisionTower(visual, config, args.num_classes).eval()
            path = Path(folder) / f"{name}.onnx"
            print(f"exporting {name} ...", flush=True)
            export_onnx(tower, path, opset=17)
            towers[name] = tower
            sessions[name] = _session(path, args.threads)
            inputs = tower.example_inputs(1)
            eager[name] = inputs
            feeds[name] = {k: v.numpy() for k, v in zip(io_names(tower)[0], inputs, strict=True)}
        runners = {}
        for name in VARIANTS:
            runners[("ort", name)] = lambda n=name: sessions[n].run(None, feeds[n])
            runners[("torch", name)] = lambda n=name: towers[n](*eager[n])
        with torch.no_grad():  # ONNX Runtime does not mind
            times = common.interleaved_rounds(runners, args.rounds, args.warmup)
    gflops = {name: closed_form_gflops(towers[name]) for name in VARIANTS}
    medians = {
        f"{engine}/{name}": statistics.median(times[(engine, name)])
        for engine in ("ort", "torch")
        for name in VARIANTS
    }
    report = {
        "model": args.model,
        "batch_size": 1,
        "threads": args.threads,
        "rounds": args.rounds,
        "machine": common.machine(),
        "versions": {
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "gflops": gflops,
        "median_ms": medians,
        "ratios": {
            name: {
                "gflops_vs_full": gflops[name] / gflops["full"],
                "ort_latency_vs_full": medians[f"ort/{name}"] / medians["ort/full"],
                "torch_latency_vs_full": medians[f"torch/{name}"] / medians["torch/full"],
                "ort_vs_torch_eager": medians[f"ort/{name}"] / medians[f"torch/{name}"],
            }
            for name in VARIANTS
        },
    }
    common.write_json(out, report)
    print(json.dumps(report["ratios"], indent=2))
    print({key: round(value, 1) for key, value in medians.items()})
    plot(report, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
