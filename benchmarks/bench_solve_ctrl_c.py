"""A Ctrl-C during RAIL's primal solve: how long ``vlm-edge learn`` takes to exit after SIGINT,
against how long the solve runs when left alone.

On the bundle of tests/fakebundle.py (needs onnx), in a temporary folder: ``learn`` one domain
into a state (a fresh learner: solved in sample space, quick), then, ``--rounds`` times each,
alternated, ``learn`` the other domain into a copy of that state (G += the new samples, then the
d_h x d_h Cholesky solve): once left to finish (the time from "solving" on stderr to its exit),
once with a SIGINT ``--after`` seconds into "solving" (the time from the signal to its exit, the
exit status, the number of stderr lines after the signal, and whether the state file was left
byte-identical).

    PYTHONPATH=. python benchmarks/bench_solve_ctrl_c.py [--hidden-dim 15000] [--rounds 3]

Prints and saves benchmarks/results/solve_ctrl_c.json.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

sys.path.insert(0, str(common.ROOT / "tests"))
RESULTS = common.RESULTS / "solve_ctrl_c.json"


def _images(folder: Path, classes: list[str], seed: int) -> None:
    from fakebundle import write_images

    for index, name in enumerate(classes):
        write_images(folder / name, 4, seed=seed + index)


def _learn(bundle: Path, data: Path, domain: str, state: Path, hidden: int) -> list[str]:
    return [
        sys.executable, "-m", "vlm_export.runtime", "learn", str(bundle), str(data),
        "--domain", domain, "--state", str(state), "--shots", "4", "--hidden-dim", str(hidden),
        "--no-verify",
    ]  # fmt: skip


def _run(argv: list[str], log: Path, after: float | None) -> dict[str, object]:
    """Run ``argv``; with ``after``, send SIGINT that many seconds into "solving"."""
    with log.open("w") as err:
        process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=err,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        while "solving" not in log.read_text() and process.poll() is None:
            time.sleep(0.01)
        solving = time.monotonic()
        lines_before = len(log.read_text().splitlines())
        if after is not None:
            time.sleep(after)
            process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        status = process.wait()
        ended = time.monotonic()
    lines = log.read_text().splitlines()
    return {
        "status": status,
        "seconds": ended - (sent if after is not None else solving),
        "lines_after": lines[lines_before:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-dim", type=int, default=15000, help="d_h (default 15000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each kind (default 3)")
    parser.add_argument("--after", type=float, default=1.0, help="seconds into the solve")
    args = parser.parse_args()
    from fakebundle import DOMAINS, make_bundle

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        bundle = make_bundle(root / "bundle", method="tca+rail")
        first, second = list(DOMAINS)[:2]
        _images(root / first, DOMAINS[first], seed=0)
        _images(root / second, DOMAINS[second], seed=10)
        start = root / "start.npz"
        subprocess.run(
            _learn(bundle, root / first, first, start, args.hidden_dim),
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        solved, interrupted = [], []
        for _ in range(args.rounds):
            for kind, after in (("solved", None), ("interrupted", args.after)):
                state = root / f"{kind}.npz"
                shutil.copyfile(start, state)
                argv = _learn(bundle, root / second, second, state, args.hidden_dim)
                result = _run(argv, root / "err.txt", after)
                result["state_unchanged"] = filecmp.cmp(start, state, shallow=False)
                result["lines_after"] = [  # the temporary folder is no place a reader has
                    line.replace(str(root), "<scratch>") for line in result["lines_after"]
                ]
                (solved if after is None else interrupted).append(result)
                print(kind, {k: v for k, v in result.items() if k != "lines_after"}, flush=True)
    report = {
        "machine": common.machine(),
        "hidden_dim": args.hidden_dim,
        "sigint_after_s": args.after,
        "solve_to_exit_s_median": statistics.median(r["seconds"] for r in solved),
        "sigint_to_exit_s_median": statistics.median(r["seconds"] for r in interrupted),
        "interrupted_statuses": sorted({r["status"] for r in interrupted}),
        "interrupted_lines_after_sigint": sorted({len(r["lines_after"]) for r in interrupted}),
        "interrupted_states_unchanged": all(r["state_unchanged"] for r in interrupted),
        "runs": {"solved": solved, "interrupted": interrupted},
    }
    report["ratio_sigint_exit_to_solve"] = (
        report["sigint_to_exit_s_median"] / report["solve_to_exit_s_median"]
    )
    common.write_json(RESULTS, report)
    summary = {k: v for k, v in report.items() if k not in ("runs", "machine")}
    print(summary)


if __name__ == "__main__":
    main()
