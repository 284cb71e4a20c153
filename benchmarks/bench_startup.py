"""Start-up cost: `vlm-edge info` verified vs unverified, and start-to-first-decision vs engine
creation alone.

Each case is a fresh process, as a user starts it, timed from spawn to exit (wall clock); the
cases are interleaved round by round so a busy machine slows them alike. Ratios are given of the
medians and of the minima (on a shared machine the minimum is the least disturbed start). The
verification alone is also timed inside one process (``verify_bundle_files``: full, cached).

- info: `vlm-edge info BUNDLE` with `--verify full` (every file hashed: how every command started
  before the verification record), with the default `--verify cached` (the record warm), and with
  `--no-verify`. The ratios to `--no-verify` are the figures of interest (goal: cached <= 1.3).
- first decision: `vlm-edge run BUNDLE photo.jpg --out /dev/null --quiet` (process start,
  imports, verification, engine creation, one frame), with `--verify full` and cached, as a ratio
  to engine creation alone (`open_backend` on the opened bundle, timed inside a process).

    python benchmarks/bench_startup.py [BUNDLE] [--export-vitb16 DIR] [--rounds 5]

Without BUNDLE, `--export-vitb16 DIR` exports ViT-B-16 with random weights (`--pretrained none`,
condensing, with its text engine) into DIR/vitb16-tca first (a few minutes), or reuses it;
without either the tiny test bundle of tests/fakebundle.py is used (then say so: its files are
small, so verification costs little). Writes benchmarks/results/startup.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
from PIL import Image

ROOT = common.ROOT
RESULTS = common.RESULTS / "startup.json"
EDGE = [sys.executable, "-m", "vlm_export.runtime"]
ENGINE_ONLY = """
import sys, time
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.factory import open_backend
bundle = Bundle.open(sys.argv[1], verify=False)
start = time.perf_counter()
engine = open_backend(bundle, "onnxruntime")
print((time.perf_counter() - start) * 1000.0)
"""


def _bundle(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    if args.bundle:
        return Path(args.bundle), "given"
    if args.export_vitb16:
        folder = Path(args.export_vitb16) / "vitb16-tca"
        if not (folder / "manifest.json").is_file():
            classes = ROOT / "examples" / "cifar10_classes.txt"
            command = [sys.executable, "-m", "vlm_export.export.cli", "--method", "tca"]
            command += ["--model", "ViT-B-16", "--pretrained", "none", "--templates", "single"]
            command += ["--classes", str(classes), "--out", str(folder), "--quiet"]
            subprocess.run(command, check=True)
        return folder, "ViT-B-16, random weights, tca"
    sys.path.insert(0, str(ROOT / "tests"))
    from fakebundle import make_bundle

    return make_bundle(work / "tiny", method="tca"), "tiny test bundle (tests/fakebundle.py)"


def _wall_ms(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = (time.perf_counter() - start) * 1000.0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return elapsed


def _engine_ms(bundle: Path, env: dict[str, str]) -> float:
    done = subprocess.run(
        [sys.executable, "-c", ENGINE_ONLY, str(bundle)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def _verify_ms(bundle: Path, mode: str) -> float:
    from vlm_export.core.manifest import read_manifest
    from vlm_export.core.verified import verify_bundle_files

    manifest = read_manifest(bundle)
    start = time.perf_counter()
    verify_bundle_files(bundle, manifest, mode)
    return (time.perf_counter() - start) * 1000.0


def _ratios(values: dict[str, float]) -> dict[str, float]:
    engine = values["engine_creation"]
    return {
        "info_full_over_no_verify": values["info_full"] / values["info_no_verify"],
        "info_cached_over_no_verify": values["info_cached"] / values["info_no_verify"],
        "first_decision_full_over_engine": values["first_decision_full"] / engine,
        "first_decision_cached_over_engine": values["first_decision_cached"] / engine,
    }


def main() -> int:
    """Measure, print, save JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", help="bundle folder (default: see --export-vitb16)")
    parser.add_argument("--export-vitb16", metavar="DIR", help="export/reuse ViT-B-16 here")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        bundle, kind = _bundle(args, work)
        photo = work / "photo.jpg"
        pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photo)
        env = dict(os.environ, VLM_EXPORT_CACHE=str(work / "cache"))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        info = [*EDGE, "info", str(bundle)]
        run = [*EDGE, "run", str(bundle), str(photo), "--out", os.devnull, "--quiet"]
        cases = {
            "info_full": [*info, "--verify", "full"],
            "info_cached": info,
            "info_no_verify": [*info, "--no-verify"],
            "first_decision_full": [*run, "--verify", "full"],
            "first_decision_cached": run,
        }
        _wall_ms(info, env)  # writes the record (and warms the page cache)
        time.sleep(2.5)  # files written just before are not remembered (core.verified)
        _wall_ms(info, env)
        times: dict[str, list[float]] = {name: [] for name in [*cases, "engine_creation"]}
        for _ in range(args.rounds):
            for name, command in cases.items():
                times[name].append(_wall_ms(command, env))
            times["engine_creation"].append(_engine_ms(bundle, env))
        os.environ["VLM_EXPORT_CACHE"] = env["VLM_EXPORT_CACHE"]
        in_process = {
            mode: [_verify_ms(bundle, mode) for _ in range(3)] for mode in ("full", "cached")
        }
        size = sum(p.stat().st_size for p in bundle.iterdir() if p.is_file())
    median = {name: statistics.median(values) for name, values in times.items()}
    least = {name: min(values) for name, values in times.items()}
    ratios = {"of_medians": _ratios(median), "of_minima": _ratios(least)}
    result = {
        "bundle": kind,
        "bundle_bytes": size,
        "rounds": args.rounds,
        "median_ms": median,
        "min_ms": least,
        "all_ms": times,
        "ratios": ratios,
        "verification_in_process_ms": {mode: min(v) for mode, v in in_process.items()},
        "goal_info_cached_within": 1.3,
        "machine": common.machine(),
    }
    print(f"bundle: {kind}, {size / 2**20:.0f} MiB; {args.rounds} rounds: median, minimum")
    for name, value in median.items():
        print(f"  {name:24s} {value:9.0f} ms {least[name]:9.0f} ms")
    for name in ratios["of_medians"]:
        print(f"  {name:36s} {ratios['of_medians'][name]:6.2f}x {ratios['of_minima'][name]:6.2f}x")
    for mode, values in in_process.items():
        print(f"  verification alone, {mode:6s} {min(values):9.1f} ms (in one process)")
    common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
