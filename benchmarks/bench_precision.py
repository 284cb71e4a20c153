"""Reduced precision on this CPU: condensed ViT-B/16 at bf16 / INT8 against full fp32 ONNX Runtime.

Exports ViT-B-16 (random weights, ``--pretrained none``) full and condensed (r=0.035, K=2) as
bundles, quantizes the condensed one (calibrated on synthetic images: ONNX Runtime QDQ INT8, one
graph per ``--scopes`` entry, and, where nncf is installed, an OpenVINO INT8 IR by NNCF's
transformer preset with the condensation in its ignored scope; each with its gate numbers),
then times batch-1 inference of every engine interleaved (after warm-up,
``vlm_export.runtime.engines.checks.measure``) and reports each median as a ratio of the full
fp32 ONNX Runtime median measured in the same run. Parity is against condensed fp32 ONNX Runtime
on seeded images (anchors off, and on for the first image): embedding cosine and token-fate
agreement, and top-1 agreement on the bundle's classes (anchors off). bf16 runs only where
OpenVINO lists BF16 for this CPU: there the bf16 engine (the condensation in fp32 stages of its
own, ``openvino_split``) is timed beside the whole graph compiled in bf16 with the pins only (what
the split costs), and each INT8 graph also with its float parts in bf16, split and whole.
The result records the CPU's SIMD flags and whether it has VNNI: the INT8 target (0.30x of full
fp32) is for CPUs with VNNI (AVX512-VNNI or AVX-VNNI).

Why fates flip: for the first reduction (where both graphs rank the same 196 patches) the ranking
scores of the fp32 and INT8 graphs are read out (the TopK input of ``/condensers.0``) and each
flipped token's distance to the nearest cut (keep|merge, merge|prune) is compared with the score
perturbation the INT8 graph introduces, both relative to the spread of the scores.

    python benchmarks/bench_precision.py [--rounds 10] [--threads 2] [--scopes mlp,blocks]
                                         [--no-nncf] [--work DIR]  # DIR keeps bundles and graphs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import common
import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image

from vlm_export.core.manifest import TEXT_EMBEDDINGS, read_manifest
from vlm_export.export.int8 import calibration as int8_calibration
from vlm_export.export.int8 import gate as int8_gate
from vlm_export.export.int8 import graph as int8_graph
from vlm_export.export.int8 import nncf as int8_nncf
from vlm_export.export.pipeline import ExportOptions, export_bundle
from vlm_export.models.schedule import CondensationConfig
from vlm_export.runtime.engines.backends.onnxruntime_backend import OnnxRuntimeBackend
from vlm_export.runtime.engines.backends.openvino_backend import (
    ANCHOR_INPUTS,
    OpenVinoBackend,
    compile_config,
    cpu_capabilities,
    import_openvino,
)
from vlm_export.runtime.engines.backends.openvino_precise import pinned_model
from vlm_export.runtime.engines.backends.openvino_split import SplitCompiled
from vlm_export.runtime.engines.base import BundleGraph
from vlm_export.runtime.engines.checks import measure
from vlm_export.runtime.io.preprocess import Preprocessor

CLASSES = ["cat", "dog", "bird", "car", "bus", "truck", "ship", "plane", "horse", "frog"]
#: latency targets as ratios of full fp32 (INT8: on a CPU with VNNI; bf16: with AVX512-BF16/AMX)
TARGET_RATIO = {"bf16": 0.45, "int8": 0.30}
TARGET_COSINE = {"bf16": 0.999, "int8": 0.99}
#: token fates and top-1 on the parity images must agree with fp32 this often
TARGET_AGREEMENT = 0.99
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
FIRST_SCORES = "/condensers.0/TopK"


def export(work: Path, method: str, args: argparse.Namespace) -> Path:
    """The bundle of ``method`` in ``work`` (exported once, reused by later runs)."""
    out = work / method
    if (out / "manifest.json").is_file():
        return out
    torch.manual_seed(0)
    options = ExportOptions(
        method=method,
        model=args.model,
        pretrained="none",
        domains=[("things", CLASSES)],
        templates="single",
        condensation=CondensationConfig(drop_rate=args.drop_rate, merge_centers=args.merge_centers),
        out=out,
        overwrite=True,
        quiet=True,
    )
    return export_bundle(options)


def calibration_images(folder: Path, count: int, manifest: dict[str, Any]) -> list[np.ndarray]:
    """``count`` synthetic photos-like images (smooth random fields), preprocessed."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for index in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((256, 256), Image.Resampling.BICUBIC)
        noise = rng.integers(-20, 21, (256, 256, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"calib_{index:04d}.png")
    return int8_calibration.preprocess_all(
        int8_calibration.image_paths(folder), Preprocessor.from_manifest(manifest)
    )


def cpu_flags() -> list[str]:
    """The CPU's flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return []
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return line.partition(":")[2].split()


def top1_agreement(
    engine: Any, reference: list[dict[str, np.ndarray]], images: list[np.ndarray], text: Any
) -> float:
    """How often ``engine``'s top-1 class (anchors off) is the reference's on ``images``."""
    agree = []
    for image, want in zip(images, reference, strict=True):
        got = engine.infer(image)["embedding"]
        agree.append(int(np.argmax(got @ text.T)) == int(np.argmax(want["embedding"] @ text.T)))
    return float(np.mean(agree))


def view(folder: Path, manifest: dict[str, Any], onnx_file: str) -> BundleGraph:
    return BundleGraph(folder, {**manifest, "engine": {**manifest["engine"], "onnx": onnx_file}})


def with_score_output(source: Path, target: Path) -> str:
    """Copy ``source`` with the first condenser's ranking scores as an extra output; its name."""
    model = onnx.load(str(source))
    node = next(n for n in model.graph.node if n.name == FIRST_SCORES)
    scores = node.input[0]
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(scores))
    onnx.save(model, str(target))
    return scores


def flip_analysis(
    work: Path, tca: Path, manifest: dict[str, Any], int8_file: str, images: list[np.ndarray]
) -> dict[str, Any]:
    """Flipped first-reduction fates against the distance of their scores to the cuts."""
    schedule = manifest["condensation"]["schedule"][0]
    keep, merge = schedule["keep"], schedule["merge"]
    feeds_of = lambda image: int8_calibration.engine_feeds(manifest, image)  # noqa: E731
    runs = {}
    for name, source in (("fp32", tca / manifest["engine"]["onnx"]), ("int8", work / int8_file)):
        instrumented = work / f"scores_{name}.onnx"
        scores = with_score_output(source, instrumented)
        session = ort.InferenceSession(str(instrumented), providers=["CPUExecutionProvider"])
        runs[name] = []
        for image in images:
            fate, score = session.run(["token_fate", scores], feeds_of(image))
            runs[name].append({"fate": fate, "scores": score})
        del session
        instrumented.unlink()
    flipped_gaps, all_gaps, perturbations, flips, tokens = [], [], [], 0, 0
    for ref, got in zip(runs["fp32"], runs["int8"], strict=True):
        s = ref["scores"][0].astype(np.float64)
        spread = float(np.std(s)) or 1.0
        ordered = np.sort(s)[::-1]
        cuts = [(ordered[keep - 1] + ordered[keep]) / 2]
        if merge:
            cuts.append((ordered[keep + merge - 1] + ordered[keep + merge]) / 2)
        gap = np.min(np.abs(s[:, None] - np.array(cuts)[None]), axis=1) / spread
        flipped = ref["fate"][0, 0] != got["fate"][0, 0]
        flips += int(flipped.sum())
        tokens += flipped.size
        flipped_gaps.extend(gap[flipped].tolist())
        all_gaps.extend(gap.tolist())
        perturbations.extend((np.abs(got["scores"][0] - s) / spread).tolist())
    return {
        "reduction": 0,
        "layer": schedule["layer"],
        "tokens": tokens,
        "flipped": flips,
        "flip_rate": flips / max(tokens, 1),
        "flipped_gap_to_cut_median": float(np.median(flipped_gaps)) if flipped_gaps else None,
        "flipped_gap_to_cut_max": float(np.max(flipped_gaps)) if flipped_gaps else None,
        "all_gap_to_cut_median": float(np.median(all_gaps)),
        "score_perturbation_median": float(np.median(perturbations)),
        "score_perturbation_p99": float(np.percentile(perturbations, 99)),
        "units": "multiples of the std of the 196 ranking scores of the image",
    }


def whole_bf16(graph: Path, threads: int, pinned: bool) -> Any:
    """``graph`` compiled whole with bf16 inference precision (``pinned``: with the typed pins
    on the condensation, which the plugin's transformations partly drop): what the split saves
    against."""
    ov = import_openvino()
    core = ov.Core()
    model = core.read_model(str(graph))
    if pinned:
        model, _ = pinned_model(ov, core, model)
    return core.compile_model(model, "CPU", compile_config("bf16", threads))


def split_bf16(graph: Path, threads: int) -> Any:
    """``graph`` in stages, as the bf16 backend cuts it: the condensation in fp32, the rest with
    bf16 inference precision (for an INT8 graph: its float parts)."""
    ov = import_openvino()
    core = ov.Core()
    model = core.read_model(str(graph))
    return SplitCompiled(ov, core, model, compile_config("bf16", threads), ANCHOR_INPUTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--drop-rate", type=float, default=0.035)
    parser.add_argument("--merge-centers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scopes", default="mlp,blocks", help="quantization scopes to build")
    parser.add_argument("--calibration-images", type=int, default=24)
    parser.add_argument("--parity-images", type=int, default=16)
    parser.add_argument(
        "--no-nncf",
        action="store_true",
        help="skip the NNCF OpenVINO INT8 IR (else built where nncf is installed)",
    )
    parser.add_argument("--work", type=Path, help="folder for bundles and graphs (reused)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-precision-"))
    work.mkdir(parents=True, exist_ok=True)
    full, tca = export(work, "zeroshot", args), export(work, "tca", args)
    manifest = read_manifest(tca)
    calibration = calibration_images(work / "calibration", args.calibration_images, manifest)
    calibration, held_out = int8_calibration.split_held_out(calibration)
    gates, int8_files = {}, {}
    for scope in args.scopes.split(","):
        name = f"int8_{scope}.onnx"
        if not (work / name).is_file():
            int8_graph.quantize_graph(
                tca / manifest["engine"]["onnx"], work / name, manifest, calibration, scope
            )
        gates[scope] = int8_gate.gate_report(tca, manifest, work / name, calibration, held_out)
        int8_files[scope] = name
        print(f"int8 {scope}: {int8_gate.describe_gate(gates[scope])}", flush=True)
    nncf_file = None
    if not args.no_nncf and importlib.util.find_spec("nncf") is not None:
        nncf_file = "int8_nncf.xml"
        if not (work / nncf_file).is_file():
            int8_nncf.quantize_ir(
                tca / manifest["engine"]["onnx"], work / nncf_file, manifest, calibration
            )
        gates["nncf"] = int8_gate.gate_report(
            tca, manifest, work / nncf_file, calibration, held_out
        )
        print(f"int8 nncf: {int8_gate.describe_gate(gates['nncf'])}", flush=True)

    cpu = ["CPUExecutionProvider"]
    shape = [int(v) for v in manifest["engine"]["inputs"][0]["shape"]]
    images = measure.synthetic_images(shape, args.parity_images, seed=3)
    capabilities = cpu_capabilities(import_openvino().Core())
    text = np.load(tca / manifest["text"].get("embeddings", TEXT_EMBEDDINGS))
    engines: dict[str, dict[str, Any]] = {}
    opened = {}
    reference = OnnxRuntimeBackend(BundleGraph(tca, manifest), cpu, args.threads)
    cases = measure.reference_runs(reference, images, manifest)
    plan: list[tuple[str, str, str, Any]] = [
        (
            "full",
            "onnxruntime",
            "fp32",
            lambda: OnnxRuntimeBackend(BundleGraph(full, read_manifest(full)), cpu, args.threads),
        ),
        ("condensed", "onnxruntime", "fp32", lambda: reference),
        (
            "condensed",
            "openvino",
            "fp32",
            lambda: OpenVinoBackend(BundleGraph(tca, manifest), "fp32", args.threads),
        ),
    ]
    if "BF16" in capabilities:
        plan.append(
            (
                "condensed",
                "openvino",
                "bf16",
                lambda: OpenVinoBackend(BundleGraph(tca, manifest), "bf16", args.threads),
            )
        )
        plan.append(
            (
                "condensed, whole graph (pins only)",
                "openvino",
                "bf16",
                lambda: OpenVinoBackend(
                    BundleGraph(tca, manifest),
                    "bf16",
                    args.threads,
                    compiled=whole_bf16(
                        tca / manifest["engine"]["onnx"], args.threads, pinned=True
                    ),
                ),
            )
        )
    for scope, name in int8_files.items():
        plan.append(
            (
                f"condensed int8 {scope}",
                "onnxruntime",
                "int8",
                lambda n=name: OnnxRuntimeBackend(view(work, manifest, n), cpu, args.threads),
            )
        )
        bf16_variants = {
            "condensation fp32": lambda path: split_bf16(path, args.threads),
            "whole graph": lambda path: whole_bf16(path, args.threads, pinned=False),
        }
        for variant, compile_bf16 in bf16_variants.items() if "BF16" in capabilities else ():
            plan.append(
                (
                    f"condensed int8 {scope}, float parts bf16 ({variant})",
                    "openvino",
                    "int8",
                    lambda n=name, c=compile_bf16: OpenVinoBackend(
                        view(work, manifest, n), "int8", args.threads, compiled=c(work / n)
                    ),
                )
            )
        plan.append(
            (
                f"condensed int8 {scope}",
                "openvino",
                "int8",
                lambda n=name: OpenVinoBackend(
                    view(work, manifest, n), "int8", args.threads, graph=work / n
                ),
            )
        )
    if nncf_file is not None:
        plan.append(
            (
                "condensed int8 nncf",
                "openvino",
                "int8",
                lambda: OpenVinoBackend(
                    BundleGraph(tca, manifest), "int8", args.threads, graph=work / nncf_file
                ),
            )
        )
    reference_outputs = [reference.infer(image) for image in images]
    for tower, backend, precision, opener in plan:
        key = f"{tower} / {backend} {precision}"
        watch = measure.MemoryWatch()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = opener()
        row: dict[str, Any] = {"tower": tower, "backend": backend, "precision": precision}
        if tower != "full":
            row.update(measure.parity(engine, cases, precision))
            row["top1_agreement"] = top1_agreement(engine, reference_outputs, images, text)
        watch.sample()
        row["memory_mb"] = watch.delta_mb
        engines[key], opened[key] = row, engine
        print(f"opened {key}", flush=True)
    image = images[0]
    timings = measure.interleaved_latency(
        {key: (lambda e=e: e.infer(image)) for key, e in opened.items()}, args.rounds, args.warmup
    )
    base = timings["full / onnxruntime fp32"]["median_ms"]
    for key, timing in timings.items():
        engines[key].update(timing, ratio_to_full_fp32=timing["median_ms"] / base)
    for engine in opened.values():
        engine.close()
    opened.clear()
    flips = {
        scope: flip_analysis(work, tca, manifest, name, images)
        for scope, name in int8_files.items()
    }
    targets = []
    for key, row in engines.items():
        if row["precision"] in TARGET_COSINE and row["tower"].startswith("condensed"):
            agreement = {
                "cosine": row["embedding_cosine_min"] >= TARGET_COSINE[row["precision"]],
                "token_fates": (row["token_fate_agreement"] or 0.0) >= TARGET_AGREEMENT,
                "top1": row["top1_agreement"] >= TARGET_AGREEMENT,
            }
            targets.append(
                {
                    "engine": key,
                    "ratio": row["ratio_to_full_fp32"],
                    "ratio_target": TARGET_RATIO[row["precision"]],
                    "cosine_min": row["embedding_cosine_min"],
                    "token_fate_agreement": row["token_fate_agreement"],
                    "top1_agreement": row["top1_agreement"],
                    "parity_met": agreement,
                    "met": row["ratio_to_full_fp32"] <= TARGET_RATIO[row["precision"]]
                    and all(agreement.values()),
                }
            )
    flags = cpu_flags()
    result = {
        "benchmark": "bench_precision",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "weights": "random (--pretrained none)",
        "condensation": {"drop_rate": args.drop_rate, "merge_centers": args.merge_centers},
        "machine": common.machine(),
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))),
        "vnni": any(flag in flags for flag in VNNI_FLAGS),
        "int8_target_note": "the 0.30x INT8 target is for CPUs with VNNI; without it, what the "
        "engines reach here",
        "openvino_cpu_capabilities": capabilities,
        "bf16": "measured" if "BF16" in capabilities else "not available on this CPU",
        "threads": args.threads,
        "rounds": args.rounds,
        "parity_reference": "condensed fp32 ONNX Runtime CPU",
        "gates": gates,
        "engines": engines,
        "fate_flips_first_reduction": flips,
        "targets": {
            "ratio_at_most": TARGET_RATIO,
            "cosine": TARGET_COSINE,
            "token_fate_and_top1_agreement": TARGET_AGREEMENT,
            "results": targets,
        },
    }
    path = common.RESULTS / f"precision_{args.model}.json"
    common.write_json(path, result)
    for key, row in engines.items():
        cosine = row.get("embedding_cosine_min")
        fate = row.get("token_fate_agreement")
        top1 = row.get("top1_agreement")
        print(
            f"{key:40s} {row['median_ms']:8.1f} ms  {row['ratio_to_full_fp32']:.3f}x full fp32"
            + (f"  cosine {cosine:.5f}" if cosine is not None else "")
            + (f"  fates {fate:.4f}" if fate is not None else "")
            + (f"  top-1 {top1:.3f}" if top1 is not None else "")
        )
    print(json.dumps(flips, indent=1))
    plot(result, path.with_suffix(".png"))


def plot(result: dict[str, Any], path: Path) -> None:
    """Latency ratio per engine (if matplotlib is installed)."""
    plt = common.pyplot()
    if plt is None:
        return
    rows = list(result["engines"].items())
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    ax.barh([key for key, _ in rows], [row["ratio_to_full_fp32"] for _, row in rows])
    for color, (precision, ratio) in zip(("C1", "C2"), TARGET_RATIO.items(), strict=True):
        ax.axvline(ratio, color=color, linestyle="--", label=f"{precision} target {ratio}x")
    ax.set_xlabel("median latency / full fp32 ONNX Runtime (same run)")
    ax.set_title(f"{result['model']} batch 1, {result['machine']['cpu']}")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    common.save_plot(fig, path)


if __name__ == "__main__":
    main()
