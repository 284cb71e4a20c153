"""Capture-to-label latency on a live stream when the engine is slower than the camera.

A synthetic camera delivers ``--frames`` frames at ``--fps`` in real time (a frame every 33.3 ms
at 30 fps, stamped when it is captured), whether or not anyone reads them. The pipeline is the
real per-frame pipeline (TCA) of a bundle whose engine is held to ``--engine-ms`` per frame
(default 50 ms: slower than the camera). Two ways of reading the same stream:

- newest frame (what ``vlm-edge run`` does on cameras): the capture thread of
  ``vlm_export.runtime.io.capture`` hands over the newest frame and drops the stale ones;
- every frame in order: a queue that keeps them all (what reading the camera in the
  classification loop amounts to once the driver buffers frames).

Latency is the time from a frame's capture to its label. Prints the summary and writes
benchmarks/results/camera_latency.json, the per-frame latencies in camera_latency_series.json,
and camera_latency.png when matplotlib is installed.

    python benchmarks/bench_camera_latency.py [BUNDLE] [--frames 1000] [--fps 30] [--engine-ms 50]

Without BUNDLE it builds the tiny test bundle of tests/fakebundle.py.
"""

from __future__ import annotations

import argparse
import logging
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common
import numpy as np

from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.base import EngineBackend
from vlm_export.runtime.engines.factory import open_backend
from vlm_export.runtime.io.capture import NewestFrame
from vlm_export.runtime.io.sources import Frame, Source
from vlm_export.runtime.pipeline import Pipeline

ROOT = common.ROOT
RESULTS = common.RESULTS / "camera_latency.json"
CHECKPOINTS = (100, 500, 1000)


class SyntheticCamera(Source):
    """``count`` frames at ``fps`` in real time; ``timestamp_ms`` is the capture time since t0."""

    live = True
    description = "synthetic camera"

    def __init__(self, count: int, fps: float, size: tuple[int, int]) -> None:
        self.count, self.period = count, 1.0 / fps
        rng = np.random.default_rng(0)
        self.images = [rng.integers(0, 256, (size[1], size[0], 3), np.uint8) for _ in range(8)]
        self.t0 = 0.0

    def __iter__(self) -> Iterator[Frame]:
        self.t0 = time.monotonic()
        for index in range(self.count):
            delay = self.t0 + index * self.period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            stamp = (time.monotonic() - self.t0) * 1000.0
            yield Frame(index, "synthetic", self.images[index % len(self.images)], stamp)

    def close(self) -> None:
        """Nothing to release."""


class SlowEngine(EngineBackend):
    """A real engine held to at least ``ms`` per frame (a bigger model on a smaller device)."""

    def __init__(self, inner: EngineBackend, ms: float) -> None:
        self.inner, self.seconds = inner, ms / 1000.0
        self.description = f"{inner.description} held to {ms:g} ms"

    def set_anchors(self, anchors: np.ndarray, valid: np.ndarray) -> None:
        self.inner.set_anchors(anchors, valid)

    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        outputs = self.inner.infer(image)
        rest = self.seconds - (time.perf_counter() - start)
        if rest > 0:
            time.sleep(rest)
        return outputs


class EveryFrame(Source):
    """Every frame of ``source`` in order, queued by a reader thread (nothing dropped)."""

    def __init__(self, source: Source) -> None:
        self.source, self.frames = source, queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        for frame in self.source:
            self.frames.put(frame)
        self.frames.put(None)

    def __iter__(self) -> Iterator[Frame]:
        self.thread.start()
        while (frame := self.frames.get()) is not None:
            yield frame

    def close(self) -> None:
        self.thread.join()


def measure(pipeline: Pipeline, camera: SyntheticCamera, reader: Source) -> list[tuple[int, float]]:
    """(capture index, capture-to-label ms) for every labelled frame."""
    latencies = []
    for frame in reader:
        result = pipeline.process(frame.data, frame.index, frame.source)
        now = (time.monotonic() - camera.t0) * 1000.0
        assert result.class_name
        latencies.append((frame.index, now - frame.timestamp_ms))
    reader.close()
    return latencies


def _at(latencies: list[tuple[int, float]], frame: int) -> float | None:
    """Latency of the last labelled frame captured at or before 1-based frame ``frame``."""
    seen = [ms for index, ms in latencies if index < frame]
    return round(seen[-1], 1) if seen else None


def summary(latencies: list[tuple[int, float]], captured: int) -> dict[str, Any]:
    """Median, p99 and max latency, latency at the checkpoints, labelled and dropped counts."""
    ms = np.array([value for _, value in latencies])
    return {
        "labelled": len(latencies),
        "dropped": captured - len(latencies),
        "latency_ms": {
            "median": round(float(np.median(ms)), 1),
            "p99": round(float(np.percentile(ms, 99)), 1),
            "max": round(float(ms.max()), 1),
        },
        "latency_ms_at_frame": {str(n): _at(latencies, n) for n in CHECKPOINTS if n <= captured},
        "series": [[index, round(value, 2)] for index, value in latencies],
    }


def plot(report: dict[str, Any], path: Path) -> bool:
    """Latency against capture index for both readers; False without matplotlib."""
    plt = common.pyplot()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for key, label in (
        ("without_dropping", "every frame, in order"),
        ("with_dropping", "newest frame (capture thread)"),
    ):
        series = np.array(report[key]["series"])
        axis.plot(series[:, 0], series[:, 1] / 1000.0, label=label)
    axis.set_xlabel("capture index (frame)")
    axis.set_ylabel("capture-to-label latency (s)")
    axis.set_title(f"{report['fps']:g} fps camera, engine {report['engine_ms']:g} ms per frame")
    axis.legend()
    figure.tight_layout()
    common.save_plot(figure, path)
    return True


def write_report(report: dict[str, Any], out: Path) -> None:
    """The summary as indented JSON at ``out``, the per-frame series compact beside it."""
    series_path = out.with_name(out.stem + "_series.json")
    series = {key: report[key].pop("series") for key in ("with_dropping", "without_dropping")}
    report["series_file"] = series_path.name
    common.write_json(out, report, indent=1)
    common.write_json(series_path, series, indent=None, separators=(",", ":"))
    for key, values in series.items():  # for the plot
        report[key]["series"] = values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", nargs="?", help="bundle folder (default: build the tiny one)")
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--engine-ms", type=float, default=50.0)
    parser.add_argument("--size", default="640x480", help="frame size WxH (default 640x480)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    logging.getLogger("vlm_export").setLevel(logging.ERROR)  # untrained bundles: fine for timing
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from fakebundle import make_bundle

            folder = make_bundle(Path(tmp) / "bundle", method="tca")
        else:
            folder = Path(args.bundle)
        bundle = Bundle.open(folder)
        results = {}
        for key, wrap in (("with_dropping", NewestFrame), ("without_dropping", EveryFrame)):
            engine = SlowEngine(open_backend(bundle, "auto"), args.engine_ms)
            pipeline = Pipeline(bundle, engine, "tca")
            pipeline.process(np.zeros((size[1], size[0], 3), np.uint8))  # warm-up
            pipeline = Pipeline(bundle, engine, "tca")
            camera = SyntheticCamera(args.frames, args.fps, size)
            started = time.perf_counter()
            results[key] = summary(measure(pipeline, camera, wrap(camera)), args.frames)
            results[key]["seconds"] = round(time.perf_counter() - started, 1)
            engine.inner.close()
    report = {
        "benchmark": "camera_latency",
        "fixture_bundle": args.bundle is None,
        "frames": args.frames,
        "fps": args.fps,
        "engine_ms": args.engine_ms,
        "frame_size": list(size),
        "machine": common.machine(),
        **results,
    }
    print(f"{args.frames} frames at {args.fps:g} fps, engine held to {args.engine_ms:g} ms")
    for key in ("with_dropping", "without_dropping"):
        result = results[key]
        at = ", ".join(f"@{n}: {v} ms" for n, v in result["latency_ms_at_frame"].items())
        print(
            f"{key:<17} labelled {result['labelled']:>5}  dropped {result['dropped']:>5}  "
            f"median {result['latency_ms']['median']} ms  p99 {result['latency_ms']['p99']} ms  "
            f"max {result['latency_ms']['max']} ms  ({at})"
        )
    write_report(report, args.out)
    plot(report, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
