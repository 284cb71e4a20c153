"""Cost of one primal RAIL Woodbury batch update, and the size of the RAIL state files.

At d_h = 15000 and b = 128, one streaming update is timed in the spec's order (U = R X^T,
R <- R - U (I + X U)^-1 U^T, W <- W + R X^T (Y - X W): O(d_h^2 b), here the library's
PrimalAdapter.partial_fit with route="woodbury") against the released code's left-to-right order
(R - R X^T (I + X R X^T)^-1 X R: a d_h x d_h intermediate and O(d_h^3)). Both start from the same
R and W; their results are compared. Peak memory is what tracemalloc sees NumPy allocate during
the update (BLAS work buffers are not included), plus the process's peak RSS before and after
the first left-to-right update (the process also holds R, a copy of R for the comparison, and W).

State file sizes at d_h = 15000 and C = 1100 classes: the inference state is written for real;
the learner states (about 2 GB each) are computed from their array shapes plus the .npz overhead
measured on small real files (exact to a few bytes of header), unless --write-learner writes
them too. Dual states (16 shots x 1100 classes kept) are computed from their array shapes.

    python benchmarks/bench_rail_cost.py [--hidden-dim 15000] [--batch 128] [--repeats 2]

Prints and writes benchmarks/results/rail_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from vlm_export.runtime.rail import PrimalAdapter, hidden_features, to_inference
from vlm_export.runtime.rail.state import save_inference_state, save_learner_state

IN_DIM, CLASSES, SHOTS = 512, 1100, 16
BUNDLE = "0123456789abcdef"
RESULTS = Path(__file__).resolve().parent / "results" / "rail_cost.json"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measured(operation, *args) -> tuple[object, float, float]:
    """Run ``operation(*args)``; return (its result, seconds, peak MiB NumPy allocated in it)."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    result = operation(*args)
    seconds = time.perf_counter() - start
    return result, seconds, (tracemalloc.get_traced_memory()[1] - base) / 2**20


def left_to_right(r: np.ndarray, w: np.ndarray, phi: np.ndarray, targets: np.ndarray):
    """The released code's order: every product evaluated left to right."""
    r = r - r @ phi.T @ np.linalg.inv(np.eye(len(phi)) + phi @ r @ phi.T) @ phi @ r
    w = w + r @ phi.T @ (targets - phi @ w)
    return r, w


def batch(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(size, IN_DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True), rng.integers(0, CLASSES, size)


def learner_bytes(hidden: int, route: str) -> int:
    """Bytes of a primal learner state's arrays: W_r, W, G and B or R (float64), the mask."""
    matrices = hidden * IN_DIM + hidden * CLASSES + hidden * hidden
    if route == "cholesky":
        matrices += hidden * CLASSES
    return 8 * matrices + CLASSES


def state_sizes(adapter: PrimalAdapter, folder: Path, write_learner: bool) -> dict:
    """Bytes of the learner (both routes) and inference states for ``adapter``'s shapes."""
    sizes = {}
    path = folder / "inference.npz"
    save_inference_state(path, to_inference(adapter), BUNDLE)
    sizes["inference"] = {"bytes": path.stat().st_size, "how": "written"}
    path.unlink()
    hidden = adapter.hidden_dim
    # .npz overhead (zip entries, .npy headers, meta) from small real files of each route
    for route in ("cholesky", "woodbury"):
        small = PrimalAdapter(IN_DIM, CLASSES, 64, seed=0, route=route)
        save_learner_state(folder / "small.npz", small, BUNDLE)
        overhead = (folder / "small.npz").stat().st_size - learner_bytes(64, route)
        sizes[f"learner_{route}"] = {
            "bytes": learner_bytes(hidden, route) + overhead,
            "how": "from shapes",
        }
    if write_learner:
        path = folder / "learner.npz"
        save_learner_state(path, adapter, BUNDLE)
        sizes["learner_woodbury"] = {"bytes": path.stat().st_size, "how": "written"}
        path.unlink()
    samples = SHOTS * CLASSES  # dual: every training feature is kept
    dual_inference = 8 * (samples * IN_DIM + samples * CLASSES) + CLASSES
    sizes["dual_inference_16_shots"] = {"bytes": dual_inference, "how": "from shapes, arrays only"}
    sizes["dual_learner_16_shots"] = {
        "bytes": dual_inference + 8 * (samples * samples + samples),
        "how": "from shapes, arrays only",
    }
    for record in sizes.values():
        record["MiB"] = round(record["bytes"] / 2**20, 1)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-dim", type=int, default=15000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed updates per order")
    parser.add_argument("--write-learner", action="store_true", help="write the ~2 GB learner file")
    args = parser.parse_args()
    hidden, size = args.hidden_dim, args.batch
    rng = np.random.default_rng(0)
    adapter = PrimalAdapter(IN_DIM, CLASSES, hidden, seed=0, route="woodbury")
    adapter.partial_fit(*batch(rng, size))  # R is no longer diagonal
    tracemalloc.start()
    fast_s, fast_mib, slow_s, slow_mib, diffs = [], [], [], [], []
    for _ in range(args.repeats):
        x, labels = batch(rng, size)
        r0, w0 = adapter.inverse.copy(), adapter.weights.copy()
        _, seconds, mib = measured(adapter.partial_fit, x, labels)
        if not fast_s:  # before any left-to-right update has run
            rss_fast = peak_rss_mib()
        fast_s.append(seconds)
        fast_mib.append(mib)
        phi, targets = hidden_features(x, adapter.projection), np.eye(CLASSES)[labels]
        (r1, w1), seconds, mib = measured(left_to_right, r0, w0, phi, targets)
        slow_s.append(seconds)
        slow_mib.append(mib)
        diffs.append(
            {
                "R_max_rel": float(np.abs(r1 - adapter.inverse).max() / np.abs(r1).max()),
                "W_max_rel": float(np.abs(w1 - adapter.weights).max() / np.abs(w1).max()),
            }
        )
        del r0, w0, r1, w1
    tracemalloc.stop()
    flops_fast = 4 * hidden**2 * size
    flops_slow = 2 * hidden**3 + 6 * hidden**2 * size
    with tempfile.TemporaryDirectory() as folder:
        sizes = state_sizes(adapter, Path(folder), args.write_learner)
    report = {
        "benchmark": "rail_cost",
        "shapes": {"hidden_dim": hidden, "batch": size, "in_dim": IN_DIM, "classes": CLASSES},
        "woodbury_update": {
            "spec_order_median_s": round(float(np.median(fast_s)), 3),
            "left_to_right_median_s": round(float(np.median(slow_s)), 3),
            "speedup": round(float(np.median(slow_s) / np.median(fast_s)), 1),
            "spec_order_peak_numpy_mib": round(max(fast_mib), 1),
            "left_to_right_peak_numpy_mib": round(max(slow_mib), 1),
            "memory_ratio": round(max(slow_mib) / max(fast_mib), 1),
            "R_float64_mib": round(hidden**2 * 8 / 2**20, 1),
            "flops_spec_order_est": flops_fast,
            "flops_left_to_right_est": flops_slow,
            "flop_ratio_est": round(flops_slow / flops_fast, 1),
            "orders_agree": diffs,
            "repeats": args.repeats,
            "process_peak_rss_mib_spec_order_only": round(rss_fast, 1),
            "process_peak_rss_mib_with_left_to_right": round(peak_rss_mib(), 1),
        },
        "state_files": sizes,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS.relative_to(Path(__file__).resolve().parent.parent)}")


if __name__ == "__main__":
    main()
