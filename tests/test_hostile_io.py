"""Hostile paths, faults and signals: every command refuses with one line, never a traceback,
and never changes a file it was not asked to write.

Each case runs a command's ``main`` (in-process, or as a subprocess where a real signal, a full
disk on standard output or a kill -9 is needed) and checks three things: the exit status, that
stderr holds no "Traceback" (an exception escaping ``main`` counts as one), and that every file
that existed before (bundle, images, states, a user's photos) has the same sha256 afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ctrl_c import default_sigint
from fakebundle import make_bundle, write_images

from vlm_export.core import atomic
from vlm_export.core.atomic import atomic_write_bytes, stale_temps
from vlm_export.core.json_text import dumps, escape_text
from vlm_export.core.state_file import load_state, save_state
from vlm_export.export.cli import main as export_main
from vlm_export.runtime import cli
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.backends import onnxruntime_backend
from vlm_export.runtime.pipeline import FrameResult, Pipeline
from vlm_export.runtime.tca.stage import build_reservoir

ROOT = Path(__file__).resolve().parents[1]
RAIL = ["--shots", "2", "--hidden-dim", "16"]


def _tree_hashes(*roots: Path) -> dict[Path, str]:
    """sha256 of every regular file under ``roots`` (symbolic links not followed)."""
    hashes = {}
    for root in roots:
        paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in paths:
            if not path.is_symlink():
                hashes[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def _call(main: Callable[[list[str]], int], argv: Sequence[object], capsys) -> tuple[int, str]:
    """Run a command's main; an exception escaping it is reported as a traceback."""
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:  # noqa: BLE001 - what the user would see as a traceback
        code = -1
        sys.stderr.write(f"Traceback (escaped main): {type(exc).__name__}: {exc}\n")
    return code, capsys.readouterr().err


def _refused(main, argv, capsys, protected: Sequence[Path], *words: str, code: int = 1) -> str:
    """The command exits ``code`` with one error line naming ``words``; nothing changed."""
    before = _tree_hashes(*protected)
    status, err = _call(main, argv, capsys)
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert status == code, err
    assert "error:" in lines[-1] and all(word in lines[-1] for word in words), err
    assert _tree_hashes(*protected) == before, "a file that existed before was changed"
    return lines[-1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tca+rail bundle, a source folder, class folders, and RAIL learner/inference states."""
    root = tmp_path_factory.mktemp("world")
    bundle = make_bundle(root / "bundle", method="tca+rail")
    images = root / "images"
    write_images(images, 4)
    data = root / "data"
    for seed, name in enumerate(("cat", "dog", "bird")):
        write_images(data / name, 3, seed=seed)
    learner, inference = root / "learner.npz", root / "inference.npz"
    code = cli.main(
        ["learn", str(bundle), str(data), "--domain", "animals", "--state", str(learner)]
        + ["--inference-state", str(inference), *RAIL]
    )
    assert code == 0
    return {
        "root": root,
        "bundle": bundle,
        "images": images,
        "data": data,
        "learner": learner,
        "inference": inference,
    }


# ---- outputs that are inputs: refused before any work -------------------------------------


def _run_cases(w: dict[str, Path], tmp: Path) -> list[tuple[list[object], list[str]]]:
    bundle, images = w["bundle"], w["images"]
    link = tmp / "link.jsonl"
    link.symlink_to(bundle / "manifest.json")
    state_link = tmp / "state-link.npz"
    state_link.symlink_to(w["learner"])
    hard = tmp / "hard.jpg"
    os.link(images / "img_0001.jpg", hard)
    run = ["run", bundle]
    learn = ["learn", bundle, w["data"], "--domain", "animals", *RAIL]
    return [
        ([*run, images, "--out", bundle / "manifest.json"], ["--out", "BUNDLE"]),
        ([*run, images, "--out", bundle / "image_encoder.onnx"], ["--out", "BUNDLE"]),
        ([*run, images / "img_0000.jpg", "--out", images / "img_0000.jpg"], ["SOURCE"]),
        ([*run, images, "--out", images / "img_0002.jpg"], ["--out", "SOURCE"]),
        ([*run, f"{images}/*.jpg", "--out", images / "img_0003.jpg"], ["SOURCE"]),
        ([*run, images, "--out", link], ["--out", "BUNDLE"]),  # through a symbolic link
        ([*run, images, "--out", hard], ["--out", "SOURCE"]),  # a hard link to a source image
        ([*run, hard, "--out", images / "img_0001.jpg"], ["--out", "SOURCE"]),
        ([*run, images, "--out", bundle], ["--out", "BUNDLE"]),  # the bundle folder itself
        ([*run, images, "--state", bundle / "text_embeddings.npy"], ["--state", "BUNDLE"]),
        ([*run, images, "--state", images / "img_0000.jpg"], ["--state", "SOURCE"]),
        ([*run, images, "--rail-state", w["learner"], "--out", w["learner"]], ["--rail-state"]),
        ([*run, images, "--rail-state", w["learner"], "--state", w["learner"]], ["--state"]),
        ([*run, images, "--state", tmp / "s.npz", "--out", tmp / "s.npz"], ["--out", "--state"]),
        ([*learn, "--state", w["data"] / "cat" / "img_0000.jpg"], ["--state", "DATA_DIR"]),
        (
            [*learn, "--state", tmp / "n.npz", "--inference-state", bundle / "classes.json"],
            ["--inference-state", "BUNDLE"],
        ),
        (["merge", w["learner"], w["learner"], tmp / "x.npz"], ["OUT", "STATE"]),
        (
            ["merge", tmp / "m.npz", w["learner"], tmp / "x.npz", "--inference-state", state_link],
            ["--inference-state", "STATE"],
        ),
        (
            ["merge", bundle / "manifest.json", w["learner"], tmp / "x.npz", "--bundle", bundle],
            ["OUT", "--bundle"],
        ),
        (
            ["eval", bundle, tmp, "--order", "animals", "--json", bundle / "manifest.json"],
            ["--json", "BUNDLE"],
        ),
    ]


CASES = 20


@pytest.mark.parametrize("index", range(CASES))
def test_an_output_that_the_run_reads_is_refused(world, tmp_path, capsys, index) -> None:
    cases = _run_cases(world, tmp_path)
    assert len(cases) == CASES
    argv, words = cases[index]
    protected = [world["bundle"], world["images"], world["data"], world["learner"]]
    protected += [world["inference"]]
    _refused(cli.main, argv, capsys, protected, *words)


def test_resuming_a_state_is_not_a_conflict(world, tmp_path, capsys) -> None:
    state = tmp_path / "s.npz"
    for _ in range(2):  # the second run reads and writes the same --state
        code, err = _call(cli.main, ["run", world["bundle"], world["images"], "--state", state,
                                     "--out", tmp_path / "o.jsonl"], capsys)  # fmt: skip
        assert code == 0 and "Traceback" not in err, err
    assert "resumed state" in err


# ---- vlm-export --overwrite and build-engine never delete what is not theirs ---------------


@pytest.fixture()
def classes(tmp_path: Path) -> Path:
    path = tmp_path / "classes.txt"
    path.write_text("cat\ndog\n")
    return path


EXPORT = ["--method", "zeroshot", "--model", "vlm-test-tiny", "--pretrained", "none"]
EXPORT += ["--templates", "single", "--quiet"]


@pytest.mark.exporter  # without torch, vlm-export refuses to export before this
def test_overwrite_refuses_a_folder_of_photos_and_a_thesis(tmp_path, classes, capsys) -> None:
    out = tmp_path / "life"
    write_images(out / "holiday", 3)
    (out / "thesis.tex").write_text("\\chapter{Introduction}\n" * 100)
    (out / "manifest.json").write_text('{"format": "my-photo-index"}')  # not a bundle's
    argv = [*EXPORT, "--classes", classes, "--out", out, "--overwrite"]
    line = _refused(export_main, argv, capsys, [out], "only a vlm-export bundle", code=2)
    assert "thesis.tex" in line


@pytest.mark.exporter  # without torch, vlm-export refuses to export before this
def test_overwrite_refuses_a_bundle_holding_a_users_file(world, tmp_path, classes, capsys):
    out = tmp_path / "bundle"
    make_bundle(out, method="zeroshot")
    (out / "notes.txt").write_text("mine")
    argv = [*EXPORT, "--classes", classes, "--out", out, "--overwrite"]
    _refused(export_main, argv, capsys, [out], "notes.txt", code=2)


def test_export_out_folder_may_not_hold_an_input(tmp_path, capsys) -> None:
    out = tmp_path / "bundle"
    make_bundle(out, method="zeroshot")
    inside = out / "classes.txt"
    inside.write_text("cat\ndog\n")
    argv = [*EXPORT, "--classes", inside, "--out", out, "--overwrite"]
    _refused(export_main, argv, capsys, [out], "--out", "--classes", code=2)


def test_build_engine_timing_cache_may_not_be_a_bundle_file(world, capsys) -> None:
    bundle = world["bundle"]
    argv = ["build-engine", bundle, "--timing-cache", bundle / "manifest.json"]
    _refused(export_main, argv, capsys, [bundle], "--timing-cache", "BUNDLE", code=2)


def test_build_engine_never_replaces_an_unlisted_file(tmp_path) -> None:
    from vlm_export.core.errors import UserError
    from vlm_export.export.bundle.staging import _refuse_listed

    (tmp_path / "image_encoder.x.engine").write_bytes(b"someone's file")
    manifest = {"engines": []}
    with pytest.raises(UserError, match="does not list it"):
        _refuse_listed(tmp_path, manifest, "image_encoder.x.engine", True, "replace")
    source = tmp_path / "image_encoder.x.engine"  # --register of the file already in place
    _refuse_listed(tmp_path, manifest, source.name, False, "replace", source)


# ---- writes through symbolic links; temporary files ------------------------------------------


def test_a_state_that_is_a_symbolic_link_stays_one(world, tmp_path, capsys) -> None:
    real = tmp_path / "kept" / "state.npz"
    real.parent.mkdir()
    link = tmp_path / "state.npz"
    link.symlink_to(real)
    argv = ["run", world["bundle"], world["images"], "--state", link, "--out", os.devnull]
    assert _call(cli.main, argv, capsys)[0] == 0
    assert link.is_symlink() and real.is_file()
    first = real.read_bytes()
    argv[2] = world["images"] / "img_0000.jpg"
    assert _call(cli.main, argv, capsys)[0] == 0
    assert link.is_symlink() and real.read_bytes() != first  # the target was updated
    assert not stale_temps(real) and not list(tmp_path.glob(".*"))


def test_learn_and_merge_outputs_through_links(world, tmp_path, capsys) -> None:
    targets = [tmp_path / name for name in ("a.npz", "i.npz", "m.npz")]
    links = [tmp_path / f"link-{t.name}" for t in targets]
    for link, target in zip(links, targets, strict=True):
        target.write_bytes(b"old")
        link.symlink_to(target)
    learn = ["learn", world["bundle"], world["data"], "--domain", "animals", *RAIL]
    os.unlink(targets[0])  # a dangling link: the first save creates its target
    code, err = _call(cli.main, [*learn, "--state", links[0], "--inference-state", links[1]],
                      capsys)  # fmt: skip
    assert code == 0, err
    code, err = _call(cli.main, ["merge", links[2], links[0], world["learner"]], capsys)
    assert code == 0, err
    for link, target in zip(links, targets, strict=True):
        assert link.is_symlink() and target.read_bytes()[:2] == b"PK"


def test_next_save_removes_only_its_own_leftovers(tmp_path) -> None:
    target = tmp_path / "s.npz"
    mine = [tmp_path / ".s.npz.vlm-tmp-abcd1234", tmp_path / ".s.npz.k3j4h5g6.tmp"]
    others = [
        tmp_path / ".s.npz.vlm-tmp-short",  # not our random part
        tmp_path / ".t.npz.vlm-tmp-abcd1234",  # another target's
        tmp_path / "s.npz.vlm-tmp-abcd1234",  # not hidden
        tmp_path / ".s.npz.notes",
    ]
    for path in mine + others:
        path.write_bytes(b"x" * 100)
        os.utime(path, (time.time() - 60, time.time() - 60))
    save_state(target, "test", 1, "fp", {"w": np.zeros(3)})
    assert not any(p.exists() for p in mine)
    assert all(p.read_bytes() == b"x" * 100 for p in others)


def test_a_killed_first_save_is_reported_on_the_next_run(world, tmp_path, capsys) -> None:
    state = tmp_path / "s.npz"
    leftover = tmp_path / ".s.npz.vlm-tmp-zz99yy88"
    leftover.write_bytes(b"\0" * 5000)
    os.utime(leftover, (time.time() - 60, time.time() - 60))
    argv = ["run", world["bundle"], world["images"], "--state", state, "--out", os.devnull]
    code, err = _call(cli.main, argv, capsys)
    assert code == 0 and "Traceback" not in err
    warning = [line for line in err.splitlines() if "interrupted save" in line]
    assert len(warning) == 1 and leftover.name in warning[0] and "4.9 KB" in warning[0]
    assert warning[0].startswith("vlm-edge: WARNING: --state")
    assert not leftover.exists() and state.is_file()


KILL_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from vlm_export.core.state_file import save_state
    big = np.random.default_rng(0).standard_normal(int(sys.argv[2]))
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        save_state(sys.argv[1], "test", 1, "fp", {"w": big, "i": np.array(i)})
        print(i, flush=True)
    """
)


def _kill_trials(tmp_path: Path, trials: int, floats: int, wait_s: float) -> tuple[int, int]:
    """kill -9 a process saving a state in a loop; (trials with leftovers, corrupt targets)."""
    target = tmp_path / "state.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    leftovers = corrupt = 0
    rng = np.random.default_rng(1)
    for _ in range(trials):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_WRITER, str(target), str(floats)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        proc.stdout.readline()  # ready: saving from now on
        time.sleep(float(rng.uniform(0.0, wait_s)))
        proc.kill()
        proc.wait()
        proc.stdout.close()
        leftovers += bool(stale_temps(target))
        if target.exists():
            try:
                arrays, _ = load_state(target, "test", 1, "fp")
                assert arrays["w"].shape == (floats,)
            except Exception:  # noqa: BLE001 - counted
                corrupt += 1
    return leftovers, corrupt


@pytest.mark.slow
def test_kill_9_during_large_state_writes(tmp_path) -> None:
    """40 kill -9 trials during 80 MB state writes: no corrupt state; leftovers are cleaned."""
    leftovers, corrupt = _kill_trials(tmp_path, 40, 10_000_000, 2.5)
    assert corrupt == 0
    assert leftovers > 0  # the kills did land during writes
    target = tmp_path / "state.npz"
    if target.exists():
        save_state(target, "test", 1, "fp", {"w": np.zeros(1)})
    else:
        assert atomic.report_interrupted_first_save(target)
    assert not stale_temps(target)


def test_kill_9_during_state_writes_quick(tmp_path) -> None:
    leftovers, corrupt = _kill_trials(tmp_path, 2, 1_000_000, 0.5)
    assert corrupt == 0
    target = tmp_path / "state.npz"
    if target.exists():
        save_state(target, "test", 1, "fp", {"w": np.zeros(1)})
        assert not stale_temps(target)


# ---- write errors, permission errors --------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_out_on_a_full_disk_is_one_line_and_the_state_is_saved(world, tmp_path, capsys):
    state = tmp_path / "s.npz"
    argv = ["run", world["bundle"], world["images"], "--state", state, "--out", "/dev/full"]
    code, err = _call(cli.main, argv, capsys)
    assert code == 1 and "Traceback" not in err
    assert "cannot write /dev/full" in err.strip().splitlines()[-1]
    assert "state saved" in err and state.is_file()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_standard_output_on_a_full_disk(world, tmp_path) -> None:
    state = tmp_path / "s.npz"
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "vlm_export.runtime", "run", str(world["bundle"]),
             str(world["images"]), "--state", str(state)],
            stdout=full, stderr=subprocess.PIPE, text=True, env={**os.environ,
            "PYTHONPATH": str(ROOT)}, timeout=120,
        )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "Exception ignored" not in done.stderr
    assert "cannot write standard output" in done.stderr and state.is_file()


def _permission_denied(*_args, **_kwargs):
    raise PermissionError(13, "Permission denied", "/somewhere/denied")


@pytest.mark.parametrize(
    "where",
    [
        "vlm_export.runtime.io.sources.Path.iterdir",  # a source folder
        "vlm_export.core.manifest.read_json",  # the manifest
        "vlm_export.core.verified.sha256_file",  # verifying the model
        "vlm_export.runtime.io.preprocess.Image.open",  # an image (becomes an error record)
    ],
)
def test_permission_errors_are_one_line(world, capsys, monkeypatch, where) -> None:
    monkeypatch.setattr(where, _permission_denied)
    argv = ["run", world["bundle"], world["images"], "--out", os.devnull, "--verify", "full"]
    code, err = _call(cli.main, argv, capsys)
    assert "Traceback" not in err, err
    if "preprocess" not in where:
        assert code == 1 and err.strip().splitlines()[-1].startswith("vlm-edge: error: "), err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_folders_for_real(world, tmp_path, capsys) -> None:
    locked = tmp_path / "locked"
    write_images(locked, 1)
    locked.chmod(0)
    try:
        code, err = _call(cli.main, ["run", world["bundle"], locked], capsys)
        assert code == 1 and "Traceback" not in err
    finally:
        locked.chmod(0o755)


# ---- signals and Ctrl-C at start-up --------------------------------------------------------


def _signal_at(monkeypatch, frame: int, signals: Sequence[int]) -> None:
    original = Pipeline.process
    seen = {"n": 0}

    def process(self, *args, **kwargs):
        seen["n"] += 1
        if seen["n"] == frame:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "process", process)


@pytest.fixture
def hangup() -> Iterator[Callable[[Any], None]]:
    """Sets SIGHUP's disposition for one test; the one pytest inherited comes back after it."""
    inherited = signal.getsignal(signal.SIGHUP)
    yield lambda disposition: signal.signal(signal.SIGHUP, disposition)
    signal.signal(signal.SIGHUP, inherited)


@pytest.fixture
def interrupt_key() -> Iterator[Callable[[Any], None]]:
    """Sets SIGINT's disposition for one test; the one pytest inherited comes back after it."""
    inherited = signal.getsignal(signal.SIGINT)
    yield lambda disposition: signal.signal(signal.SIGINT, disposition)
    signal.signal(signal.SIGINT, inherited)


@pytest.mark.parametrize(
    ("signals", "code", "message"),
    [
        ([signal.SIGHUP], 0, "stopped (SIGHUP)"),
        ([signal.SIGINT, signal.SIGTERM], 130, "interrupted (Ctrl-C)"),
        ([signal.SIGTERM, signal.SIGHUP], 0, "stopped (SIGTERM)"),
    ],
)
def test_stop_signals_save_the_state(
    world, tmp_path, capsys, monkeypatch, hangup, interrupt_key, signals, code, message
) -> None:
    hangup(signal.SIG_DFL)  # as started from a terminal, whatever started pytest
    interrupt_key(signal.default_int_handler)
    _signal_at(monkeypatch, 2, signals)
    state = tmp_path / "s.npz"
    argv = ["run", world["bundle"], world["images"], "--state", state, "--out", os.devnull]
    status, err = _call(cli.main, [*argv, "--save-every", "0"], capsys)
    assert status == code and message in err and "state saved" in err, err
    assert build_reservoir(Bundle.open(world["bundle"]), {}, state).counts().sum() >= 1
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


def test_an_ignored_hangup_stays_ignored(world, tmp_path, capsys, monkeypatch, hangup) -> None:
    """Under nohup (SIGHUP ignored from the start) a hangup does not stop the run."""
    hangup(signal.SIG_IGN)
    _signal_at(monkeypatch, 2, [signal.SIGHUP])
    out = tmp_path / "out.jsonl"
    argv = ["run", world["bundle"], world["images"], "--out", out]
    status, err = _call(cli.main, argv, capsys)
    assert status == 0 and "stopped" not in err, err
    images = [p for p in Path(world["images"]).iterdir() if p.is_file()]
    assert len(out.read_text().splitlines()) == len(images)
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def test_an_ignored_interrupt_stays_ignored(
    world, tmp_path, capsys, monkeypatch, interrupt_key
) -> None:
    """A script's background job (SIGINT ignored from the start) outlives the script's Ctrl-C."""
    interrupt_key(signal.SIG_IGN)
    _signal_at(monkeypatch, 2, [signal.SIGINT])
    out = tmp_path / "out.jsonl"
    argv = ["run", world["bundle"], world["images"], "--out", out]
    status, err = _call(cli.main, argv, capsys)
    assert status == 0 and "interrupted" not in err, err
    images = [p for p in Path(world["images"]).iterdir() if p.is_file()]
    assert len(out.read_text().splitlines()) == len(images)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.mark.parametrize(
    "where",
    [
        "vlm_export.runtime.commands.run.Bundle.open",
        "vlm_export.runtime.commands.run.open_source",
        "vlm_export.runtime.cli.guard_arguments",
    ],
)
def test_ctrl_c_during_start_up(world, capsys, monkeypatch, where) -> None:
    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, interrupt)
    code, err = _call(cli.main, ["run", world["bundle"], world["images"]], capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "vlm-edge: interrupted", err
    assert "Traceback" not in err


def test_ctrl_c_while_importing_onnxruntime_is_not_a_reinstall_hint(monkeypatch, ctrl_c) -> None:
    def broken_by_ctrl_c(name: str):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("numpy.core.multiarray failed to import") from None

    monkeypatch.setattr(onnxruntime_backend.importlib, "import_module", broken_by_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        onnxruntime_backend.import_onnxruntime()

    def signalled(name: str):  # the interrupt is swallowed inside, only the flag knows
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        except KeyboardInterrupt:
            pass
        raise ImportError("DLL load failed")

    monkeypatch.setattr(onnxruntime_backend.importlib, "import_module", signalled)
    with pytest.raises(KeyboardInterrupt):
        onnxruntime_backend.import_onnxruntime()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def really_broken(name: str):
        raise ImportError("libonnxruntime.so: cannot open shared object file")

    monkeypatch.setattr(onnxruntime_backend.importlib, "import_module", really_broken)
    with pytest.raises(onnxruntime_backend.OnnxRuntimeMissing, match="reinstall"):
        onnxruntime_backend.import_onnxruntime()


CTRL_C_AFTER = textwrap.dedent(
    """
    import os, signal, sys, threading
    from vlm_export.runtime import cli, launch
    delay = float(sys.argv.pop(1))
    inner = cli._main
    def timed(argv):
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
        timer.daemon = True
        timer.start()
        return inner(argv)
    cli._main = timed
    launch.entry()
    """
)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3, 1.5])
def test_real_ctrl_c_during_start_up(world, delay) -> None:
    """A real SIGINT at several moments of start-up (imports, bundle, engine) or later.

    (Python's own start-up, before vlm-edge's code runs, is outside what a command can catch.)
    """
    argv = ["run", str(world["bundle"]), str(world["images"]), "--out", os.devnull]
    done = subprocess.run(
        [sys.executable, "-c", CTRL_C_AFTER, str(delay), *argv],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120, preexec_fn=default_sigint,
    )  # fmt: skip
    assert "Traceback" not in done.stderr and "reinstall" not in done.stderr, done.stderr
    assert done.returncode in (0, 130), done.stderr  # finished before the signal, or stopped
    if done.returncode == 130:
        assert "interrupted" in done.stderr.strip().splitlines()[-1]


def test_runtime_face_and_launchers_import_nothing_heavy() -> None:
    """``import vlm_export.runtime`` (what ``python -m`` and the console script import before the
    launcher's own code) loads no NumPy, PIL, SciPy, ONNX Runtime or pipeline."""
    probe = (
        "import sys, vlm_export.runtime, vlm_export.runtime.launch, vlm_export.export.launch\n"
        "heavy = ('numpy', 'PIL', 'scipy', 'onnxruntime', 'torch', 'vlm_export.runtime.pipeline')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "from vlm_export.runtime import Bundle, EdgePipeline, FrameResult, open_pipeline\n"
        "print(open_pipeline.__module__, 'numpy' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.stdout.splitlines() == ["[]", "vlm_export.runtime.api True"], done.stdout


#: sends SIGINT to its own process the first time MODULE is looked up: a Ctrl-C that lands
#: exactly while that module is being imported, then runs the launcher
CTRL_C_WHILE_IMPORTING = textwrap.dedent(
    """
    import os, signal, sys
    module, launcher = sys.argv.pop(1), sys.argv.pop(1)

    class Interrupt:
        def find_spec(self, name, path=None, target=None):
            if name == module:
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, Interrupt())
    if launcher == "edge":
        from vlm_export.runtime.launch import entry
    else:
        from vlm_export.export.launch import entry
    entry()
    """
)


@pytest.mark.parametrize(
    ("launcher", "module"),
    [
        ("edge", "vlm_export.runtime.cli"),  # before main: the launcher's quick exit
        ("edge", "vlm_export.core.interrupts"),
        ("edge", "numpy"),  # inside main: a KeyboardInterrupt, which main turns into the line
        ("edge", "PIL.Image"),
        ("edge", "scipy.linalg"),
        ("edge", "onnxruntime"),
        ("edge", "vlm_export.runtime.pipeline"),
        ("export", "vlm_export.export.cli"),
        ("export", "numpy"),
    ],
)
def test_ctrl_c_while_any_module_imports_is_one_line(world, launcher, module) -> None:
    argv = ["--help"]
    if launcher == "edge":
        argv = ["run", str(world["bundle"]), str(world["images"]), "--method", "tca", "--out",
                os.devnull]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", CTRL_C_WHILE_IMPORTING, module, launcher, *argv],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=default_sigint,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and "reinstall" not in done.stderr, done.stderr
    assert done.returncode == 130 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"vlm-{launcher}: interrupted"), done.stderr


def _python_start_up_only(err: str) -> bool:
    """A traceback raised inside Python's own start-up (``site`` reading .pth files), before
    any of vlm-edge's code runs: no program can catch that one."""
    return "<frozen site>" in err and f"vlm_export{os.sep}" not in err


@pytest.mark.slow  # 60 runs of vlm-edge: about two minutes on two cores
def test_sixty_ctrl_c_from_process_start_are_one_line_each(tmp_path, world) -> None:
    """The issue's sweep: a SIGINT at 60 moments from 0 to 1.5 s after ``vlm-edge run`` starts
    (counted from the process start, Python's own start-up included)."""
    folder = tmp_path / "frames"
    write_images(folder, 3000)  # a run that lasts past 1.5 s
    argv = [sys.executable, "-m", "vlm_export.runtime", "run", str(world["bundle"]), str(folder),
            "--out", os.devnull]  # fmt: skip
    outcomes: list[tuple[float, int, str]] = []
    for index in range(60):
        delay = 1.5 * index / 59
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=default_sigint,
        )  # fmt: skip
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        outcomes.append((delay, proc.returncode, err))
    for delay, code, err in outcomes:
        lines = err.strip().splitlines()
        if "Traceback" in err:  # only where no program can catch it
            assert _python_start_up_only(err) and code == 1, (delay, err)
            continue
        assert code in (130, -signal.SIGINT, 0), (delay, code, err)  # -2: before Python's handler
        if code == 130:
            assert lines[-1].startswith("vlm-edge: interrupted"), (delay, err)
    assert sum(code == 130 for _, code, _ in outcomes) >= 50


def test_export_ctrl_c_is_one_line(monkeypatch, tmp_path, classes, capsys) -> None:
    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vlm_export.export.cli._check_paths", interrupt)
    code, err = _call(export_main, [*EXPORT, "--classes", classes, "--out", tmp_path / "b"], capsys)
    assert code == 130 and len(err.strip().splitlines()) == 1


@pytest.mark.exporter
def test_export_sigterm_removes_its_temporary_folder(monkeypatch, tmp_path, classes, capsys):
    """SIGTERM (timeout, docker stop, systemd) while the bundle is being written: exit 143, one
    line, and nothing left beside --out (SIGTERM used to leave the temporary folder)."""
    import vlm_export.export.bundle.writer as writer

    def terminate(manifest):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(writer, "validate_manifest", terminate)
    before = signal.getsignal(signal.SIGTERM)
    argv = [*EXPORT, "--classes", classes, "--out", tmp_path / "b"]
    code, err = _call(export_main, argv, capsys)
    assert code == 143 and err.strip().splitlines() == [
        "vlm-export: interrupted; nothing was written"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.txt"]
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.exporter
def test_export_sigterm_after_the_bundle_is_in_place_is_no_failure(
    monkeypatch, tmp_path, classes, capsys
):
    """A SIGTERM between the rename and the exit would have said "nothing was written" (143)
    about a bundle that was; once in place, the export finishes with 0."""
    import vlm_export.export.pipeline as pipeline

    original = pipeline.export_bundle

    def export_then_terminate(*args, **kwargs):
        out = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(pipeline, "export_bundle", export_then_terminate)
    argv = [*EXPORT, "--classes", classes, "--out", tmp_path / "b"]
    code, err = _call(export_main, argv, capsys)
    assert code == 0 and "nothing was written" not in err, err
    assert (tmp_path / "b" / "manifest.json").is_file()


# ---- strict JSON; --threads ---------------------------------------------------------------


def test_non_utf8_file_names_are_strict_json(world, tmp_path, capsys) -> None:
    folder = tmp_path / "odd"
    write_images(folder, 1)
    raw = os.fsencode(folder) + b"/caf\xe9.jpg"
    os.rename(folder / "img_0000.jpg", raw)
    out = tmp_path / "o.jsonl"
    code, err = _call(cli.main, ["run", world["bundle"], folder, "--out", out], capsys)
    assert code == 0, err
    text = out.read_bytes().decode("utf-8")  # strict UTF-8
    record = json.loads(text)
    assert "\\ud" not in text  # no lone-surrogate escapes (rejected by strict readers)
    assert record["source"].endswith("caf\\xe9.jpg")
    assert bytes.fromhex(record["source_hex"]) == raw


def test_non_finite_scores_become_error_records(world, tmp_path, capsys, monkeypatch) -> None:
    original = FrameResult.to_record

    def poisoned(self):
        record = original(self)
        record["topk"][0]["score"] = float("nan")
        return record

    monkeypatch.setattr(FrameResult, "to_record", poisoned)
    out = tmp_path / "o.jsonl"
    code, err = _call(cli.main, ["run", world["bundle"], world["images"], "--out", out], capsys)
    assert code == 1 and "no frame could be read" in err  # every frame failed, honestly
    for line in out.read_text().splitlines():
        record = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in output"))
        assert "non-finite" in record["error"] and "topk" not in record


def test_json_is_written_strictly(tmp_path) -> None:
    with pytest.raises(ValueError):
        dumps({"score": float("inf")})
    assert escape_text("caf\udce9") == "caf\\xe9"
    atomic_write_bytes(tmp_path / "x.json", dumps({"a": "caf\udce9"}).encode())
    assert json.loads((tmp_path / "x.json").read_bytes().decode("utf-8")) == {"a": "caf\\xe9"}


def test_too_many_threads_are_capped(world, capsys) -> None:
    argv = ["run", world["bundle"], world["images"] / "img_0000.jpg", "--threads", 100_000]
    code, err = _call(cli.main, [*argv, "--out", os.devnull], capsys)
    assert code == 0 and "Traceback" not in err
    assert f"more than the {os.cpu_count()} cores here" in err
