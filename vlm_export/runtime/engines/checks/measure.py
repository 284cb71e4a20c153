"""Measuring engines on this device: resident memory, parity with a reference, interleaved latency.

Used by ``vlm-edge bench`` and ``benchmarks/bench_precision.py``. Latencies are batch-1 and
interleaved (one run of every engine per round, after warm-up), so a machine that gets slower
or faster during the measurement shifts every engine alike; the ratios are what to compare.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.manifest import (
    ANCHORS_INPUT,
    EMBEDDING_OUTPUT,
    FATE_OUTPUT,
)
from vlm_export.runtime.engines.base import EngineBackend
from vlm_export.runtime.engines.checks.parity import cls_like_anchors

#: the smallest embedding cosine against fp32 ONNX Runtime for a result to count as passed
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.999, "int8": 0.99}
SETTLE_S = 0.05  # pause before each timed run (see interleaved_latency)


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; else the peak from getrusage)."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def pss_bytes() -> int | None:
    """This process's proportional set size (Linux ``smaps_rollup``; None elsewhere): resident
    memory with each page shared by several mappings counted once among them, which RSS counts
    once per mapping (a weights file mapped by every rung of a ladder)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class MemoryWatch:
    """The largest RSS increase over a baseline, sampled at the calls of ``sample``."""

    def __init__(self) -> None:
        self.baseline = rss_bytes()
        self.peak = self.baseline

    def sample(self) -> None:
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


def synthetic_images(shape: Sequence[int], count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` seeded standard-normal batches of ``shape`` (already in preprocessed space)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(tuple(shape)).astype(np.float32) for _ in range(count)]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def _run(backend: EngineBackend, image: np.ndarray, anchors, valid) -> dict[str, np.ndarray]:
    if anchors is not None:
        backend.set_anchors(anchors, valid)
    return {name: np.array(value) for name, value in backend.infer(image).items()}


def reference_runs(
    reference: EngineBackend, images: Sequence[np.ndarray], manifest: dict[str, Any]
) -> list[tuple[np.ndarray, Any, Any, dict[str, np.ndarray]]]:
    """The cases every engine is compared on, with the reference's outputs.

    Per image with the anchors off; a condensing engine also runs the first image with CLS-like
    anchors on (every class valid), as the reservoir feeds them.
    """
    inputs = {record["name"]: record for record in manifest["engine"]["inputs"]}
    cases = []
    if ANCHORS_INPUT not in inputs:
        return [(image, None, None, _run(reference, image, None, None)) for image in images]
    shape = tuple(int(v) for v in inputs[ANCHORS_INPUT]["shape"])
    off = np.zeros(shape, np.float32), np.zeros(shape[0], np.float32)
    for image in images:
        cases.append((image, *off, _run(reference, image, *off)))
    anchors = cls_like_anchors(cases[0][3], shape, manifest, np.random.default_rng(1))
    valid = np.ones(shape[0], np.float32)
    cases.append((images[0], anchors, valid, _run(reference, images[0], anchors, valid)))
    _run(reference, images[0], *off)
    return cases


def parity(backend: EngineBackend, cases, precision: str) -> dict[str, Any]:
    """Embedding cosine (min, mean) and token-fate agreement of ``backend`` on the cases."""
    cosines, fates = [], []
    for image, anchors, valid, want in cases:
        got = _run(backend, image, anchors, valid)
        cosines.append(_cosine(got[EMBEDDING_OUTPUT], want[EMBEDDING_OUTPUT]))
        if FATE_OUTPUT in want:
            fates.append(float(np.mean(got[FATE_OUTPUT] == want[FATE_OUTPUT])))
    if cases and cases[-1][1] is not None:  # leave the anchors off again
        _run(backend, cases[0][0], np.zeros_like(cases[-1][1]), np.zeros_like(cases[-1][2]))
    threshold = MIN_COSINE.get(precision, MIN_COSINE["fp32"])
    finite = bool(np.all(np.isfinite(cosines)))
    return {
        "embedding_cosine_min": float(np.min(cosines)),
        "embedding_cosine_mean": float(np.mean(cosines)),
        "token_fate_agreement": float(np.mean(fates)) if fates else None,
        "cosine_threshold": threshold,
        "passed": finite and float(np.min(cosines)) >= threshold,
    }


def interleaved_latency(
    runners: dict[Any, Callable[[], object]],
    rounds: int,
    warmup: int = 2,
    settle_s: float = SETTLE_S,
    warm_each: int = 0,
) -> dict[Any, dict[str, float]]:
    """Median and p90 milliseconds per runner over ``rounds`` interleaved rounds after warm-up.

    ``warm_each`` runs each runner that many times in a row first (all of them, before any
    timed run), then ``warmup`` untimed interleaved rounds. Each timed run starts ``settle_s``
    after the previous one ended: thread pools that spin-wait after a run (ONNX Runtime's,
    OpenVINO's) would otherwise take cores from the next engine.
    """
    for run in runners.values():
        for _ in range(warm_each):
            run()
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[Any, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            time.sleep(settle_s)
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000)
    return {
        name: {
            "median_ms": float(np.median(values)),
            "p90_ms": float(np.percentile(values, 90)),
            "rounds": len(values),
        }
        for name, values in times.items()
    }
