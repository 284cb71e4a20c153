"""Frame sources: folders, globs, single files, video files, cameras, and their errors."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from fakebundle import write_images

from vlm_export.core.errors import UserError
from vlm_export.runtime.io.sources import (
    ImageFiles,
    SourceError,
    VideoSource,
    open_source,
)

cv2 = pytest.importorskip("cv2")


def _video(path: Path, frames: int, size: tuple[int, int] = (64, 48)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    assert writer.isOpened()
    for index in range(frames):
        frame = np.zeros((size[1], size[0], 3), np.uint8)
        frame[:, :, index % 3] = 40 * index
        writer.write(frame)
    writer.release()
    return path


def test_folder_sorted_images_only(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 3, suffix=".png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.jpg").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "B.JPG").write_bytes(b"x")  # upper-case extension counts
    source = open_source(str(tmp_path))
    assert isinstance(source, ImageFiles) and source.total == 4
    frames = list(source)
    assert [f.data for f in frames] == sorted([*paths, tmp_path / "B.JPG"])
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert frames[1].source == str(frames[1].data)


def test_glob_and_single_file(tmp_path: Path) -> None:
    write_images(tmp_path / "a", 2, suffix=".jpg")
    write_images(tmp_path / "b", 3, seed=1, suffix=".png")
    source = open_source(str(tmp_path / "*" / "*.png"))
    assert source.total == 3 and all(f.data.suffix == ".png" for f in source)
    assert open_source(str(tmp_path / "**" / "*.jpg")).total == 2
    single = open_source(str(tmp_path / "a" / "img_0001.jpg"))
    assert [f.data for f in single] == [tmp_path / "a" / "img_0001.jpg"]


def test_video_file_frames_then_normal_end(tmp_path: Path) -> None:
    path = _video(tmp_path / "clip.avi", 5)
    with open_source(str(path)) as source:
        assert isinstance(source, VideoSource) and source.total == 5
        frames = list(source)
    assert [f.index for f in frames] == list(range(5))
    assert all(f.source == str(path) for f in frames)
    first = frames[0].data
    assert first.dtype == np.uint8 and first.shape == (48, 64, 3)


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="source not found"):
        open_source(str(tmp_path / "nothing.jpg"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(SourceError, match="no images in folder"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="no image files match"):
        open_source(str(tmp_path / "*.png"))
    assert issubclass(SourceError, UserError)


def test_unopenable_video_and_camera(tmp_path: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"definitely not a video")
    with pytest.raises(SourceError, match="cannot open video"):
        open_source(str(broken))
    with pytest.raises(SourceError, match="cannot open camera 97"):
        open_source("97")


def test_missing_opencv_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _video(tmp_path / "clip.avi", 2)
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    with pytest.raises(SourceError, match=r'pip install "\.\[camera\]"'):
        open_source(str(path))


def _video(path, frames: int):
    cv2 = pytest.importorskip("cv2")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    return path


def test_truncated_video_warns_how_far_it_got(tmp_path, caplog) -> None:
    path = _video(tmp_path / "clip.avi", 25)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])  # the header still says 25 frames
    source = open_source(str(path))
    with caplog.at_level(logging.WARNING, logger="vlm_export"):
        frames = list(source)
    [record] = caplog.records
    assert re.search(r"ended after \d+ of 25 frames", record.getMessage())
    assert 0 < len(frames) < 25
    source.close()


def test_whole_video_ends_without_warning(tmp_path, caplog) -> None:
    source = open_source(str(_video(tmp_path / "clip.avi", 6)))
    with caplog.at_level(logging.WARNING, logger="vlm_export"):
        assert len(list(source)) == 6
    source.close()
    assert not caplog.records


def test_camera_that_stops_is_an_error(tmp_path) -> None:
    source = open_source(str(_video(tmp_path / "clip.avi", 4)))
    source.live, source.description = True, "camera 0"  # a camera that delivers 4 frames
    with pytest.raises(SourceError, match="camera 0 stopped delivering frames after 4"):
        list(source)
    source.close()


def test_video_frames_carry_their_position_in_ms(tmp_path) -> None:
    source = open_source(str(_video(tmp_path / "clip.avi", 4)))  # 10 fps
    frames = list(source)
    source.close()
    assert [frame.timestamp_ms for frame in frames] == pytest.approx([0.0, 100.0, 200.0, 300.0])
    assert not source.live


def test_gstreamer_pipelines_need_an_opencv_built_with_it(monkeypatch) -> None:
    from vlm_export.runtime.io import sources

    monkeypatch.setattr(cv2, "getBuildInformation", lambda: "  Video I/O:\n    GStreamer: NO\n")
    with pytest.raises(SourceError, match="this OpenCV is built without GStreamer"):
        open_source("videotestsrc num-buffers=3 ! videoconvert ! appsink")
    info = "  GUI:                           NONE\n    GStreamer:                   YES (1.20.3)\n"
    monkeypatch.setattr(cv2, "getBuildInformation", lambda: info)
    assert sources.build_feature(cv2, "GStreamer") == "YES (1.20.3)"
    assert sources.build_feature(cv2, "GUI") == "NONE"
    assert sources.build_feature(cv2, "FFMPEG") == "NO"


def test_opencv_and_ffmpeg_log_lines_are_quiet_unless_asked(monkeypatch) -> None:
    """FFmpeg's own lines do not mix into the service's log; a user's setting is kept."""
    from vlm_export.runtime.io import sources

    monkeypatch.delenv("OPENCV_FFMPEG_LOGLEVEL", raising=False)
    monkeypatch.setenv("OPENCV_LOG_LEVEL", "INFO")
    sources.import_cv2()
    assert os.environ["OPENCV_FFMPEG_LOGLEVEL"] == "-8"
    assert os.environ["OPENCV_LOG_LEVEL"] == "INFO"
