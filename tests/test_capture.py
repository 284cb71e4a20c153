"""The capture thread hands over the newest frame; ``vlm-edge run`` uses it on live sources.

The newest-frame semantics are checked step by step with a scripted source: the test decides
when frames arrive and waits until the capture thread has taken them, so nothing depends on
timing.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle, write_images

from vlm_export.runtime import cli
from vlm_export.runtime.commands import run as run_command
from vlm_export.runtime.io.capture import NewestFrame
from vlm_export.runtime.io.sources import Frame, Source, SourceError

END = None
FAIL = "fail"


class Scripted(Source):
    """A live source whose frames arrive when the test says (batches put on ``batches``)."""

    live = True
    description = "scripted camera"

    def __init__(self) -> None:
        self.batches: queue.Queue[int | str | None] = queue.Queue()
        self.idle: queue.Queue[int] = queue.Queue()  # the reader took everything so far
        self.closed = False

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        while True:
            self.idle.put(index)
            batch = self.batches.get(timeout=10)
            if batch is END:
                return
            if batch == FAIL:
                raise SourceError(f"{self.description} stopped delivering frames after {index}")
            for _ in range(int(batch)):
                yield Frame(index, "camera:9", np.full((4, 4, 3), index, np.uint8), index * 33.3)
                index += 1

    def close(self) -> None:
        self.closed = True


def _arrive(source: Scripted, count: int | str | None) -> None:
    """Let ``count`` frames arrive and wait until the capture thread has taken them all."""
    source.batches.put(count)
    source.idle.get(timeout=10)


def test_the_consumer_gets_the_newest_frame_and_drops_are_counted() -> None:
    source = Scripted()
    capture = NewestFrame(source)
    capture.start()
    source.idle.get(timeout=10)  # the reader waits for the first frame
    frames = iter(capture)
    _arrive(source, 1)
    assert next(frames).index == 0 and capture.dropped == 0
    _arrive(source, 4)  # frames 1-4 while the consumer was busy: 1, 2, 3 are stale
    first = next(frames)
    assert (first.index, first.timestamp_ms, capture.dropped) == (4, 4 * 33.3, 3)
    assert int(first.data[0, 0, 0]) == 4
    _arrive(source, 1)
    assert next(frames).index == 5 and capture.dropped == 3
    source.batches.put(END)
    assert list(frames) == []
    capture.close()
    assert source.closed


def test_the_last_frame_then_the_source_error_reach_the_consumer() -> None:
    source = Scripted()
    capture = NewestFrame(source)
    capture.start()
    source.idle.get(timeout=10)
    _arrive(source, 2)
    source.batches.put(FAIL)
    frames = iter(capture)
    assert next(frames).index == 1
    with pytest.raises(SourceError, match="stopped delivering frames after 2"):
        next(frames)
    capture.close()
    assert capture.dropped == 1 and source.closed


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("capture") / "bundle", method="tca")


class Burst(Source):
    """A live source delivering ``count`` frames as fast as it can, then stopping cleanly."""

    live = True
    description = "burst camera"

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self) -> Iterator[Frame]:
        rng = np.random.default_rng(0)
        for index in range(self.count):
            yield Frame(index, "camera:9", rng.integers(0, 256, (40, 40, 3), np.uint8), index)

    def close(self) -> None:
        pass


def test_vlm_edge_run_reads_live_sources_on_the_capture_thread(
    bundle_dir, tmp_path, monkeypatch, capsys
) -> None:
    opened: list[NewestFrame] = []
    original = NewestFrame.__init__

    def remember(self: NewestFrame, source: Source) -> None:
        original(self, source)
        opened.append(self)

    monkeypatch.setattr(NewestFrame, "__init__", remember)
    monkeypatch.setattr(run_command, "open_source", lambda spec, options=None: Burst(40))
    out = tmp_path / "o.jsonl"
    assert cli.main(["run", str(bundle_dir), "9", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    err = capsys.readouterr().err
    [capture] = opened
    assert len(records) + capture.dropped == 40
    indices = [r["index"] for r in records]
    assert indices == sorted(indices) and indices[-1] == 39  # in order, the newest last
    assert all(r["timestamp_ms"] == r["index"] for r in records)
    said = re.search(r"(\d+) stale frames dropped", err)
    assert (int(said.group(1)) == capture.dropped) if said else capture.dropped == 0


def test_video_files_keep_every_frame_with_its_timestamp(bundle_dir, tmp_path) -> None:
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 20, (48, 40))
    for index in range(6):
        writer.write(np.full((40, 48, 3), 30 * index, np.uint8))
    writer.release()
    out = tmp_path / "o.jsonl"
    assert cli.main(["run", str(bundle_dir), str(path), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(6))
    assert [r["timestamp_ms"] for r in records] == pytest.approx([50.0 * i for i in range(6)])
    assert list(records[0])[:3] == ["index", "timestamp_ms", "source"]


def test_show_on_headless_opencv_is_one_line_before_the_run(bundle_dir, tmp_path, capsys) -> None:
    cv2 = pytest.importorskip("cv2")
    from vlm_export.runtime.io.sources import build_feature

    if build_feature(cv2, "GUI").upper() != "NONE":
        pytest.skip("this OpenCV has a GUI")
    [image] = write_images(tmp_path, 1)
    assert cli.main(["run", str(bundle_dir), str(image), "--show"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = [x for x in captured.err.splitlines() if "error" in x]
    assert line.startswith("vlm-edge: error: --show needs OpenCV with a GUI")
    assert "pip install opencv-python" in line


def test_the_camera_example_runs_and_keeps_its_state(bundle_dir, tmp_path) -> None:
    cv2 = pytest.importorskip("cv2")
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 20, (48, 40))
    for index in range(5):
        writer.write(np.full((40, 48, 3), 40 * index, np.uint8))
    writer.release()
    state = tmp_path / "state.npz"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [
            sys.executable,
            str(root / "examples" / "camera_pipeline.py"),
            str(bundle_dir),
            str(video),
            "--state",
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(root)),
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [int(line.split()[0]) for line in lines[:-1]] == list(range(5))
    assert lines[-1].startswith("5 frames in") and state.is_file()
