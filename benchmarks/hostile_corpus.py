"""Hostile corpus: run vlm-edge and vlm-export as subprocesses over careless paths, faults and
signals; count cases, tracebacks, data-loss events (a file that existed before and was not the
case's output changed or vanished) and cases that did not end as expected.

    PYTHONPATH=. python benchmarks/hostile_corpus.py [--kill-trials 30] [--ctrl-c-trials 30]

Builds the tiny test bundle of tests/fakebundle.py (needs onnx) in a temporary folder; prints a
summary and saves benchmarks/results/hostile_corpus.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import common

ROOT = common.ROOT
sys.path.insert(0, str(ROOT / "tests"))
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
EDGE = [sys.executable, "-m", "vlm_export.runtime"]
EXPORT = [sys.executable, "-c", "import sys; from vlm_export.export.cli import main; "
          "sys.exit(main())"]  # fmt: skip
TINY = ["--method", "zeroshot", "--model", "vlm-test-tiny", "--pretrained", "none", "--quiet"]


@dataclass
class Tally:
    cases: int = 0
    tracebacks: int = 0
    data_loss: int = 0
    unexpected: list[str] = field(default_factory=list)

    def add(self, name: str, err: str, changed: list[str], ok: bool) -> None:
        self.cases += 1
        self.tracebacks += "Traceback" in err
        self.data_loss += bool(changed)
        if not ok or "Traceback" in err or changed:
            self.unexpected.append(f"{name}: {err.strip().splitlines()[-1:] or ''} {changed}")


def hashes(root: Path) -> dict[str, str]:
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and "scratch" not in path.parts:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def changed(before: dict[str, str], after: dict[str, str], outputs: set[str]) -> list[str]:
    return [p for p, h in before.items() if p not in outputs and after.get(p) != h]


def world(root: Path) -> dict[str, Path]:
    from fakebundle import make_bundle, write_images

    bundle = make_bundle(root / "bundle", method="tca+rail")
    write_images(root / "images", 4)
    write_images(root / "many", 300)
    for seed, name in enumerate(("cat", "dog", "bird")):
        write_images(root / "data" / name, 3, seed=seed)
    learner = root / "learner.npz"
    subprocess.run(
        [*EDGE, "learn", str(bundle), str(root / "data"), "--domain", "animals", "--state",
         str(learner), "--shots", "2", "--hidden-dim", "16"],
        env=ENV, check=True, capture_output=True,
    )  # fmt: skip
    (root / "classes.txt").write_text("cat\ndog\n")
    life = root / "life"
    write_images(life / "holiday", 3)
    (life / "thesis.tex").write_text("\\chapter{Introduction}\n" * 1000)
    foreign = make_bundle(root / "bundle-with-notes", method="zeroshot")
    (foreign / "notes.txt").write_text("mine")
    (root / "scratch").mkdir()
    (root / "link.jsonl").symlink_to(bundle / "manifest.json")
    os.link(root / "images" / "img_0001.jpg", root / "hard.jpg")
    return {"root": root, "bundle": bundle, "learner": learner, "life": life}


def refusal_cases(w: dict[str, Path]) -> list[tuple[str, list[str], tuple[int, ...]]]:
    r, b = w["root"], w["bundle"]
    img, learn = r / "images", ["learn", b, r / "data", "--domain", "animals", "--shots", "2"]
    run = ["run", b, img]
    edge = [
        ("out=manifest", [*run, "--out", b / "manifest.json"]),
        ("out=onnx", [*run, "--out", b / "image_encoder.onnx"]),
        ("out=embeddings", [*run, "--out", b / "text_embeddings.npy"]),
        ("out=classes.json", [*run, "--out", b / "classes.json"]),
        ("out=source image", ["run", b, img / "img_0000.jpg", "--out", img / "img_0000.jpg"]),
        ("out=image in folder", [*run, "--out", img / "img_0002.jpg"]),
        ("out=glob match", ["run", b, f"{img}/*.jpg", "--out", img / "img_0003.jpg"]),
        ("out=symlink to manifest", [*run, "--out", r / "link.jsonl"]),
        ("out=hard link to image", [*run, "--out", r / "hard.jpg"]),
        ("out=bundle folder", [*run, "--out", b]),
        ("out=rail-state", [*run, "--rail-state", w["learner"], "--out", w["learner"]]),
        ("state=rail-state", [*run, "--rail-state", w["learner"], "--state", w["learner"]]),
        ("state=onnx", [*run, "--state", b / "image_encoder.onnx"]),
        ("state=image", [*run, "--state", img / "img_0001.jpg"]),
        ("state=out", [*run, "--state", r / "scratch/s.npz", "--out", r / "scratch/s.npz"]),
        ("learn state=image", [*learn, "--state", r / "data/cat/img_0000.jpg"]),
        ("learn inference=classes.json",
         [*learn, "--state", r / "scratch/n.npz", "--inference-state", b / "classes.json"]),
        ("learn inference=state", [*learn, "--state", w["learner"], "--inference-state",
                                   w["learner"]]),
        ("merge out=input", ["merge", w["learner"], w["learner"], r / "scratch/x.npz"]),
        ("merge out=manifest", ["merge", b / "manifest.json", w["learner"], r / "scratch/x.npz",
                                "--bundle", b]),
        ("eval json=manifest", ["eval", b, r / "data", "--order", "animals", "--json",
                                b / "manifest.json"]),
        ("eval json=image", ["eval", b, r, "--order", "animals", "--json",
                             r / "data/cat/img_0001.jpg"]),
    ]  # fmt: skip
    cases = [(f"vlm-edge {n}", [*EDGE, *map(str, a)], (1,)) for n, a in edge]
    export = [
        ("overwrite photos+thesis", [*TINY, "--classes", r / "classes.txt", "--out", w["life"],
                                     "--overwrite"]),
        ("overwrite bundle with notes", [*TINY, "--classes", r / "classes.txt", "--out",
                                         r / "bundle-with-notes", "--overwrite"]),
        ("out holds classes", [*TINY, "--classes", b / "classes.json", "--out", b,
                               "--overwrite"]),
        ("out is a file", [*TINY, "--classes", r / "classes.txt", "--out", r / "classes.txt"]),
        ("build-engine cache=manifest", ["build-engine", b, "--timing-cache",
                                         b / "manifest.json"]),
        ("build-engine cache=onnx", ["build-engine", b, "--timing-cache",
                                     b / "image_encoder.onnx"]),
    ]  # fmt: skip
    cases += [(f"vlm-export {n}", [*EXPORT, *map(str, a)], (2,)) for n, a in export]
    return cases


def run_case(tally: Tally, root: Path, name: str, argv: list[str], codes, outputs=(), **kw):
    before = hashes(root)
    kw.setdefault("stdout", subprocess.PIPE)
    done = subprocess.run(argv, env=ENV, stderr=subprocess.PIPE, text=True, timeout=300, **kw)
    lost = changed(before, hashes(root), {str(p) for p in outputs})
    tally.add(name, done.stderr, lost, done.returncode in codes)
    return done


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def fault_cases(tally: Tally, w: dict[str, Path]) -> None:
    r, b = w["root"], w["bundle"]
    scratch = r / "scratch"
    real = scratch / "real-state.npz"
    link = scratch / "link-state.npz"
    link.symlink_to(real)
    for i in range(2):
        run_case(tally, r, f"state through a symlink #{i}",
                 [*EDGE, "run", str(b), str(r / "images"), "--state", str(link)], (0,))  # fmt: skip
    if not (link.is_symlink() and real.is_file()):
        tally.unexpected.append("symlink state: link replaced or target not written")
    state = scratch / "full.npz"
    run_case(tally, r, "--out /dev/full", [*EDGE, "run", str(b), str(r / "images"), "--state",
             str(state), "--out", "/dev/full"], (1,))  # fmt: skip
    if not state.is_file():
        tally.unexpected.append("--out /dev/full: state not saved")
    with open("/dev/full", "w") as full:
        run_case(tally, r, "stdout /dev/full", [*EDGE, "run", str(b), str(r / "images")], (1,),
                 stdout=full)  # fmt: skip
    odd = scratch / "odd"
    odd.mkdir()
    (odd / "x.jpg").write_bytes((r / "images" / "img_0000.jpg").read_bytes())
    os.rename(odd / "x.jpg", os.fsencode(odd) + b"/caf\xe9.jpg")
    done = run_case(tally, r, "non-UTF-8 name", [*EDGE, "run", str(b), str(odd)], (0,))
    try:
        json.loads(done.stdout.encode().decode("utf-8"), parse_constant=_no_constant)
        assert "\\ud" not in done.stdout
    except (ValueError, AssertionError, TypeError):
        tally.unexpected.append("non-UTF-8 name: not strict JSON")
    run_case(tally, r, "--threads 100000", [*EDGE, "run", str(b), str(r / "images"), "--threads",
             "100000"], (0,))  # fmt: skip
    # (signals, exit statuses, state saved): a Ctrl-C after another stop request forces the stop
    # at once, without the final save (documented; the last periodic save stays), or, once the
    # run has ended, interrupts the exit (-2)
    for signals, code, saved in (
        ((signal.SIGHUP,), (0,), True), ((signal.SIGTERM,), (0,), True),
        ((signal.SIGINT,), (130,), True), ((signal.SIGINT, signal.SIGTERM), (130,), True),
        ((signal.SIGTERM, signal.SIGHUP), (0,), True),
        ((signal.SIGTERM, signal.SIGINT), (0, 130, -2), False),
    ):  # fmt: skip
        state = scratch / f"sig-{'-'.join(map(str, signals))}.npz"
        before = hashes(r)
        proc = subprocess.Popen(
            [*EDGE, "run", str(b), str(r / "many"), "--state", str(state), "--save-every", "0"],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        proc.stdout.readline()  # the first frame is done
        for signum in signals:
            proc.send_signal(signum)
            time.sleep(0.05)
        out, err = proc.communicate(timeout=300)
        names = "+".join(signal.Signals(s).name for s in signals)
        ok = proc.returncode in code and (not saved or state.is_file() and "state saved" in err)
        tally.add(f"signal {names}", err, changed(before, hashes(r), set()), ok)


def ctrl_c_sweep(tally: Tally, w: dict[str, Path], trials: int, raw: bool) -> dict[str, int]:
    """SIGINT at evenly spread moments of start-up; ``raw``: counted from process start
    (includes Python's own start-up), else from the moment vlm-edge's main runs."""
    timed = (
        "import os, signal, sys, threading\nfrom vlm_export.runtime import cli\n"
        "delay = float(sys.argv.pop(1))\ninner = cli._main\n"
        "def timed(argv):\n    timer = threading.Timer(delay, os.kill, (os.getpid(), "
        "signal.SIGINT))\n    timer.daemon = True\n    timer.start()\n    return inner(argv)\n"
        "cli._main = timed\nfrom vlm_export.runtime.launch import entry\nentry()\n"
    )
    outcomes: dict[str, int] = {}
    for i in range(trials):
        delay = 0.03 * i
        args = ["run", str(w["bundle"]), str(w["root"] / "images"), "--rail-state",
                str(w["learner"])]  # fmt: skip
        argv = [*EDGE, *args] if raw else [sys.executable, "-c", timed, str(delay), *args]
        before = hashes(w["root"])
        proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        if raw:
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        ok = proc.returncode in (0, 130, -signal.SIGINT) and "reinstall" not in err
        key = f"exit {proc.returncode}"
        outcomes[key] = outcomes.get(key, 0) + 1
        if "Traceback" in err:
            outcomes["traceback"] = outcomes.get("traceback", 0) + 1
        if not raw:
            tally.add(f"ctrl-c after {delay:.2f} s", err, changed(before, hashes(w["root"]), set()),
                      ok)  # fmt: skip
    return outcomes


KILL_WRITER = (
    "import sys\nimport numpy as np\nfrom vlm_export.core.state_file import save_state\n"
    "big = np.random.default_rng(0).standard_normal(int(sys.argv[2]))\nprint('ready', flush=True)"
    "\ni = 0\nwhile True:\n    i += 1\n    save_state(sys.argv[1], 'test', 1, 'fp', {'w': big, "
    "'i': np.array(i)})\n"
)


def kill_trials(root: Path, trials: int) -> dict[str, int]:
    from vlm_export.core.atomic import stale_temps
    from vlm_export.core.state_file import load_state

    target = root / "scratch" / "kill.npz"
    result = {"trials": trials, "corrupt": 0, "killed_mid_write": 0, "max_leftovers": 0}
    for i in range(trials):
        proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(target), "10000000"],
                                env=ENV, stdout=subprocess.PIPE)  # fmt: skip
        proc.stdout.readline()
        time.sleep((i % 10) * 0.25)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        left = len(stale_temps(target))
        result["killed_mid_write"] += bool(left)
        result["max_leftovers"] = max(result["max_leftovers"], left)
        if target.exists():
            try:
                load_state(target, "test", 1, "fp")
            except Exception:  # noqa: BLE001 - counted
                result["corrupt"] += 1
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-trials", type=int, default=30)
    parser.add_argument("--ctrl-c-trials", type=int, default=30)
    args = parser.parse_args()
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp:
        w = world(Path(tmp))
        for name, argv, codes in refusal_cases(w):
            run_case(tally, w["root"], name, argv, codes)
        fault_cases(tally, w)
        ctrl_c = ctrl_c_sweep(tally, w, args.ctrl_c_trials, raw=False)
        ctrl_c_raw = ctrl_c_sweep(tally, w, args.ctrl_c_trials, raw=True)
        kills = kill_trials(w["root"], args.kill_trials)
    report = {
        "cases": tally.cases,
        "tracebacks": tally.tracebacks,
        "data_loss_events": tally.data_loss,
        "unexpected": tally.unexpected,
        "ctrl_c_after_main_started": ctrl_c,
        "ctrl_c_from_process_start_not_in_cases": ctrl_c_raw,
        "kill_9_state_writes": kills,
    }
    print(json.dumps(report, indent=2))
    common.write_json(common.RESULTS / "hostile_corpus.json", report)


if __name__ == "__main__":
    main()
