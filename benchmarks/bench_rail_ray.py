"""Throughput of `vlm-edge learn --ray` on a local Ray instance, and the reduction's memory.

Images per second through decode, preprocess, engine and float64 accumulation of G and B, with
1 and 2 Ray workers (engine actors) and, for reference, in one process without Ray; then the
pairwise tree reduction's time and every worker's peak RSS against the d_h x d_h matrix. The
default bundle is the small ONNX test bundle of tests/fakebundle.py (its engine is cheap, so
the figures show Ray's own overhead); pass --bundle for a real one (its first domain's classes
are used for labels).

    python benchmarks/bench_rail_ray.py [--bundle DIR] [--images 400] [--hidden-dim 4096]
    # on a cluster: ray start --head (then ray start --address HEAD:6379 on the others)
    python benchmarks/bench_rail_ray.py --bundle DIR --address HEAD:6379 --workers 1,8

Prints and writes benchmarks/results/rail_ray.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import common
import numpy as np

from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.factory import open_backend
from vlm_export.runtime.pipeline import Pipeline
from vlm_export.runtime.rail.embed import embed_images
from vlm_export.runtime.rail.primal import PrimalAdapter
from vlm_export.runtime.rail.scaleout import RayStatistics

RESULTS = common.RESULTS / "rail_ray.json"


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_bundle(folder: Path) -> Path:
    sys.path.insert(0, str(common.ROOT / "tests"))
    from fakebundle import make_bundle

    return make_bundle(folder / "bundle", method="tca+rail", image_size=64, width=64)


def images(folder: Path, count: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        path = folder / f"{index:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def new_learner(bundle: Bundle, hidden: int) -> PrimalAdapter:
    return PrimalAdapter(bundle.text_embeddings.shape[1], bundle.num_classes, hidden, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle folder (default: the small test bundle)")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--hidden-dim", type=int, default=4096)
    parser.add_argument("--workers", default="1,2", help="worker counts to time")
    parser.add_argument("--address", help="a running Ray cluster (default: a local instance)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = Path(args.bundle) if args.bundle else test_bundle(folder)
        with warnings.catch_warnings():
            logging.getLogger("vlm_export.runtime.bundle").setLevel(logging.ERROR)  # random weights
            bundle = Bundle.open(path)
        domain = bundle.domain_class_indices(bundle.domains[0])
        paths = images(folder, args.images)
        labels = np.asarray(domain, dtype=np.int64)[np.arange(len(paths)) % len(domain)]
        engine = {"backend": "onnxruntime", "providers": None, "threads": 1}
        backend = open_backend(bundle, "onnxruntime", None, 1)
        start = time.perf_counter()
        features, _ = embed_images(Pipeline(bundle, backend, "zeroshot"), paths, "images")
        new_learner(bundle, args.hidden_dim).accumulate(features, labels)
        single = len(paths) / (time.perf_counter() - start)
        backend.close()
        runs = {}
        for count in (int(value) for value in args.workers.split(",")):
            learner = new_learner(bundle, args.hidden_dim)
            before = peak_rss_mib()
            with RayStatistics(bundle, learner, args.address, count, engine) as cluster:
                start = time.perf_counter()
                cluster.accumulate(paths, labels)
                embed_s = time.perf_counter() - start
                start = time.perf_counter()
                cluster.reduce_into(learner)
                reduce_s = time.perf_counter() - start
                peaks = [round(value / 2**20, 1) for value in cluster.worker_peaks]
            runs[str(count)] = {
                "images_per_s": round(len(paths) / embed_s, 1),
                "reduction_s": round(reduce_s, 2),
                "worker_peak_rss_mib": peaks,
                "driver_peak_rss_mib_before": round(before, 1),
                "driver_peak_rss_mib_after": round(peak_rss_mib(), 1),
            }
            print(count, json.dumps(runs[str(count)]), flush=True)
    matrix_mib = 8 * args.hidden_dim**2 / 2**20
    report = {
        "benchmark": "rail_ray",
        "bundle": "tests/fakebundle.py (small ONNX graph)" if not args.bundle else path.name,
        "images": len(paths),
        "hidden_dim": args.hidden_dim,
        "matrix_mib": round(matrix_mib, 1),
        "single_process_images_per_s": round(single, 1),
        "ray": runs,
        "address": args.address or "local instance",
        "machine": common.machine(),
    }
    print(json.dumps(report, indent=2))
    common.write_json(RESULTS, report)


if __name__ == "__main__":
    main()
