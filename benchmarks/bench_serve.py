"""``vlm-edge serve`` against the plain ``vlm-edge run`` loop, in one run on one machine.

For each bundle (the tiny test bundle of tests/fakebundle.py, and any ``--bundle`` given, e.g. a
ViT-B/16 export with random weights):

- run: the frame loop of ``vlm-edge run`` (``open_source`` + ``process_frame``) over a folder of
  PNGs for ``--seconds``: decisions per second, pipeline ms per frame;
- serve with 1, 2 and 4 sources (each a looping folder of the same PNGs, method tca, one state
  per source) for ``--seconds``: decisions per second in all, per source, and each source's
  pipeline p50/p95 ms;
- the service's own overhead at one source: the share of wall time not spent in the pipeline
  (capture hand-over, scheduling, records, metrics, events), and the share not spent in the
  engine (everything but the engine), next to the same shares of the run loop;
- ``POST /v1/classify`` with 8 concurrent clients (the HTTP app on a loopback port, one source
  running): p50/p95 ms per request.

Each bundle is measured in interleaved rounds (run, serve 1, 2, 4) and the medians reported, so
that a change in the machine's load hits every configuration alike. All numbers are ratios
within the run; the machine (CPU flags, load average) is recorded. Prints a summary,
writes benchmarks/results/serve.json and serve.png (with matplotlib).

    python benchmarks/bench_serve.py [--bundle DIR ...] [--seconds 8] [--rounds 3] [--images 8]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
from PIL import Image

from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.factory import open_backend
from vlm_export.runtime.io.sources import open_source
from vlm_export.runtime.pipeline import Pipeline, process_frame
from vlm_export.runtime.serve.config import ServeSettings
from vlm_export.runtime.serve.service import Service

ROOT = common.ROOT
RESULTS = common.RESULTS / "serve.json"
SOURCE_COUNTS = (1, 2, 4)
CLIENTS = 8


def write_pngs(folder: Path, count: int, size: int = 320) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (size * 3 // 4, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return folder


def run_loop(bundle_dir: Path, folder: Path, seconds: float) -> dict[str, Any]:
    """The ``vlm-edge run`` frame loop over ``folder``, repeated for ``seconds``."""
    bundle = Bundle.open(bundle_dir)
    backend = open_backend(bundle, "auto")
    pipeline = Pipeline(bundle, backend, "tca")
    frames, totals, engine = 0, 0.0, 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        with open_source(str(folder)) as source:
            for frame in source:
                result, _ = process_frame(pipeline, frame)
                frames += 1
                totals += result.timings["total"]
                engine += result.timings["engine"]
    wall = time.perf_counter() - start
    backend.close()
    return {
        "decisions_per_s": frames / wall,
        "pipeline_ms": totals / frames,
        "engine_ms": engine / frames,
        "outside_pipeline": 1.0 - totals / 1000.0 / wall,
        "outside_engine": 1.0 - engine / 1000.0 / wall,
    }


def serve_run(bundle_dir: Path, folder: Path, count: int, seconds: float, tmp: Path) -> dict:
    """A service with ``count`` looping sources for ``seconds`` (after a 1 s warm-up).

    Rates and shares come from the frames completed inside one window that every source's
    recent-frame record covers (the service keeps each frame's completion time and stage
    timings), so no frame is half counted at the window's edges.
    """
    settings = ServeSettings(
        bundle=str(bundle_dir),
        sources=[(f"s{i}", str(folder)) for i in range(count)],
        loop=True,
        method="tca",
        state_dir=str(tmp / f"states{count}"),
        checkpoint_every=30.0,
    )
    with Service.open(settings) as service:
        time.sleep(1.0)
        begin = time.monotonic()
        time.sleep(seconds)
        status = service.source_status()
        # the scheduler's own record: (completion time, stage ms) of each source's recent frames
        recent = {
            name: list(zip(list(stats.times)[-len(stats.timings) :], stats.timings, strict=True))
            for name, stats in service._stats.items()
        }
    start = max([begin] + [frames[0][0] for frames in recent.values()])
    done = sorted(
        (t, name, ms) for name, frames in recent.items() for t, ms in frames if t >= start
    )
    wall = done[-1][0] - done[0][0]
    counted = done[1:]  # frames completed after the first one, inside the window
    per_source = {name: sum(1 for _, n, _ in counted if n == name) / wall for name in recent}
    pipeline_s = sum(ms["total"] for _, _, ms in counted) / 1000.0
    engine_s = sum(ms["engine"] for _, _, ms in counted) / 1000.0
    return {
        "sources": count,
        "window_s": wall,
        "frames": len(counted),
        "decisions_per_s": len(counted) / wall,
        "per_source_decisions_per_s": per_source,
        "per_source_pipeline_ms": {s["name"]: s["latency_ms"].get("total") for s in status},
        "outside_pipeline": 1.0 - pipeline_s / wall,
        "outside_engine": 1.0 - engine_s / wall,
    }


def classify_clients(bundle_dir: Path, folder: Path, requests: int, tmp: Path) -> dict | None:
    """``POST /v1/classify`` p50/p95 with 8 concurrent clients on a loopback port."""
    try:
        import httpx
        import uvicorn

        from vlm_export.runtime.serve.http.app import create_app
    except ImportError as exc:
        print(f"no /v1/classify numbers: {exc}")
        return None
    settings = ServeSettings(
        bundle=str(bundle_dir),
        sources=[("s0", str(folder))],
        loop=True,
        method="tca",
        port=_free_port(),
    )
    image = io.BytesIO()
    Image.open(next(iter(sorted(folder.iterdir())))).save(image, format="PNG")
    body = image.getvalue()
    with Service.open(settings) as service:
        server = uvicorn.Server(
            uvicorn.Config(create_app(service, settings), port=settings.port, log_level="error")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{settings.port}/v1/classify?source=s0"
        times: list[float] = []
        lock = threading.Lock()

        def client() -> None:
            with httpx.Client(timeout=60) as http:
                for _ in range(requests):
                    begin = time.perf_counter()
                    reply = http.post(url, content=body, headers={"Content-Type": "image/png"})
                    reply.raise_for_status()
                    with lock:
                        times.append((time.perf_counter() - begin) * 1000.0)

        start = time.perf_counter()
        clients = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for item in clients:
            item.start()
        for item in clients:
            item.join()
        wall = time.perf_counter() - start
        server.should_exit = True
        thread.join(10)
    return {
        "clients": CLIENTS,
        "requests": len(times),
        "p50_ms": float(np.percentile(times, 50)),
        "p95_ms": float(np.percentile(times, 95)),
        "requests_per_s": len(times) / wall,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per key, the median over rounds (dicts of numbers: per inner key)."""
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        if isinstance(value, dict):
            out[key] = _median([row[key] for row in rows])
        elif all(row[key] == value for row in rows):  # the same in every round (a count)
            out[key] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(np.median([row[key] for row in rows]))
        else:
            out[key] = value
    return out


def measure(bundle_dir: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Rounds of (run, serve 1, 2, 4 sources) interleaved, so that a change in the machine's
    load hits every configuration alike; the medians over rounds."""
    folder = write_pngs(tmp / "frames", args.images)
    manifest = Bundle.open(bundle_dir).manifest
    runs, serves = [], {n: [] for n in SOURCE_COUNTS}
    for round_ in range(args.rounds):
        runs.append(run_loop(bundle_dir, folder, args.seconds))
        for n in SOURCE_COUNTS:
            serves[n].append(serve_run(bundle_dir, folder, n, args.seconds, tmp / f"r{round_}"))
    report: dict[str, Any] = {
        "bundle": manifest["model"]["name"],
        "image_size": manifest["preprocess"]["size"],
        "rounds": args.rounds,
        "run": _median(runs),
        "serve": [_median(serves[n]) for n in SOURCE_COUNTS],
        "serve_over_run_one_source_per_round": [
            serve["decisions_per_s"] / run["decisions_per_s"]
            for serve, run in zip(serves[1], runs, strict=True)
        ],
    }
    report["serve_over_run_one_source"] = float(
        np.median(report["serve_over_run_one_source_per_round"])
    )
    report["classify"] = classify_clients(bundle_dir, folder, args.requests, tmp)
    return report


def plot(reports: list[dict[str, Any]], path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(1, len(reports), figsize=(5 * len(reports), 3.6), squeeze=False)
    for axis, report in zip(axes[0], reports, strict=True):
        counts = [r["sources"] for r in report["serve"]]
        rates = [r["decisions_per_s"] for r in report["serve"]]
        per_source = [
            np.mean(list(r["per_source_decisions_per_s"].values())) for r in report["serve"]
        ]
        axis.bar([str(c) for c in counts], rates, color="#4477aa", label="serve, all sources")
        axis.plot([str(c) for c in counts], per_source, "o-", color="#cc6677", label="per source")
        axis.axhline(
            report["run"]["decisions_per_s"], color="black", ls="--", label="run, 1 source"
        )
        axis.set_xlabel("sources")
        axis.set_ylabel("decisions / s")
        axis.set_title(report["bundle"])
        axis.legend(fontsize=8)
    common.save_plot(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", action="append", default=[], help="more bundles to measure")
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--images", type=int, default=8, help="PNGs in the looping folder")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--requests", type=int, default=25, help="per /v1/classify client")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from fakebundle import make_bundle

    reports = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bundles = [make_bundle(tmp / "tiny", image_size=224), *map(Path, args.bundle)]
        for index, bundle_dir in enumerate(bundles):
            work = tmp / f"b{index}"
            work.mkdir()
            reports.append(measure(bundle_dir, args, work))
    result = {
        "benchmark": "serve",
        "machine": {
            **common.machine(),
            "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "seconds_per_measurement": args.seconds,
        "bundles": reports,
    }
    common.write_json(args.out, result)
    for report in reports:
        run = report["run"]
        print(f"\n{report['bundle']} {report['image_size']}")
        print(
            f"  run   1 source : {run['decisions_per_s']:8.1f} decisions/s, pipeline "
            f"{run['pipeline_ms']:.2f} ms, outside the pipeline {run['outside_pipeline']:.1%}, "
            f"outside the engine {run['outside_engine']:.1%}"
        )
        for row in report["serve"]:
            per = ", ".join(f"{v:.1f}" for v in row["per_source_decisions_per_s"].values())
            print(
                f"  serve {row['sources']} source(s): {row['decisions_per_s']:8.1f} decisions/s "
                f"(per source {per}); outside the pipeline {row['outside_pipeline']:.1%}, "
                f"outside the engine {row['outside_engine']:.1%}"
            )
        print(f"  serve/run at one source: {report['serve_over_run_one_source']:.3f}")
        if report["classify"]:
            c = report["classify"]
            print(
                f"  /v1/classify, {c['clients']} clients: p50 {c['p50_ms']:.1f} ms, "
                f"p95 {c['p95_ms']:.1f} ms, {c['requests_per_s']:.1f} requests/s"
            )
    plot(reports, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
