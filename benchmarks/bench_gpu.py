"""GPU batch-1 latency of the full and the condensed image towers under every GPU path available.

Paths: TensorRT fp16 (vlm-export's engine build and TensorRTBackend), ONNX Runtime's CUDA
execution provider (OnnxRuntimeBackend, onnxruntime-gpu) and PyTorch eager fp16 as the baseline.
Towers: ViT-B-16 and ViT-L-14, full and condensed (TCA, drop rate r, K merge centres, anchors
valid), random weights (latency does not depend on the weights' values). Each path runs the full
and the condensed tower interleaved after a warm-up; the median of synchronised wall-clock times
is reported, with condensed/full latency ratios next to the GFLOPs ratios. Results go to
benchmarks/results/gpu_<device>.json, and with matplotlib (the ``[plot]`` extra) latency against
GFLOPs beside it (gpu_<device>.png; ``--replot JSON`` redraws it without measuring).

    python benchmarks/bench_gpu.py [--models ViT-B-16 ViT-L-14] [--runs 200] [--warmup 30]

Without a CUDA GPU (or with none of the three paths usable) it says so and exits with status 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from vlm_export.core.errors import UserError

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "gpu"
TORCH, ORT_CUDA, TENSORRT = "pytorch-eager-fp16", "onnxruntime-cuda", "tensorrt-fp16"
BENCH_CLASSES = [f"class {index}" for index in range(16)]

Runner = Callable[[], Any]


def probe_paths() -> tuple[dict[str, str], dict[str, str]]:
    """Which GPU paths work here: ({path: device name}, {path: why not})."""
    usable, missing = {}, {}
    import torch

    if torch.cuda.is_available():
        usable[TORCH] = torch.cuda.get_device_name(0)
    else:
        missing[TORCH] = f"torch {torch.__version__} sees no CUDA GPU"
    reason = _onnxruntime_cuda_problem()
    if reason is None:
        usable[ORT_CUDA] = "CUDAExecutionProvider"
    else:
        missing[ORT_CUDA] = reason
    try:
        from vlm_export.runtime.engines.select import query_device

        usable[TENSORRT] = query_device().device_name
    except (UserError, RuntimeError) as exc:
        missing[TENSORRT] = str(exc)
    return usable, missing


def _onnxruntime_cuda_problem() -> str | None:
    """None if ONNX Runtime really runs on CUDA (a one-node session), else why not."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(
        model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return "CUDAExecutionProvider falls back to CPU (CUDA/cuDNN libraries or GPU missing)"
    return None


def interleaved_median_ms(
    full: Runner, condensed: Runner, sync: Callable[[], None], runs: int, warmup: int
) -> tuple[float, float]:
    """Median milliseconds of ``full`` and ``condensed``, timed alternately, each synchronised."""
    runners = {"full": full, "condensed": condensed}
    medians = common.medians(common.interleaved_rounds(runners, runs, warmup, sync))
    return medians["full"], medians["condensed"]


def torch_runners(visual: Any, config: Any, num_classes: int) -> tuple[Runner, Runner, Callable]:
    """Eager fp16 forwards of the full and condensed towers on the GPU, and the sync call."""
    import torch

    from vlm_export.models.condensing_tower import CondensingVisionTower

    visual = visual.half().cuda().eval()
    full = CondensingVisionTower(visual, None).eval()
    condensed = CondensingVisionTower(visual, config, num_classes).eval()

    def gpu(inputs: tuple) -> tuple:
        return tuple(tensor.cuda().half() for tensor in inputs)

    full_inputs, condensed_inputs = gpu(full.example_inputs()), gpu(condensed.example_inputs())

    def run(tower: Any, inputs: tuple) -> Runner:
        def forward() -> None:
            with torch.inference_mode():
                tower(*inputs)

        return forward

    return run(full, full_inputs), run(condensed, condensed_inputs), torch.cuda.synchronize


def export_towers(model: str, pretrained: str, config: Any, opset: int) -> dict[str, Path]:
    """Export the full (zeroshot) and condensed (tca) bundles of ``model`` under benchmarks/work."""
    from vlm_export.export.pipeline import ExportOptions, export_bundle

    bundles = {}
    for kind, method in (("full", "zeroshot"), ("condensed", "tca")):
        out = WORK / f"{model}-{kind}"
        options = ExportOptions(
            method=method,
            model=model,
            domains=[("bench", BENCH_CLASSES)],
            out=out,
            pretrained=pretrained,
            templates="single",
            condensation=config,
            opset=opset,
            batch_size=1,
            overwrite=True,
            quiet=True,
        )
        bundles[kind] = export_bundle(options)
    return bundles


def backend_runner(backend: Any, bundle: Any) -> Runner:
    """``backend.infer`` on a random image; anchors valid for every class if the engine has any."""
    rng = np.random.default_rng(0)
    inputs = bundle.engine_io("inputs")
    image = rng.standard_normal(inputs["image"]["shape"]).astype(np.float32)
    if "anchors" in inputs:
        anchors = rng.standard_normal(inputs["anchors"]["shape"]).astype(np.float32)
        backend.set_anchors(anchors, np.ones(anchors.shape[0], np.float32))
    return lambda: backend.infer(image)


def open_bundle(folder: Path) -> Any:
    """Bundle.open without the random-weights warning (latency does not depend on weights)."""
    from vlm_export.runtime.bundle import Bundle

    with warnings.catch_warnings():
        logging.getLogger("vlm_export.runtime.bundle").setLevel(logging.ERROR)  # random weights
        return Bundle.open(folder)


def open_backends(path_name: str, bundles: dict[str, Path], workspace_mb: int) -> dict[str, Any]:
    """Open both bundles with the backend of ``path_name`` (building TensorRT engines first)."""
    backends = {}
    for kind, folder in bundles.items():
        if path_name == TENSORRT:
            from vlm_export.export.tensorrt.install import add_engine_to_bundle
            from vlm_export.runtime.engines.backends.tensorrt_backend import TensorRTBackend

            add_engine_to_bundle(
                folder, "fp16", workspace_mb, WORK / "timing.cache", overwrite=True
            )
            bundle = open_bundle(folder)
            backends[kind] = (TensorRTBackend(bundle, precision="fp16"), bundle)
        else:
            from vlm_export.runtime.engines.backends.onnxruntime_backend import OnnxRuntimeBackend

            bundle = open_bundle(folder)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a fallback to CPU would not be a GPU number
                backends[kind] = (OnnxRuntimeBackend(bundle, ["CUDAExecutionProvider"]), bundle)
    return backends


def bench_model(model: str, args: argparse.Namespace, usable: dict[str, str]) -> dict[str, Any]:
    """GFLOPs and per-path latencies of one model's full and condensed towers."""
    from vlm_export.models.condensing_tower import CondensingVisionTower
    from vlm_export.models.flops import closed_form_gflops
    from vlm_export.models.loading import load_clip
    from vlm_export.models.schedule import CondensationConfig

    config = CondensationConfig(drop_rate=args.drop_rate, merge_centers=args.merge_centers)
    loaded = load_clip(model, args.pretrained)
    visual = loaded.model.visual
    full_gflops = closed_form_gflops(CondensingVisionTower(visual, None))
    condensed_tower = CondensingVisionTower(visual, config, len(BENCH_CLASSES))
    condensed_gflops = closed_form_gflops(condensed_tower)
    result: dict[str, Any] = {
        "gflops": {
            "full": round(full_gflops, 3),
            "condensed": round(condensed_gflops, 3),
            "ratio": round(condensed_gflops / full_gflops, 4),
        },
        "tokens_per_block": condensed_tower.tokens_per_block,
        "latency_ms": {},
        "skipped": {},
    }

    def record(path_name: str, full_ms: float, condensed_ms: float) -> None:
        result["latency_ms"][path_name] = {
            "full": round(full_ms, 4),
            "condensed": round(condensed_ms, 4),
            "ratio": round(condensed_ms / full_ms, 4),
        }
        print(f"  {path_name:20s} full {full_ms:8.3f} ms  condensed {condensed_ms:8.3f} ms")

    bundles = None
    for path_name in (TENSORRT, ORT_CUDA):
        if path_name not in usable:
            continue
        try:
            bundles = bundles or export_towers(model, args.pretrained, config, args.opset)
            backends = open_backends(path_name, bundles, args.workspace)
        except (UserError, RuntimeError, Warning) as exc:
            result["skipped"][path_name] = str(exc).splitlines()[0]
            continue
        runners = [backend_runner(backend, bundle) for backend, bundle in backends.values()]
        record(path_name, *interleaved_median_ms(*runners, lambda: None, args.runs, args.warmup))
        for backend, _ in backends.values():
            backend.close()
    if TORCH in usable:
        full, condensed, sync = torch_runners(visual, config, len(BENCH_CLASSES))
        record(TORCH, *interleaved_median_ms(full, condensed, sync, args.runs, args.warmup))
    return result


def versions() -> dict[str, str]:
    """Versions of what ran."""
    import torch

    found = {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__}
    try:
        from vlm_export.runtime.engines.select import import_tensorrt

        found["tensorrt"] = import_tensorrt().__version__
    except UserError:
        pass
    return found


def plot(results: dict[str, Any], path: Path) -> None:
    """Latency against GFLOPs: one line (full -> condensed) per model and GPU path."""
    plt = common.pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    markers = {TENSORRT: "o", ORT_CUDA: "s", TORCH: "^"}
    for model, result in results["models"].items():
        if "latency_ms" not in result:
            continue
        xs = [result["gflops"]["full"], result["gflops"]["condensed"]]
        for path_name, latency in result["latency_ms"].items():
            ys = [latency["full"], latency["condensed"]]
            axes.plot(xs, ys, marker=markers.get(path_name, "o"), label=f"{model} {path_name}")
    axes.set_xlabel("GFLOPs per image (closed form): full and condensed tower")
    axes.set_ylabel("median latency, batch 1 (ms)")
    axes.set_ylim(bottom=0)
    axes.set_title(f"{results['device']}: latency against GFLOPs", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    common.save_plot(figure, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-16", "ViT-L-14"])
    parser.add_argument("--pretrained", default="none", help="weights tag or 'none' (default)")
    parser.add_argument("--drop-rate", type=float, default=0.1, help="TCA r (default 0.1)")
    parser.add_argument("--merge-centers", type=int, default=2, help="TCA K (default 2)")
    parser.add_argument("--runs", type=int, default=200, help="timed rounds (default 200)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed rounds (default 30)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--workspace", type=int, default=2048, help="TensorRT workspace, MB")
    parser.add_argument(
        "--replot", metavar="JSON", type=Path, help="only redraw the PNG of a saved result"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return 0
    usable, missing = probe_paths()
    if not usable:
        lines = "\n".join(f"  {name}: {reason}" for name, reason in missing.items())
        print(f"bench_gpu: no GPU path is usable on this machine:\n{lines}", file=sys.stderr)
        return 1
    device = usable.get(TENSORRT) or usable.get(TORCH) or "cuda gpu"
    print(f"bench_gpu on {device}: {', '.join(usable)}")
    results: dict[str, Any] = {
        "device": device,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "settings": {
            "batch_size": 1,
            "runs": args.runs,
            "warmup": args.warmup,
            "drop_rate": args.drop_rate,
            "merge_centers": args.merge_centers,
            "pretrained": args.pretrained,
            "opset": args.opset,
        },
        "timing": (
            "median wall-clock ms of one batch-1 forward, synchronised before and after; full and "
            "condensed interleaved. TensorRT and ONNX Runtime times include the image copy to "
            "the GPU and the output copies back; PyTorch's inputs live on the GPU."
        ),
        "unavailable": missing,
        "models": {},
    }
    for model in args.models:
        print(model)
        try:
            results["models"][model] = bench_model(model, args, usable)
        except UserError as exc:
            results["models"][model] = {"error": str(exc)}
            print(f"  {model}: {exc}", file=sys.stderr)
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_") or "gpu"
    out = common.RESULTS / f"gpu_{slug}.json"
    common.write_json(out, results)
    plot(results, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
