"""Cost of one primal RAIL Woodbury batch update and of the first domain's solve, and the size of
the RAIL state files.

At d_h = 15000 and b = 128, one streaming update is timed in the spec's order (U = R X^T,
R <- R - U (I + X U)^-1 U^T, W <- W + R X^T (Y - X W): O(d_h^2 b), here the library's
PrimalAdapter.partial_fit with route="woodbury") against the released code's left-to-right order
(R - R X^T (I + X R X^T)^-1 X R: a d_h x d_h intermediate and O(d_h^3)). Both start from the same
R and W; their results are compared. Peak memory is what tracemalloc sees NumPy allocate during
the update (BLAS work buffers are not included), plus the process's peak RSS (it also holds R,
the left-to-right result for the comparison and W; benchmarks/bench_rail_memory.py measures the
learner's own peak).
The update is also timed in the previous release of this project (R X^T, then the d x d
downdate as a general matrix product by row blocks) for the record.

First domain: a fresh cholesky-route learner learns --first-samples samples of --first-classes
classes (the reference Aircraft domain: 100 classes x 16 shots) and solves W, today
(PrimalAdapter.partial_fit + finalize) against the previous release's code, kept literally
below (G by general products in row blocks, a copy of G + lambda I, numpy's Cholesky, block
triangular solves of all C columns). The solve alone is also timed for a learner that continues
(G of two domains: no shortcut; in-place factor against copy + factor).

State file sizes at d_h = 15000 and C = 1100 classes: the inference state is written for real;
the learner states (about 2 GB each) are computed from their array shapes plus the .npz overhead
measured on small real files (exact to a few bytes of header), unless --write-learner writes
them too. Dual states (16 shots x 1100 classes kept) are computed from their array shapes.

    python benchmarks/bench_rail_cost.py [--hidden-dim 15000] [--batch 128] [--repeats 2]
        [--first-samples 1600] [--first-classes 100]

Prints and writes benchmarks/results/rail_cost.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import common
import numpy as np

from vlm_export.runtime.rail import PrimalAdapter, hidden_features, to_inference
from vlm_export.runtime.rail.inputs import one_hot
from vlm_export.runtime.rail.state import save_inference_state, save_learner_state

IN_DIM, CLASSES, SHOTS = 512, 1100, 16
BUNDLE = "0123456789abcdef"
RESULTS = common.RESULTS / "rail_cost.json"


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


# ---- the previous release of this project, kept literally for the comparison ----------------
PREVIOUS_BLOCK, PREVIOUS_BLOCK_ELEMENTS = 256, 1 << 23


def previous_add_product(target, left, right, sign):
    rows = max(1, PREVIOUS_BLOCK_ELEMENTS // target.shape[1])
    for start in range(0, target.shape[0], rows):
        product = left[start : start + rows] @ right
        if sign > 0:
            target[start : start + rows] += product
        else:
            target[start : start + rows] -= product


def previous_solve_lower(factor, rhs):
    solution = np.empty(rhs.shape, dtype=np.float64)
    for start in range(0, factor.shape[0], PREVIOUS_BLOCK):
        stop = min(start + PREVIOUS_BLOCK, factor.shape[0])
        block = rhs[start:stop] - factor[start:stop, :start] @ solution[:start]
        solution[start:stop] = np.linalg.solve(factor[start:stop, start:stop], block)
    return solution


def previous_solve_upper(factor, rhs):
    size = factor.shape[0]
    solution = np.empty(rhs.shape, dtype=np.float64)
    for stop in range(size, 0, -PREVIOUS_BLOCK):
        start = max(stop - PREVIOUS_BLOCK, 0)
        block = rhs[start:stop] - factor[stop:, start:stop].T @ solution[stop:]
        solution[start:stop] = np.linalg.solve(factor[start:stop, start:stop].T, block)
    return solution


def previous_woodbury(r, w, phi, targets):
    """R and W updated as the previous release did (R in place)."""
    u = r @ phi.T
    factor = np.linalg.cholesky(np.eye(len(phi)) + phi @ u)
    v = previous_solve_lower(factor, u.T).T
    gain = previous_solve_upper(factor, v.T).T
    w = w + gain @ (targets - phi @ w)
    previous_add_product(r, v, v.T, -1.0)
    return w


def previous_finalize(gram, cross, ridge):
    """W = (G + lambda I)^-1 B as the previous release solved it."""
    system = gram.copy()
    system.flat[:: gram.shape[0] + 1] += ridge
    factor = np.linalg.cholesky(system)
    del system
    return previous_solve_upper(factor, previous_solve_lower(factor, cross))


def previous_first_domain(projection, x, labels, ridge):
    phi = hidden_features(x, projection)
    gram = np.zeros((phi.shape[1], phi.shape[1]))
    previous_add_product(gram, phi.T, phi, 1.0)
    cross = phi.T @ one_hot(labels, CLASSES)
    return previous_finalize(gram, cross, ridge), gram, cross


def first_domain(hidden: int, samples: int, classes: int) -> dict:
    """First-domain learn + solve, and a continuing solve, today against the previous release."""
    rng = np.random.default_rng(1)
    x, _ = batch(rng, samples)
    labels = np.repeat(np.arange(classes), -(-samples // classes))[:samples]
    adapter = PrimalAdapter(IN_DIM, CLASSES, hidden, seed=0)
    start = time.perf_counter()
    adapter.partial_fit(x, labels)
    adapter.finalize()
    today_s = time.perf_counter() - start
    weights_today = adapter.weights.copy()
    more_x, _ = batch(rng, 256)  # a second domain: the solve has no shortcut
    more_labels = classes + np.arange(256) % classes
    adapter.partial_fit(more_x, more_labels)
    start = time.perf_counter()
    adapter.finalize()
    solve_today_s = time.perf_counter() - start
    projection, ridge = adapter.projection, adapter.ridge
    gram, cross = adapter.gram, adapter.cross
    start = time.perf_counter()
    weights_previous_continuing = previous_finalize(gram, cross, ridge)
    solve_previous_s = time.perf_counter() - start
    continuing_rel = float(
        np.abs(weights_previous_continuing - adapter.weights).max()
        / np.abs(weights_previous_continuing).max()
    )
    del adapter, gram, cross, weights_previous_continuing
    start = time.perf_counter()
    weights_previous, _, _ = previous_first_domain(projection, x, labels, ridge)
    previous_s = time.perf_counter() - start
    return {
        "samples": samples,
        "classes": classes,
        "learn_and_solve_today_s": round(today_s, 2),
        "learn_and_solve_previous_s": round(previous_s, 2),
        "speedup": round(previous_s / today_s, 1),
        "W_max_rel_today_vs_previous": float(
            np.abs(weights_today - weights_previous).max() / np.abs(weights_previous).max()
        ),
        "continuing_solve_today_s": round(solve_today_s, 2),
        "continuing_solve_previous_s": round(solve_previous_s, 2),
        "continuing_solve_speedup": round(solve_previous_s / solve_today_s, 1),
        "continuing_W_max_rel": continuing_rel,
    }


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
    parser.add_argument("--first-samples", type=int, default=1600, help="first domain's samples")
    parser.add_argument("--first-classes", type=int, default=100, help="first domain's classes")
    parser.add_argument("--skip-first-domain", action="store_true")
    args = parser.parse_args()
    hidden, size = args.hidden_dim, args.batch
    rng = np.random.default_rng(0)
    adapter = PrimalAdapter(IN_DIM, CLASSES, hidden, seed=0, route="woodbury")
    adapter.partial_fit(*batch(rng, size))  # R is no longer diagonal
    tracemalloc.start()
    fast_s, fast_mib, slow_s, slow_mib, previous_s, diffs = [], [], [], [], [], []
    for _ in range(args.repeats):
        x, labels = batch(rng, size)
        phi, targets = hidden_features(x, adapter.projection), np.eye(CLASSES)[labels]
        w0 = adapter.weights.copy()
        # the released order first, from R itself (R, two d x d products and the result at once)
        (r1, w1), seconds, mib = measured(left_to_right, adapter.inverse, w0, phi, targets)
        slow_s.append(seconds)
        slow_mib.append(mib)
        r0 = adapter.inverse.copy()
        _, seconds, mib = measured(adapter.partial_fit, x, labels)
        fast_s.append(seconds)
        fast_mib.append(mib)
        diffs.append(
            {
                "R_max_rel": float(np.abs(r1 - adapter.inverse).max() / np.abs(r1).max()),
                "W_max_rel": float(np.abs(w1 - adapter.weights).max() / np.abs(w1).max()),
            }
        )
        del r1, w1
        _, seconds, _ = measured(previous_woodbury, r0, w0, phi, targets)
        previous_s.append(seconds)
        del r0, w0
    tracemalloc.stop()
    flops_fast = 4 * hidden**2 * size
    flops_slow = 2 * hidden**3 + 6 * hidden**2 * size
    with tempfile.TemporaryDirectory() as folder:
        sizes = state_sizes(adapter, Path(folder), args.write_learner)
    del adapter
    first = None
    if not args.skip_first_domain:
        first = first_domain(hidden, args.first_samples, args.first_classes)
    report = {
        "benchmark": "rail_cost",
        "shapes": {"hidden_dim": hidden, "batch": size, "in_dim": IN_DIM, "classes": CLASSES},
        "woodbury_update": {
            "spec_order_median_s": round(float(np.median(fast_s)), 3),
            "left_to_right_median_s": round(float(np.median(slow_s)), 3),
            "speedup": round(float(np.median(slow_s) / np.median(fast_s)), 1),
            "previous_release_median_s": round(float(np.median(previous_s)), 3),
            "speedup_previous_release": round(float(np.median(slow_s) / np.median(previous_s)), 1),
            "spec_order_peak_numpy_mib": round(max(fast_mib), 1),
            "left_to_right_peak_numpy_mib": round(max(slow_mib), 1),
            "memory_ratio": round(max(slow_mib) / max(fast_mib), 1),
            "R_float64_mib": round(hidden**2 * 8 / 2**20, 1),
            "flops_spec_order_est": flops_fast,
            "flops_left_to_right_est": flops_slow,
            "flop_ratio_est": round(flops_slow / flops_fast, 1),
            "orders_agree": diffs,
            "repeats": args.repeats,
            "process_peak_rss_mib_with_left_to_right": round(peak_rss_mib(), 1),
        },
        "first_domain": first,
        "state_files": sizes,
        "numpy": np.__version__,
        "machine": common.machine(),
    }
    print(json.dumps(report, indent=2))
    common.write_json(RESULTS, report)


if __name__ == "__main__":
    main()
