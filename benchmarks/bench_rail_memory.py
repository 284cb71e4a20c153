"""Peak resident memory of primal RAIL learning and merging against the d_h x d_h matrix size.

Each case runs in a fresh Python process and reports its peak RSS (VmHWM from /proc/self/status)
and its RSS after imports (NumPy, SciPy: the floor every case pays):

- learn: a fresh cholesky-route learner learns a first domain (--samples synthetic embeddings of
  --classes classes), solves, saves its learner state, loads it again, learns one incremental
  batch (--batch samples of other classes), solves and saves: `vlm-edge learn` twice without
  the engine.
- merge: two such states (written beforehand by another process) merged with
  merge_learner_files and saved, as `vlm-edge merge` does.

The goal (issue 11): peak <= 1.3 x the matrix (8 d_h^2 bytes) plus what one batch needs.

    python benchmarks/bench_rail_memory.py [--hidden-dims 4096,8192,15000]

Prints and writes benchmarks/results/rail_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import numpy as np

IN_DIM, CLASSES = 512, 1100
BUNDLE = "0123456789abcdef"
RESULTS = common.RESULTS / "rail_memory.json"


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def features(seed: int, count: int, first_class: int, classes: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, IN_DIM)).astype(np.float32)  # engine embeddings are float32
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, first_class + np.arange(count) % classes


def learn_case(hidden: int, folder: Path, samples: int, classes: int, batch: int, seed: int):
    from vlm_export.runtime.rail import PrimalAdapter
    from vlm_export.runtime.rail.state import load_learner_state, save_learner_state

    floor = status_kib("VmRSS")
    path = folder / f"learner{seed}.npz"
    learner = PrimalAdapter(IN_DIM, CLASSES, hidden, seed=0)
    learner.partial_fit(*features(seed, samples, 0, classes))
    learner.finalize()
    save_learner_state(path, learner, BUNDLE)
    del learner
    learner = load_learner_state(path, BUNDLE)
    learner.partial_fit(*features(seed + 100, batch, classes, classes))
    learner.finalize()
    save_learner_state(path, learner, BUNDLE)
    return floor


def merge_case(hidden: int, folder: Path, *_: object):
    from vlm_export.runtime.rail.state import merge_learner_files, save_learner_state

    floor = status_kib("VmRSS")
    paths = [folder / "learner1.npz", folder / "learner2.npz"]
    merged = merge_learner_files(paths, BUNDLE)
    save_learner_state(folder / "merged.npz", merged, BUNDLE)
    return floor


def child(case: str, hidden: int, folder: str, samples: int, classes: int, batch: int) -> None:
    """Run one case in this (fresh) process and print its memory figures as JSON."""
    import scipy.linalg  # noqa: F401 - part of the floor, as in the command

    run = {"learn": learn_case, "merge": merge_case, "prepare": learn_case}[case]
    seeds = [1, 2] if case == "prepare" else [1]
    for seed in seeds:
        floor = run(hidden, Path(folder), samples, classes, batch, seed)
    print(json.dumps({"floor_kib": floor, "peak_kib": status_kib("VmHWM")}))


def measure(case: str, hidden: int, folder: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", case, str(hidden), folder]
    command += [str(args.samples), str(args.classes), str(args.batch)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    figures = json.loads(output.strip().splitlines()[-1])
    matrix = 8 * hidden * hidden
    batch = 8 * args.samples * hidden  # phi of the largest batch, float64
    peak, floor = figures["peak_kib"] * 1024, figures["floor_kib"] * 1024
    return {
        "peak_rss_mib": round(peak / 2**20, 1),
        "floor_rss_mib": round(floor / 2**20, 1),
        "matrix_mib": round(matrix / 2**20, 1),
        "peak_over_matrix": round(peak / matrix, 3),
        "peak_above_floor_over_matrix": round((peak - floor) / matrix, 3),
        "goal_mib": round((1.3 * matrix + batch) / 2**20, 1),
        "within_goal": peak <= 1.3 * matrix + batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-dims", default="4096,8192,15000")
    parser.add_argument("--samples", type=int, default=1600, help="first domain's samples")
    parser.add_argument("--classes", type=int, default=100, help="classes per domain")
    parser.add_argument("--batch", type=int, default=128, help="the incremental batch")
    args = parser.parse_args()
    report = {
        "benchmark": "rail_memory",
        "shapes": {"in_dim": IN_DIM, "classes": CLASSES, "samples": args.samples},
        "goal": "peak RSS <= 1.3 x the d_h x d_h float64 matrix + phi of one batch",
        "cases": {},
        "numpy": np.__version__,
        "machine": common.machine(),
    }
    for hidden in (int(value) for value in args.hidden_dims.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            cases = {"learn": measure("learn", hidden, folder, args)}
            measure("prepare", hidden, folder, args)  # two states to merge (not measured)
            cases["merge"] = measure("merge", hidden, folder, args)
        report["cases"][str(hidden)] = cases
        print(hidden, json.dumps(cases), flush=True)
    print(json.dumps(report, indent=2))
    common.write_json(RESULTS, report)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        case, hidden, folder, samples, classes, batch = sys.argv[2:8]
        child(case, int(hidden), folder, int(samples), int(classes), int(batch))
    else:
        main()
