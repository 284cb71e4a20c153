"""End-to-end frames per second of the device pipeline on a folder of JPEGs: zeroshot vs tca.

Generates ``--images`` JPEGs (``--size``, smooth random content) in a temporary folder. Every
bundle given runs method zeroshot, and tca too when its engine condenses, each with its own engine
and pipeline, exactly as ``vlm-edge run`` does per frame (decode + preprocess, engine, logits,
reservoir update, correction). The runs are interleaved frame by frame, so a busy machine slows
all of them alike; ``--warmup`` frames per run are not counted. Reports frames per second (over
each run's own frame times) and the median and mean time of every stage.

    python benchmarks/bench_pipeline.py [BUNDLE ...] [--images 64] [--size 640x480] [--threads N]

Give a zeroshot bundle and a tca bundle of one model to compare the full and the condensed tower.
Without BUNDLE it builds the tiny test bundle of tests/fakebundle.py (a 32 px toy engine: the
numbers then show the runtime's own per-frame overhead, not a model's speed). Prints a table and
writes benchmarks/results/pipeline.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import numpy as np
import onnxruntime
from PIL import Image

from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.base import EngineBackend
from vlm_export.runtime.engines.factory import BACKENDS, open_backend
from vlm_export.runtime.io.sources import Frame, open_source
from vlm_export.runtime.pipeline import Pipeline

ROOT = common.ROOT
RESULTS = common.RESULTS / "pipeline.json"
STAGES = ("preprocess", "engine", "reservoir", "correction", "total")


@dataclass
class Run:
    """One (bundle, method) pipeline and what it measured."""

    label: str
    bundle: Bundle
    method: str
    backend: EngineBackend
    pipeline: Pipeline
    wall_ms: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)

    def step(self, frame: Frame) -> None:
        start = time.perf_counter()
        result = self.pipeline.process(frame.data, frame.index, frame.source)
        self.wall_ms.append((time.perf_counter() - start) * 1000.0)
        for stage, ms in result.timings.items():
            self.stages.setdefault(stage, []).append(ms)

    def report(self) -> dict[str, Any]:
        manifest = self.bundle.manifest
        report = {
            "bundle": self.label,
            "model": manifest["model"]["name"],
            "untrained": self.bundle.untrained,
            "bundle_method": self.bundle.method,
            "method": self.method,
            "gflops": manifest["flops"].get("condensed_gflops"),
            "classes": self.bundle.num_classes,
            "engine": self.backend.description,
            "frames": len(self.wall_ms),
            "frames_per_second": round(1000.0 * len(self.wall_ms) / sum(self.wall_ms), 2),
            "median_ms": {s: round(statistics.median(v), 4) for s, v in self.stages.items()},
            "mean_ms": {s: round(statistics.fmean(v), 4) for s, v in self.stages.items()},
        }
        if self.pipeline.reservoir is not None:
            report["reservoir_entries"] = int(self.pipeline.reservoir.counts().sum())
            report["anchors_valid"] = int(self.pipeline.reservoir.anchors()[1].sum())
        return report


def write_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """Smooth random photo-like JPEGs (upsampled colour fields plus mild noise)."""
    rng = np.random.default_rng(seed)
    width, height = size
    for index in range(count):
        field_ = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(field_).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            folder / f"frame_{index:04d}.jpg", quality=90
        )


def fixture_bundle(folder: Path) -> Path:
    """The tiny test bundle (tests/fakebundle.py; needs the onnx package)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fakebundle import make_bundle

    return make_bundle(folder / "fixture-bundle", method="tca")


def make_runs(bundle_dirs: list[Path], args: argparse.Namespace) -> list[Run]:
    """zeroshot (and tca for condensing engines) for every bundle, each with its own engine."""
    providers = args.providers.split(",") if args.providers else None
    runs = []
    for folder in bundle_dirs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # untrained bundles are fine for timing
            bundle = Bundle.open(folder)
        methods = ["zeroshot"] + (["tca"] if "anchors" in bundle.engine_io("inputs") else [])
        for method in methods:
            backend = open_backend(bundle, args.backend, providers, args.threads)
            pipeline = Pipeline(bundle, backend, method)
            runs.append(Run(folder.name, bundle, method, backend, pipeline))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="*", help="bundle folders (default: build the tiny one)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", default="640x480", help="JPEG size WxH (default 640x480)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    parser.add_argument("--providers", help="ONNX Runtime providers, comma-separated")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        fixture = not args.bundles
        bundle_dirs = [fixture_bundle(tmp_path)] if fixture else [Path(b) for b in args.bundles]
        runs = make_runs(bundle_dirs, args)
        folder = tmp_path / "images"
        folder.mkdir()
        write_jpegs(folder, args.images, (width, height))
        frames = list(open_source(str(folder)))
        for run in runs:  # warm-up on a throwaway pipeline, then a fresh one (empty reservoir)
            for frame in frames[: args.warmup]:
                run.pipeline.process(frame.data)
            run.pipeline = Pipeline(run.bundle, run.backend, run.method)
        for frame in frames:
            for run in runs:
                run.step(frame)

    report = {
        "benchmark": "pipeline",
        "fixture_bundle": fixture,
        "images": {"count": args.images, "size": [width, height], "format": "jpeg"},
        "machine": {
            **common.machine(),
            "onnxruntime": onnxruntime.__version__,
            "threads": args.threads,
        },
        "results": [run.report() for run in runs],
    }
    print(f"{args.images} JPEGs {width}x{height}, {platform.machine()} x{os.cpu_count()} CPUs")
    header = f"{'bundle':<20}{'method':<10}{'fps':>8}" + "".join(f"{s:>12}" for s in STAGES)
    print(header + "   (median ms)")
    for result in report["results"]:
        stages = "".join(
            f"{result['median_ms'][s]:>12.3f}" if s in result["median_ms"] else f"{'-':>12}"
            for s in STAGES
        )
        name = result["bundle"][:19]
        print(f"{name:<20}{result['method']:<10}{result['frames_per_second']:>8.2f}{stages}")
    common.write_json(args.out, report)


if __name__ == "__main__":
    main()
