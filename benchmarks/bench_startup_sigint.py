"""Start-up of ``vlm-edge``: a Ctrl-C at any moment, and how long start-up takes.

1. Sweep: ``--signals`` SIGINTs (default 60), one per run of ``python -m vlm_export.runtime run``
   on the tiny test bundle, sent evenly from 0 to ``--until`` seconds (default 1.5) after the
   process starts. Counts exit statuses, runs whose stderr holds a traceback, and runs that end
   with more than one line. (A signal that lands before Python has set up its own handling kills
   the process by the signal: the shell reports that as 130 too.)
2. Start-up time: ``vlm-edge --help``, ``vlm-edge info --no-verify BUNDLE`` and
   ``import vlm_export.runtime``, wall time of ``--repeats`` runs each, interleaved with the same
   commands of a baseline revision (default ``main``; its ``vlm_export`` is taken with
   ``git archive``), as the ratio of medians.

    PYTHONPATH=. python benchmarks/bench_startup_sigint.py [--baseline REV] [--sweep-baseline]

Builds the bundle of tests/fakebundle.py (needs onnx) in a temporary folder; prints and saves
benchmarks/results/startup_sigint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = common.ROOT
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = common.RESULTS / "startup_sigint.json"


def edge(tree: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``vlm-edge`` from ``tree`` (run it from a
    folder without a ``vlm_export`` in it: ``python -m`` puts the current folder first)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return [sys.executable, "-m", "vlm_export.runtime"], env


def sweep(tree: Path, args: list[str], signals: int, until: float) -> dict[str, object]:
    """One SIGINT per run, at evenly spread moments after the process starts."""
    command, env = edge(tree)
    statuses: dict[str, int] = {}
    in_python_start_up = tracebacks = other_last_line = 0
    for index in range(signals):
        delay = until * index / max(signals - 1, 1)
        proc = subprocess.Popen(
            [*command, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, cwd=tempfile.gettempdir(),
        )  # fmt: skip
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        key = str(proc.returncode)
        statuses[key] = statuses.get(key, 0) + 1
        if "Traceback" in err:
            before_project = "<frozen site>" in err and f"vlm_export{os.sep}" not in err
            in_python_start_up += before_project
            tracebacks += not before_project
        lines = err.strip().splitlines()
        other_last_line += proc.returncode == 130 and not (
            lines and lines[-1].startswith("vlm-edge: interrupted")
        )
    return {
        "exit_statuses": statuses,
        "tracebacks": tracebacks,
        "tracebacks_in_python_start_up": in_python_start_up,
        "interrupted_without_the_one_line": other_last_line,
    }


def wall_times(trees: dict[str, Path], args: list[str], repeats: int) -> dict[str, list[float]]:
    """Seconds per run of ``vlm-edge ARGS`` (no ARGS: ``import vlm_export.runtime``, what a
    program using the Python API pays) from each tree, the trees interleaved."""
    times: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(repeats):
        for name, tree in trees.items():
            command, env = edge(tree)
            if not args:
                command = [sys.executable, "-c", "import vlm_export.runtime"]
            start = time.perf_counter()
            subprocess.run(
                [*command, *args], env=env, capture_output=True, check=True,
                cwd=tempfile.gettempdir(),
            )  # fmt: skip
            times[name].append(time.perf_counter() - start)
    return times


def baseline_tree(revision: str, folder: Path) -> Path:
    """``vlm_export`` as it is at ``revision``, unpacked into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "vlm_export"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signals", type=int, default=60)
    parser.add_argument("--until", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, default=3000, help="images in the swept run")
    parser.add_argument("--baseline", default="main", help="git revision to compare with")
    parser.add_argument("--sweep-baseline", action="store_true", help="sweep the baseline too")
    options = parser.parse_args()
    # a shell that starts this script in the background leaves SIGINT ignored, and an ignored
    # signal stays ignored in every child: give the children Ctrl-C's default action back
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from fakebundle import make_bundle, write_images

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = make_bundle(root / "bundle", method="tca+rail")
        images = root / "images"
        write_images(images, options.images)
        trees = {"now": ROOT, "baseline": baseline_tree(options.baseline, root / "baseline")}
        run_args = ["run", str(bundle), str(images), "--out", os.devnull]
        result: dict[str, object] = {
            "machine": common.machine(),
            "baseline": options.baseline,
            "sweep_command": "vlm-edge run BUNDLE IMAGES --out /dev/null",
            "signals": options.signals,
            "until_s": options.until,
            "sweep": {"now": sweep(ROOT, run_args, options.signals, options.until)},
        }
        if options.sweep_baseline:
            result["sweep"]["baseline"] = sweep(  # type: ignore[index]
                trees["baseline"], run_args, options.signals, options.until
            )
        timing = {}
        for name, args in {
            "--help": ["--help"],
            "info --no-verify": ["info", "--no-verify", str(bundle)],
            "import vlm_export.runtime": [],
        }.items():
            times = wall_times(trees, args, options.repeats)
            now, before = statistics.median(times["now"]), statistics.median(times["baseline"])
            timing[name] = {"now_s": now, "baseline_s": before, "ratio": now / before}
        result["start_up_time"] = timing
    print(json.dumps(result, indent=1))
    common.write_json(RESULTS, result, indent=1)


if __name__ == "__main__":
    main()
