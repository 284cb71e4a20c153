"""``vlm-edge run`` output: readable on a terminal, JSON lines in pipes, no progress inside lines.

The terminal cases run the command on a real pseudo-terminal (stdout and stderr the same one)
and render what a terminal would show: a carriage return goes back to column 0, ESC [ K erases
to the end of the line.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle, write_images

from vlm_export.runtime.commands._run_output import TextLines, choose_format, short_name
from vlm_export.runtime.pipeline import FrameResult

ROOT = Path(__file__).resolve().parents[1]
TOKEN = re.compile(r"\r|\x1b\[K|[^\r\x1b]|\x1b")
LINE = re.compile(r"^\s*(\d+)  (\S+)\s+(\S+)\s+([01]\.\d{3})\s+(\d+\.\d)$")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("terminal")
    bundle = make_bundle(root / "bundle", method="tca")
    write_images(root / "images", 5)
    (root / "images" / "img_0002.jpg").write_bytes(b"not a jpeg")
    return bundle, root / "images"


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.pop("NO_COLOR", None)
    return env


def _on_terminal(args: list[str]) -> tuple[int, str]:
    """Run vlm-edge with stdout and stderr on one pseudo-terminal; return (status, raw output)."""
    main, child = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "vlm_export.runtime", *args],
        stdin=child,
        stdout=child,
        stderr=child,
        env=_env(),
        close_fds=True,
    )
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    return process.wait(timeout=60), b"".join(chunks).decode()


def _render(raw: str) -> list[str]:
    """The lines a terminal shows for ``raw``."""
    shown = []
    for line in raw.split("\n"):
        chars: list[str] = []
        cursor = 0
        for token in TOKEN.findall(line):
            if token == "\r":
                cursor = 0
            elif token == "\x1b[K":
                del chars[cursor:]
            else:
                chars[cursor : cursor + 1] = [token]
                cursor += 1
        shown.append("".join(chars))
    return [line for line in shown if line]


def test_terminal_gets_readable_lines_and_a_table(setup) -> None:
    bundle, images = setup
    code, raw = _on_terminal(["run", str(bundle), str(images)])
    assert code == 0, raw
    lines = _render(raw)
    assert not any(line.lstrip().startswith("{") for line in lines)  # no JSON
    header = lines.index(next(line for line in lines if line.split()[:2] == ["frame", "source"]))
    frames = lines[header + 1 : header + 6]
    assert [line.split()[1] for line in frames] == [f"img_000{i}.jpg" for i in range(5)]
    good = [LINE.match(line) for line in frames if "error:" not in line]
    assert len(good) == 4 and all(good)
    assert "img_0002.jpg  error: cannot read image" in frames[2]
    assert any(line.split()[:4] == ["class", "frames", "share", "mean"] for line in lines)
    assert any(line.startswith("(unreadable)") and line.split()[1] == "1" for line in lines)
    assert any(line.split()[:2] == ["stage", "mean"] for line in lines)
    assert "\r" not in raw.replace("\r\n", "\n")  # text mode draws no progress line


def test_jsonl_on_a_terminal_keeps_progress_out_of_the_records(setup) -> None:
    bundle, images = setup
    code, raw = _on_terminal(["run", str(bundle), str(images), "--format", "jsonl"])
    assert code == 0, raw
    assert "\x1b[K" in raw  # a progress line was drawn
    lines = _render(raw)
    records = [line for line in lines if not line.startswith("vlm-edge:")]
    records = [line for line in records if not re.match(r"\d+/5 frames", line)]
    parsed = [json.loads(line) for line in records]  # a progress remnant would break one
    assert [record["index"] for record in parsed] == list(range(5))


def test_pipes_get_json_lines_and_no_progress(setup) -> None:
    bundle, images = setup
    done = subprocess.run(
        [sys.executable, "-m", "vlm_export.runtime", "run", str(bundle), str(images)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["index"] for r in records] == list(range(5)) and "error" in records[2]
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    text = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlm_export.runtime",
            "run",
            str(bundle),
            str(images),
            "--format",
            "text",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert text.stdout.splitlines()[0].split()[:2] == ["frame", "source"]


def test_out_file_is_json_while_the_terminal_shows_progress(setup, tmp_path) -> None:
    bundle, images = setup
    out = tmp_path / "o.jsonl"
    code, raw = _on_terminal(["run", str(bundle), str(images), "--out", str(out)])
    assert code == 0, raw
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == list(range(5))
    assert "{" not in raw


def test_no_line_lands_inside_the_progress_line(setup, tmp_path) -> None:
    """``run --out FILE --state S`` on a terminal: the progress line shows while frames run, and
    every line printed after it (state saved, the summary) starts on a line of its own."""
    bundle, images = setup
    out, state = tmp_path / "o.jsonl", tmp_path / "s.npz"
    code, raw = _on_terminal(
        ["run", str(bundle), str(images), "--out", str(out), "--state", str(state)]
    )
    assert code == 0, raw
    assert re.search(r"\r\d/5 frames, ", raw), raw  # the progress line was drawn
    lines = _render(raw)
    saved = [line for line in lines if "state saved" in line]
    assert len(saved) == 1 and saved[0].startswith("vlm-edge: state saved"), lines
    assert all(line.startswith("vlm-edge: ") for line in lines if "vlm-edge:" in line), lines
    assert any(line.startswith("vlm-edge: 5 frames, 1 unreadable in ") for line in lines), lines


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_short_names() -> None:
    assert short_name("photos/cat.jpg") == "cat.jpg"
    assert short_name("camera:0") == "camera:0"
    assert short_name("rtsp://host/live/stream1") == "stream1"
    assert short_name("nvarguscamerasrc ! video/x-raw,format=BGR ! appsink") == "gstreamer"


def test_choose_format() -> None:
    assert choose_format("auto", None, _Tty()) == "text"
    assert choose_format("auto", "o.jsonl", _Tty()) == "jsonl"
    assert choose_format("auto", None, io.StringIO()) == "jsonl"
    assert choose_format("text", None, io.StringIO()) == "text"
    assert choose_format("jsonl", None, _Tty()) == "jsonl"


def test_text_lines_show_timestamps_and_cut_long_names() -> None:
    out = io.StringIO()
    writer = TextLines(out, ["clip.mp4@0000.000s"], ["cat", "dog"])
    scores = np.array([0.25, 0.75], np.float32)
    result = FrameResult(3, "v/clip.mp4", 1, "dog", "animals", [], scores, scores, {"total": 2.5})
    writer.write({"index": 3, "source": "v/clip.mp4", "timestamp_ms": 1533.3}, result)
    long_name = "x" * 60 + ".jpg"
    writer.write({"index": 4, "source": long_name, "error": "cannot read image"}, None)
    writer.finish()
    lines = out.getvalue().splitlines()
    assert lines[1].split() == ["3", "clip.mp4@1.533s", "dog", "0.750", "2.5"]
    assert lines[2].split()[1] == "…" + long_name[-(len("clip.mp4@0000.000s") - 1) :]
    assert lines[5].split() == ["dog", "1", "50.0%", "0.750"]
