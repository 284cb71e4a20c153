"""The ``vlm-edge`` command: run (records, errors, state, signals, video) and info."""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle, write_images

from vlm_export.runtime import cli
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.pipeline import Pipeline
from vlm_export.runtime.tca.stage import build_reservoir


@pytest.fixture(scope="module")
def tca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tca") / "bundle", method="tca")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 8)
    (folder / "img_0003.jpg").write_bytes(b"\xff\xd8\xff\xe0 corrupt jpeg")
    return folder


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_run_folder_with_a_corrupt_image(tca_dir, folder, tmp_path, capsys) -> None:
    out = tmp_path / "results.jsonl"
    code = cli.main(["run", str(tca_dir), str(folder), "--out", str(out), "--topk", "2"])
    assert code == 0
    records = _lines(out)
    assert [r["index"] for r in records] == list(range(8))
    bad = records[3]
    assert bad["source"].endswith("img_0003.jpg") and "cannot read image" in bad["error"]
    good = [r for r in records if "error" not in r]
    assert len(good) == 7
    for record in good:
        assert record["class"] in ("cat", "dog", "bird", "car", "bus", "train")
        assert len(record["topk"]) == 2 and record["topk"][0]["class"] == record["class"]
        assert {"preprocess", "engine", "reservoir", "correction", "total"} <= set(
            record["timings_ms"]
        )
    err = _stderr_lines(capsys)
    assert any("8 frames, 1 unreadable" in line and "frames/s" in line for line in err)
    assert any(line.startswith("vlm-edge: mean ms per frame: preprocess") for line in err)


def test_run_writes_to_stdout_by_default(tca_dir, folder, capsys) -> None:
    assert (
        cli.main(["run", str(tca_dir), str(folder / "img_0000.jpg"), "--method", "zeroshot"]) == 0
    )
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert len(records) == 1 and "reservoir" not in records[0]["timings_ms"]
    assert "zeroshot on onnxruntime:CPUExecutionProvider" in captured.err


def test_state_saved_and_resumed(tca_dir, folder, tmp_path, capsys) -> None:
    state = tmp_path / "reservoir.npz"
    args = ["run", str(tca_dir), str(folder), "--state", str(state), "--out", str(tmp_path / "o")]
    assert cli.main([*args, "--anchor-rule", "per_class", "--save-every", "2"]) == 0
    assert state.is_file()
    bundle = Bundle.open(tca_dir)
    first = build_reservoir(bundle, {}, state)
    assert 0 < first.counts().sum() <= 7  # 7 readable images, some may have been evicted
    assert first.config.anchor_rule == "per_class"  # the saved config travels with the state
    capsys.readouterr()
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert f"resumed state {state} ({first.counts().sum()} entries)" in err
    assert f"state saved to {state}" in err
    assert build_reservoir(bundle, {}, state).counts().sum() >= first.counts().sum()
    # another bundle's state is refused with one line
    other = make_bundle(tmp_path / "other", seed=3)
    assert cli.main(["run", str(other), str(folder), "--state", str(state)]) == 1
    err = _stderr_lines(capsys)
    assert err[-1].startswith("vlm-edge: error: ") and "another bundle" in err[-1]


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, frame: int, action) -> None:
    original = Pipeline.process
    seen = {"n": 0}

    def process(self, *args, **kwargs):
        seen["n"] += 1
        if seen["n"] == frame:
            action()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "process", process)


def _raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("action", "code", "message", "lines"),
    [
        # a signal stops the run after the frame in progress: frames 0-4 done, state whole
        (lambda: os.kill(os.getpid(), signal.SIGTERM), 0, "stopped (SIGTERM)", 5),
        (lambda: os.kill(os.getpid(), signal.SIGINT), 130, "interrupted (Ctrl-C)", 5),
        # an interrupt raised inside the frame (no handler installed) cuts frame 4 off
        (_raise_keyboard_interrupt, 130, "interrupted (Ctrl-C)", 4),
    ],
)
def test_signals_save_state_and_leave_valid_jsonl(
    tca_dir, folder, tmp_path, capsys, monkeypatch, ctrl_c, action, code, message, lines
) -> None:
    _interrupt_at(monkeypatch, 5, action)
    state, out = tmp_path / "s.npz", tmp_path / "o.jsonl"
    args = ["run", str(tca_dir), str(folder), "--state", str(state), "--out", str(out)]
    assert cli.main([*args, "--save-every", "0"]) == code
    assert len(_lines(out)) == lines  # every line is whole
    assert build_reservoir(Bundle.open(tca_dir), {}, state).counts().sum() == lines - 1
    err = capsys.readouterr().err
    assert message in err and "state saved" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_second_ctrl_c_stops_at_once_without_saving(
    tca_dir, folder, tmp_path, capsys, monkeypatch, ctrl_c
) -> None:
    def two_interrupts() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    state, out = tmp_path / "s.npz", tmp_path / "o.jsonl"
    _interrupt_at(monkeypatch, 5, two_interrupts)
    args = ["run", str(tca_dir), str(folder), "--state", str(state), "--out", str(out)]
    assert cli.main([*args, "--save-every", "0"]) == 130
    assert len(_lines(out)) == 4 and not state.exists()
    assert "forced stop" in capsys.readouterr().err


def test_state_is_saved_when_the_run_fails(tca_dir, folder, tmp_path, monkeypatch) -> None:
    def fail() -> None:
        raise RuntimeError("engine exploded")

    _interrupt_at(monkeypatch, 6, fail)
    state = tmp_path / "s.npz"
    with pytest.raises(RuntimeError, match="engine exploded"):
        cli.main(["run", str(tca_dir), str(folder), "--state", str(state), "--out", os.devnull])
    assert build_reservoir(Bundle.open(tca_dir), {}, state).counts().sum() == 4


def test_run_a_video_file(tca_dir, tmp_path) -> None:
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (80, 60))
    for index in range(6):
        writer.write(np.full((60, 80, 3), 30 * index, np.uint8))
    writer.release()
    out = tmp_path / "video.jsonl"
    assert cli.main(["run", str(tca_dir), str(path), "--out", str(out), "--quiet"]) == 0
    records = _lines(out)
    assert [r["index"] for r in records] == list(range(6))
    assert all(r["source"] == str(path) and "label" in r for r in records)


def test_option_mistakes_are_one_line_errors(tca_dir, folder, tmp_path, capsys) -> None:
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["--method", "zeroshot", "--state", "s.npz"], "--state need --method tca"),
        (["--save-every", "-1"], "--save-every must be 0 or more"),
        (["--capacity", "0"], "capacity must be an integer >= 1"),
        (["--providers", "tensorrt"], "provider(s) not available"),
        (["--out", str(tmp_path / "no" / "such" / "dir" / "o.jsonl")], "cannot write"),
        (["--state", str(tmp_path / "a-file" / "s.npz")], "is a file, not a folder"),
        (["--state", str(tmp_path)], "is a folder, not a file"),
    ]
    for extra, message in cases:
        assert cli.main(["run", str(tca_dir), str(folder), *extra]) == 1
        err = _stderr_lines(capsys)
        assert err[-1].startswith("vlm-edge: error: ") and message in err[-1], (extra, err)


def test_every_frame_unreadable_exits_1(tca_dir, tmp_path, capsys) -> None:
    (tmp_path / "a.jpg").write_bytes(b"")
    assert cli.main(["run", str(tca_dir), str(tmp_path / "a.jpg"), "--out", os.devnull]) == 1
    assert "no frame could be read" in capsys.readouterr().err


def test_untrained_bundle_warns_loudly(tmp_path, folder, capsys) -> None:
    bundle = make_bundle(tmp_path / "untrained", method="zeroshot", untrained=True)
    assert cli.main(["run", str(bundle), str(folder / "img_0000.jpg")]) == 0
    err = capsys.readouterr().err
    assert "vlm-edge: WARNING: bundle" in err and "UNTRAINED" in err and "meaningless" in err


def test_info_describes_the_bundle(tca_dir, capsys) -> None:
    assert cli.main(["info", str(tca_dir)]) == 0
    out = capsys.readouterr().out
    for expected in (
        "fake-tiny",
        "pretrained fake",
        "method      tca",
        "17 -> 14 (block 2) -> 14 (block 3)",
        "GFLOPs full",
        "parity      passed",
        "6 in 2 domains: animals (3), vehicles (3)",
        "anchors [6x2x16] float32",
        "no TensorRT engines built",
        "image_encoder.onnx",
    ):
        assert expected in out, expected
    assert cli.main(["info", str(tca_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "tca"


def test_command_modules_follow_the_protocol() -> None:
    modules = cli.command_modules()
    names = [module.__name__.rsplit(".", 1)[1] for module in modules]
    assert {"info", "run"} <= set(names)
    for module in modules:
        assert callable(module.add_parser) and callable(module.handle)


def test_console_errors_have_no_traceback(tca_dir, tmp_path) -> None:
    for argv, message in [
        (["run", str(tca_dir), str(tmp_path / "missing")], "source not found"),
        (["info", str(tmp_path)], "not a bundle"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "vlm_export.runtime", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vlm-edge: error: ") and message in lines[0]


def test_max_frames_and_glob_source(tca_dir, folder, tmp_path) -> None:
    out = tmp_path / "o.jsonl"
    pattern = str(folder / "img_000[4-7].jpg")
    assert cli.main(["run", str(tca_dir), pattern, "--max-frames", "2", "--out", str(out)]) == 0
    assert [Path(r["source"]).name for r in _lines(out)] == ["img_0004.jpg", "img_0005.jpg"]


def test_progress_line_and_summary(capsys) -> None:
    from vlm_export.runtime.commands._run_loop import RunStats
    from vlm_export.runtime.pipeline import FrameResult

    stats = RunStats(total=3, progress=True)
    result = FrameResult(
        0, "a.jpg", 1, "dog", "animals", [], np.zeros(6), np.zeros(6), {"total": 2.0}
    )
    stats.add(result)
    stats.add(None)
    lines = stats.summary()
    err = capsys.readouterr().err
    assert err.startswith("\r1/3 frames") and "dog" in err and err.endswith("\n")
    assert lines[0].startswith("2 frames, 1 unreadable in ")
    assert lines[1] == "mean ms per frame: total 2.00"


@pytest.mark.parametrize(("exported", "runs"), [("tca+rail", "tca"), ("rail", "zeroshot")])
def test_default_method_for_rail_bundles(tmp_path, folder, capsys, exported, runs) -> None:
    bundle = make_bundle(tmp_path / "b", method=exported)
    assert cli.main(["run", str(bundle), str(folder / "img_0000.jpg"), "--out", os.devnull]) == 0
    err = capsys.readouterr().err
    assert f"method {exported} is not available in this runtime; running {runs}" in err
    assert f"vlm-edge: {runs} on onnxruntime" in err


@pytest.mark.parametrize("command", ["run", "info"])
def test_closed_stdout_exits_quietly_and_saves_state(tca_dir, folder, tmp_path, command) -> None:
    # `vlm-edge ... | head -1`, made deterministic: the pipe's reader is gone before any output
    state = tmp_path / "state.npz"
    argv = {"run": ["run", str(tca_dir), str(folder), "--state", str(state)]}.get(
        command, ["info", str(tca_dir)]
    )
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "vlm_export.runtime", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.returncode == cli.EXIT_BROKEN_PIPE == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
    if command == "run":
        assert state.is_file() and f"state saved to {state}" in done.stderr


def test_out_is_replaced_only_once_a_line_is_written(tca_dir, folder, tmp_path, capsys) -> None:
    """An existing --out file survives a run that decides no frame (an empty --classes refused,
    a source with no readable frame); a run that decides frames replaces it, error records
    included, and keeps its permission bits; nothing is left beside it."""
    out = tmp_path / "o.jsonl"
    out.write_text("precious\n")
    out.chmod(0o640)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for extra in (["--classes", ""], []):
        source = str(folder) if extra else str(empty)
        code = cli.main(["run", str(tca_dir), source, "--out", str(out), "--quiet", *extra])
        capsys.readouterr()
        assert code in (1, 2) and out.read_text() == "precious\n"
    assert cli.main(["run", str(tca_dir), str(folder), "--out", str(out), "--quiet"]) == 0
    lines = _lines(out)
    assert len(lines) == 8 and sum("error" in line for line in lines) == 1
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jpg", "o.jsonl"]


def test_a_published_out_removes_the_leftovers_of_killed_runs(tca_dir, folder, tmp_path) -> None:
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")
    stale = tmp_path / ".o.jsonl.vlm-tmp-abcd1234"  # what a run killed with -9 leaves
    stale.write_text('{"index": 0}\n')
    os.utime(stale, (1, 1))
    assert cli.main(["run", str(tca_dir), str(folder), "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval-tta", "{bundle}", "{data}", "--state", ""], "--state is empty: give a path"),
        (["eval-tta", "{bundle}", "{data}", "--json", " "], "--json is empty: give a path"),
        (
            ["eval-tta", "{bundle}", "{data}", "--baseline", ""],
            "--baseline is empty: give a folder",
        ),
        (
            ["eval", "{bundle}", "{data}", "--order", "a", "--rail-state", ""],
            "--rail-state is empty: give a path",
        ),
        (
            ["learn", "{bundle}", "{data}", "--state", "{tmp}/s.npz", "--inference-state", ""],
            "--inference-state is empty: give a path",
        ),
        (
            ["merge", "{tmp}/m.npz", "{tmp}/a.npz", "{tmp}/b.npz", "--inference-state", ""],
            "--inference-state is empty: give a path",
        ),
        (["merge", "{tmp}/m.npz", "{tmp}/a.npz", ""], "STATE is empty: give a path"),
        (["bench", "{bundle}", "--json", ""], "--json is empty: give a path"),
        (["run", "{bundle}", "{data}", "--classes", ""], "--classes is empty: give a path"),
    ],
)
def test_an_empty_path_option_is_refused_by_every_command(
    tca_dir, folder, tmp_path, capsys, argv, message
) -> None:
    """An empty path (``--state "$UNSET"``) is one line before any work: never "not given"."""
    names = {"bundle": tca_dir, "data": folder, "tmp": tmp_path}
    assert cli.main([arg.format(**names) for arg in argv]) == 1
    assert _stderr_lines(capsys) == [f"vlm-edge: error: {message}"]
    assert list(tmp_path.iterdir()) == []


def test_error_lines_escape_the_names_they_show(tca_dir, tmp_path, capsys) -> None:
    """A newline or an escape sequence in a name is shown escaped: one line, the terminal's
    state untouched (UserError, OSError and warning lines alike)."""
    assert cli.main(["info", "nobundle\nvlm-edge: bundle OK"]) == 1
    assert _stderr_lines(capsys) == [
        "vlm-edge: error: bundle folder not found: nobundle\\nvlm-edge: bundle OK"
    ]
    assert cli.main(["run", str(tca_dir), str(tmp_path / "img\x1b[2J\x1b[31mX.png")]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "img\\x1b[2J\\x1b[31mX.png" in err

    def fails(args: object) -> int:
        raise PermissionError(13, "Permission denied", "state\n\x1b[31m.npz")

    parser = cli.build_parser()
    assert cli._dispatch(parser, argparse.Namespace(handler=fails)) == 1
    assert _stderr_lines(capsys) == ["vlm-edge: error: state\\n\\x1b[31m.npz: Permission denied"]

    def warns(args: object) -> int:
        warnings.warn("cannot read img\nvlm-edge: all fine", stacklevel=1)
        return 0

    assert cli._dispatch(parser, argparse.Namespace(handler=warns)) == 0
    assert _stderr_lines(capsys) == ["vlm-edge: WARNING: cannot read img\\nvlm-edge: all fine"]

    def logs(args: object) -> int:
        import logging

        logging.getLogger("vlm_export.runtime.io").warning("skipped %s", "a\nvlm-edge: ok\x1b[2J")
        return 0

    assert cli._dispatch(parser, argparse.Namespace(handler=logs)) == 0
    assert _stderr_lines(capsys) == ["vlm-edge: WARNING: skipped a\\nvlm-edge: ok\\x1b[2J"]
