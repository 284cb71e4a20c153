"""Per-frame cost of the TCA reservoir (update + correction) at ImageNet scale, ViT-B/16 shapes.

Reservoirs of C=1000 classes, capacity 3, L=12 layers of width 768 and anchor layers 2, 5, 8 are
filled (every class holds 3 entries, anchors active), then one stream of frames is timed: update,
correction, and both, for the reference tau=0.1 (all 12 layers in the correction) and tau=0.01
(leading layers skipped). A third case, ``camera``, is what a camera sees: the same 1000-class
reservoir (tau=0.1) fed a stream of ``--seen`` classes only (default 20), from empty; its
correction reads only the rows of the entries stored so far. NumPy's BLAS runs on ``--threads``
threads (default 1, as in the service, which keeps it on one thread beside the engine).

Each frame also times products of a full reservoir's size (3000 entries of 12 x 768 values): the
float32 matrix-vector product the correction makes at tau=0.1 (its floor: it reads every stored
float once), the same product over entry-minor storage (a [L*D, C*M] matrix), and the product
from two-byte copies (float16, and int16 with one scale per entry) converted to float32 in
blocks of 32 entries, the only way NumPy reaches BLAS from two-byte storage: what storing the
stacks in half the bytes would cost per frame. Two more read one byte per value: ONNX Runtime's
MatMulNBits (8-bit weights in blocks of 32 along the width, one scale each, the query quantized
to int8 too), once with the weights fixed when the session is built (pre-packed: the floor of a
one-byte reservoir that never changes) and once with the weights fed each run, as a reservoir
that changes every frame would have to. Everything alternates frame by frame, so a busy machine
slows it alike: compare ratios. Times are wall and CPU (this thread) milliseconds.

    python benchmarks/bench_reservoir.py [--frames 1000] [--threads 1]

Prints and writes benchmarks/results/reservoir.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import common
import numpy as np
from threadpoolctl import threadpool_limits

from vlm_export.runtime.tca.reservoir import TokenReservoir
from vlm_export.runtime.tca.reservoir_config import ReservoirConfig

CLASSES, CAPACITY, LAYERS, WIDTH = 1000, 3, 12, 768
ANCHOR_LAYERS = (2, 5, 8)
BLOCK_ROWS = 32  # entries converted to float32 at a time: 1.2 MB, about the size of an L2 cache
TARGET_FRAME_MS = 2.0
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


def product_floors(
    units: np.ndarray, rng: np.random.Generator
) -> tuple[dict[str, Callable[[np.ndarray], np.ndarray]], dict[str, float]]:
    """Affinity products over a full reservoir's unit stacks [C*M, L*D] from each storage, and
    the largest affinity error of each against float32 (for a unit-norm query)."""
    entry_minor = np.ascontiguousarray(units.T)
    half = units.astype(np.float16)
    scale = np.abs(units).max(axis=1) / np.float32(32767)
    fixed = np.round(units / scale[:, None]).astype(np.int16)
    block = np.empty((BLOCK_ROWS, units.shape[1]), np.float32)
    out = np.empty(units.shape[0], np.float32)

    def from_blocks(stored: np.ndarray, query: np.ndarray) -> np.ndarray:
        for start in range(0, len(stored), BLOCK_ROWS):
            rows = stored[start : start + BLOCK_ROWS]
            np.copyto(block[: len(rows)], rows, casting="unsafe")
            np.matmul(block[: len(rows)], query, out=out[start : start + len(rows)])
        return out

    products = {
        "float32": lambda query: np.matmul(units, query, out=out),
        "float32_entry_minor": lambda query: np.matmul(query, entry_minor, out=out),
        "float16_blocks": lambda query: from_blocks(half, query),
        "int16_blocks": lambda query: from_blocks(fixed, query) * scale,
        **int8_block_products(units),
    }
    query = rng.normal(size=units.shape[1]).astype(np.float32)
    query /= np.linalg.norm(query)
    exact = units @ query
    errors = {
        name: float(np.abs(product(query) - exact).max()) for name, product in products.items()
    }
    return products, errors


def int8_block_products(units: np.ndarray) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """ONNX Runtime MatMulNBits over 8-bit copies of ``units`` [N, K] (symmetric blocks of
    ``BLOCK_ROWS`` values along K, one float32 scale each; the query quantized to int8 per block,
    accuracy_level 4): weights constant in the session, and weights fed as inputs."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    rows, width = units.shape
    blocks = units.reshape(rows, width // BLOCK_ROWS, BLOCK_ROWS)
    scales = (np.abs(blocks).max(axis=2) / np.float32(127)).astype(np.float32)
    codes = (np.round(blocks / scales[..., None]) + 128).astype(np.uint8)  # zero point 128
    attributes = {"K": width, "N": rows, "bits": 8, "block_size": BLOCK_ROWS}

    def session(weights_fed: bool) -> onnxruntime.InferenceSession:
        node = helper.make_node(
            "MatMulNBits", ["q", "B", "S"], ["a"], domain="com.microsoft",
            accuracy_level=4, **attributes,
        )  # fmt: skip
        weights = [
            numpy_helper.from_array(codes, "B"),
            numpy_helper.from_array(scales.ravel(), "S"),
        ]
        inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, width])]
        if weights_fed:
            inputs += [
                helper.make_tensor_value_info("B", TensorProto.UINT8, list(codes.shape)),
                helper.make_tensor_value_info("S", TensorProto.FLOAT, [scales.size]),
            ]
            weights = []
        output = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, rows])
        graph = helper.make_graph([node], "affinity", inputs, [output], weights)
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        model = helper.make_model(graph, opset_imports=opsets).SerializeToString()
        return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    fixed, fed = session(False), session(True)
    fed_weights = {"B": codes, "S": scales.ravel()}
    return {
        "int8_blocks_fixed_onnxruntime": lambda query: fixed.run(None, {"q": query[None]})[0][0],
        "int8_blocks_fed_onnxruntime": lambda query: fed.run(
            None, {"q": query[None], **fed_weights}
        )[0][0],
    }


def summary(values: list[float]) -> dict[str, float]:
    """Median and 90th percentile, milliseconds."""
    return {
        "median_ms": round(float(np.median(values)), 4),
        "p90_ms": round(float(np.percentile(values, 90)), 4),
    }


def time_stream(
    reservoirs: dict[str, TokenReservoir],
    frames: int,
    rng: np.random.Generator,
    seen: dict[str, int] | None = None,
) -> dict[str, dict]:
    """Time every reservoir and product frame by frame, interleaved; wall and CPU ms. A
    reservoir named in ``seen`` gets frames of that many classes only (its own stream)."""
    stream = [random_frame(rng, int(rng.integers(CLASSES))) for _ in range(frames)]
    streams = {name: stream for name in reservoirs}
    for name, count in (seen or {}).items():
        streams[name] = [random_frame(rng, int(rng.integers(count))) for _ in range(frames)]
    units = rng.normal(size=(CLASSES * CAPACITY, LAYERS * WIDTH)).astype(np.float32)
    units /= np.linalg.norm(units, axis=1, keepdims=True)
    products, errors = product_floors(units, rng)
    parts = ("update", "correction", "frame")
    wall = {name: {part: [] for part in parts} for name in reservoirs}
    cpu = {name: {part: [] for part in parts} for name in reservoirs}
    product_wall: dict[str, list[float]] = {name: [] for name in products}
    product_cpu: dict[str, list[float]] = {name: [] for name in products}
    versions = {name: reservoir.version for name, reservoir in reservoirs.items()}
    for index, (_, stack) in enumerate(stream):
        for name, reservoir in reservoirs.items():
            logits, own = streams[name][index]
            start, start_cpu = time.perf_counter(), time.thread_time()
            reservoir.update(logits, own)
            middle, middle_cpu = time.perf_counter(), time.thread_time()
            reservoir.correction(own)
            end, end_cpu = time.perf_counter(), time.thread_time()
            clocks = ((wall, start, middle, end), (cpu, start_cpu, middle_cpu, end_cpu))
            for times, before, between, after in clocks:
                times[name]["update"].append((between - before) * 1e3)
                times[name]["correction"].append((after - between) * 1e3)
                times[name]["frame"].append((after - before) * 1e3)
        query = stack.ravel() / np.float32(np.linalg.norm(stack))
        for name, product in products.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            product(query)
            product_wall[name].append((time.perf_counter() - start) * 1e3)
            product_cpu[name].append((time.thread_time() - start_cpu) * 1e3)
    floor_wall = float(np.median(product_wall["float32"]))
    floor_cpu = float(np.median(product_cpu["float32"]))
    results: dict[str, dict] = {"products": {}}
    for name in products:
        results["products"][name] = {
            "wall": summary(product_wall[name]),
            "cpu": summary(product_cpu[name]),
            "wall_over_float32": round(float(np.median(product_wall[name])) / floor_wall, 3),
            "cpu_over_float32": round(float(np.median(product_cpu[name])) / floor_cpu, 3),
            "max_affinity_error": errors[name],
        }
    for name, reservoir in reservoirs.items():
        result: dict = {
            "wall": {part: summary(values) for part, values in wall[name].items()},
            "cpu": {part: summary(values) for part, values in cpu[name].items()},
        }
        result["frame_over_float32_product"] = {
            "wall": round(result["wall"]["frame"]["median_ms"] / floor_wall, 3),
            "cpu": round(result["cpu"]["frame"]["median_ms"] / floor_cpu, 3),
        }
        result["anchor_changes_per_frame"] = round((reservoir.version - versions[name]) / frames, 3)
        state_bytes = sum(array.nbytes for array in reservoir.state_arrays().values())
        result["state_mib"] = round(state_bytes / 2**20, 1)
        results[name] = result
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000, help="timed frames per case")
    parser.add_argument("--threads", type=int, default=1, help="NumPy BLAS threads (default 1)")
    parser.add_argument("--seen", type=int, default=20, help="classes the camera case sees")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    with threadpool_limits(limits=args.threads, user_api="blas"):
        reservoirs = {
            f"tau={tau}": filled_reservoir(ReservoirConfig(capacity=CAPACITY, tau=tau), rng)
            for tau in (0.1, 0.01)
        }
        camera = f"camera, {args.seen} of {CLASSES} classes seen, tau=0.1"
        reservoirs[camera] = TokenReservoir(
            CLASSES, LAYERS, WIDTH, ANCHOR_LAYERS, ReservoirConfig(capacity=CAPACITY, tau=0.1)
        )
        cases = time_stream(reservoirs, args.frames, rng, {camera: args.seen})
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
        "blas_threads": args.threads,
        "conversion_block_entries": BLOCK_ROWS,
        "target_frame_ms": TARGET_FRAME_MS,
        "cases": cases,
        "numpy": np.__version__,
        "machine": common.machine(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    common.write_json(RESULTS, report)


if __name__ == "__main__":
    main()
