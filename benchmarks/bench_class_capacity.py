"""What a class capacity costs: ONNX Runtime CPU latency of a condensing engine whose anchors
input has K = 1000 rows (C classes used, the rest zero and invalid) vs one exported for exactly C.

Exports ViT-B-16 (random weights: latency does not depend on the weights' values) condensed
(r=0.035, K=2) twice from the same weights, binds the anchors once as the device runtime does
(IO binding, C valid rows), then times batch-1 inference in interleaved rounds (the order flips
every round, so machine noise and cache warmth hit both alike) and reports medians and the ratio.
The outputs of the two engines are compared on the same inputs (they must agree).

On a shared, noisy machine the whole-engine ratio moves by a few percent from run to run, so the
part that depends on K is also timed alone: the anchor choice of every reduction block (the
``AnchorSelector`` of the tower: cosine of the CLS token with K anchors, masked argmax, gather),
exported as its own graph at K and at C. Its extra time over the exact engine's median is the
capacity's cost with the noise of the rest of the network taken out.

    python benchmarks/bench_class_capacity.py [--classes 10] [--capacity 1000] [--rounds 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import common
import numpy as np
import onnxruntime as ort
import torch

from vlm_export.export.graph.onnx_export import export_onnx
from vlm_export.models.condensing_tower import AnchorSelector, CondensingVisionTower
from vlm_export.models.loading import load_clip
from vlm_export.models.schedule import CondensationConfig


def _engine(path: Path, threads: int, anchors: np.ndarray, valid: np.ndarray):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    kept = [np.ascontiguousarray(anchors), np.ascontiguousarray(valid)]
    for name, array in zip(("anchors", "anchors_valid"), kept, strict=True):
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cpu")

    def run(image: np.ndarray) -> list[np.ndarray]:
        binding.bind_cpu_input("image", image)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    run.kept = kept  # the bound values read this memory
    return run


class _Selections(torch.nn.Module):
    """The anchor choices of all R reduction blocks of one frame, as the engine makes them."""

    def __init__(self) -> None:
        super().__init__()
        self.select = AnchorSelector()

    def forward(self, cls_tokens, anchors, valid):
        chosen = [
            self.select(cls_tokens[:, i], anchors[:, i], valid) for i in range(len(anchors[0]))
        ]
        return torch.stack([anchor for anchor, _ in chosen], 1), torch.stack([b for _, b in chosen])


def _selection_session(path: Path, rows: int, reductions: int, width: int, threads: int):
    inputs = (
        torch.randn(1, reductions, width),
        torch.randn(rows, reductions, width),
        torch.ones(rows),
    )
    torch.onnx.export(
        _Selections(),
        inputs,
        str(path),
        input_names=["cls", "anchors", "anchors_valid"],
        opset_version=17,
        dynamo=False,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _time_selections(folder: Path, args, reductions: int, width: int, rng) -> dict[str, float]:
    """Median ms of the R anchor choices at C rows and at K rows (interleaved rounds)."""
    sessions, feeds = {}, {}
    for name, rows in (("exact", args.classes), ("capacity", args.capacity)):
        sessions[name] = _selection_session(
            folder / f"sel_{name}.onnx", rows, reductions, width, args.threads
        )
        anchors = np.zeros((rows, reductions, width), np.float32)
        anchors[: args.classes] = rng.standard_normal((args.classes, reductions, width))
        valid = (np.arange(rows) < args.classes).astype(np.float32)
        cls = rng.standard_normal((1, reductions, width)).astype(np.float32)
        feeds[name] = {"cls": cls, "anchors": anchors, "anchors_valid": valid}
    runners = {name: lambda n=name: sessions[n].run(None, feeds[n]) for name in sessions}
    return common.medians(common.interleaved_rounds(runners, args.rounds * 20, 20, flip=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--capacity", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    visual = load_clip(args.model, "none").model.visual.eval()
    config = CondensationConfig(0.035, 2)
    rng = np.random.default_rng(0)
    engines = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, rows in (("exact", args.classes), ("capacity", args.capacity)):
            tower = CondensingVisionTower(visual, config, rows).eval()
            path = Path(folder) / f"{name}.onnx"
            print(f"exporting {name} ({rows} anchor rows) ...", flush=True)
            export_onnx(tower, path, opset=17)
            if name == "exact":
                shape = (args.classes, len(tower.schedule), tower.geometry["width"])
                used = rng.standard_normal(shape).astype(np.float32)
                size = tower.geometry["image_size"]
            anchors = np.zeros((rows, *used.shape[1:]), np.float32)
            anchors[: args.classes] = used
            valid = np.zeros(rows, np.float32)
            valid[: args.classes] = 1.0
            engines[name] = _engine(path, args.threads, anchors, valid)
        image = rng.standard_normal((1, 3, size, size)).astype(np.float32)
        outputs = {name: run(image) for name, run in engines.items()}
        max_abs = max(
            float(np.abs(a.astype(np.float64) - b).max())
            for a, b in zip(outputs["exact"], outputs["capacity"], strict=True)
        )
        runners = {name: lambda n=name: engines[n](image) for name in engines}
        times = common.interleaved_rounds(runners, args.rounds, args.warmup, flip=True)
        width = used.shape[2]
        selection = _time_selections(Path(folder), args, used.shape[1], width, rng)
    medians = common.medians(times)
    extra_ms = selection["capacity"] - selection["exact"]
    report = {
        "model": args.model,
        "condensation": {"drop_rate": 0.035, "merge_centers": 2},
        "classes": args.classes,
        "capacity": args.capacity,
        "batch_size": 1,
        "threads": args.threads,
        "rounds": args.rounds,
        "machine": {**common.machine(), "load_average_1m": os.getloadavg()[0]},
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__},
        "median_ms": medians,
        "capacity_vs_exact": medians["capacity"] / medians["exact"],
        "paired_ratio_median": statistics.median(
            c / e for c, e in zip(times["capacity"], times["exact"], strict=True)
        ),
        "outputs_max_abs_difference": max_abs,
        "anchor_choice_median_ms": selection,
        "anchor_choice_extra_ms": extra_ms,
        "anchor_choice_extra_vs_exact_engine": extra_ms / medians["exact"],
    }
    print(json.dumps(report, indent=2))
    common.write_json(common.RESULTS / f"class_capacity_{args.model}.json", report)


if __name__ == "__main__":
    main()
