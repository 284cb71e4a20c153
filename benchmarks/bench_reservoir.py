"""Per-frame cost of the TCA reservoir (update + correction) at ImageNet scale, ViT-B/16 shapes.

Reservoirs of C=1000 classes, capacity 3, L=12 layers of width 768 and anchor layers 2, 5, 8 are
filled (every class holds 3 entries, anchors active), then one stream of frames is timed: update,
correction, and both, for the reference tau=0.1 (all 12 layers in the correction) and tau=0.01
(leading layers skipped). Each frame also times a bare float32 matrix-vector product of a full
reservoir's size, the floor of the correction at tau=0.1 (it reads every stored float once). The
cases and the floor alternate frame by frame, so a busy machine slows them alike: compare ratios.

    python benchmarks/bench_reservoir.py [--frames 1000]

Prints and writes benchmarks/results/reservoir.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import common
import numpy as np

from vlm_export.runtime.tca.reservoir import TokenReservoir
from vlm_export.runtime.tca.reservoir_config import ReservoirConfig

CLASSES, CAPACITY, LAYERS, WIDTH = 1000, 3, 12, 768
ANCHOR_LAYERS = (2, 5, 8)
RESULTS = common.RESULTS / "reservoir.json"


def random_frame(rng: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot logits peaked on ``label`` by a random margin, and a random CLS stack."""
    logits = rng.normal(scale=2.0, size=CLASSES)
    logits[label] = logits.max() + rng.uniform(0.0, 10.0)
    stack = rng.normal(size=(LAYERS, WIDTH))
    return logits.astype(np.float32), stack.astype(np.float32)


def filled_reservoir(config: ReservoirConfig, rng: np.random.Generator) -> TokenReservoir:
    """A reservoir in which every class holds ``capacity`` entries (fed through ``update``)."""
    reservoir = TokenReservoir(CLASSES, LAYERS, WIDTH, ANCHOR_LAYERS, config)
    for _ in range(config.capacity):
        for label in range(CLASSES):
            reservoir.update(*random_frame(rng, label))
    assert reservoir.counts().min() == config.capacity and reservoir.anchors()[1].all()
    return reservoir


def time_stream(
    reservoirs: dict[str, TokenReservoir], frames: int, rng: np.random.Generator
) -> dict[str, dict]:
    """Time every reservoir and the gemv floor on the same frames, interleaved; milliseconds."""
    stream = [random_frame(rng, int(rng.integers(CLASSES))) for _ in range(frames)]
    matrix = rng.normal(size=(CLASSES * CAPACITY, LAYERS * WIDTH)).astype(np.float32)
    vector = rng.normal(size=LAYERS * WIDTH).astype(np.float32)
    times = {name: {"update": [], "correction": [], "frame": []} for name in reservoirs}
    floor_ms = []
    versions = {name: reservoir.version for name, reservoir in reservoirs.items()}
    for logits, stack in stream:
        for name, reservoir in reservoirs.items():
            start = time.perf_counter()
            reservoir.update(logits, stack)
            middle = time.perf_counter()
            reservoir.correction(stack)
            end = time.perf_counter()
            times[name]["update"].append((middle - start) * 1e3)
            times[name]["correction"].append((end - middle) * 1e3)
            times[name]["frame"].append((end - start) * 1e3)
        start = time.perf_counter()
        matrix @ vector
        floor_ms.append((time.perf_counter() - start) * 1e3)
    floor = float(np.median(floor_ms))
    results: dict[str, dict] = {"gemv_floor": {"median_ms": round(floor, 4)}}
    for name, reservoir in reservoirs.items():
        result = {}
        for part, values in times[name].items():
            result[f"{part}_median_ms"] = round(float(np.median(values)), 4)
            result[f"{part}_p90_ms"] = round(float(np.percentile(values, 90)), 4)
        result["frame_over_gemv_floor"] = round(result["frame_median_ms"] / floor, 3)
        result["anchor_changes_per_frame"] = round((reservoir.version - versions[name]) / frames, 3)
        state_bytes = sum(array.nbytes for array in reservoir.state_arrays().values())
        result["state_mib"] = round(state_bytes / 2**20, 1)
        results[name] = result
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000, help="timed frames per case (>= 500)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    reservoirs = {
        f"tau={tau}": filled_reservoir(ReservoirConfig(capacity=CAPACITY, tau=tau), rng)
        for tau in (0.1, 0.01)
    }
    cases = time_stream(reservoirs, args.frames, rng)
    for name, result in cases.items():
        print(f"{name}: {json.dumps(result)}")
    report = {
        "benchmark": "reservoir",
        "shapes": {
            "classes": CLASSES,
            "capacity": CAPACITY,
            "layers": LAYERS,
            "width": WIDTH,
            "anchor_layers": list(ANCHOR_LAYERS),
        },
        "frames": args.frames,
        "target_frame_ms": 3.0,
        "cases": cases,
        "numpy": np.__version__,
        "machine": common.machine(),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    common.write_json(RESULTS, report)


if __name__ == "__main__":
    main()
