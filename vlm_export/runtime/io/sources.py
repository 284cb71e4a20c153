"""Frame sources: an image file, a folder, a glob, a video file, a camera, a stream or a GStreamer
pipeline.

Image sources yield paths (the pipeline decodes them, so an unreadable file becomes one error
record); video and camera sources yield BGR uint8 frames from OpenCV, which is imported only when
such a source is opened (the optional ``camera`` extra), with their timestamp: the video's own
position for files, milliseconds since the first read for live sources (cameras, streams,
GStreamer pipelines), whose frames :mod:`vlm_export.runtime.io.capture` reads on a thread.
"""

from __future__ import annotations

import logging
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import numpy as np

from vlm_export.core.errors import UserError
from vlm_export.core.globbing import GLOB_CHARS, glob_files

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")

log = logging.getLogger(__name__)


class SourceError(UserError):
    """A source that does not exist, holds no images, or cannot be opened."""


@dataclass(frozen=True)
class SourceOptions:
    """How to read a source: every ``stride``-th frame (files, folders, videos), and the size
    and frame rate to ask a camera (an index) for."""

    stride: int = 1
    camera_size: tuple[int, int] | None = None
    camera_fps: float | None = None

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise UserError(f"--stride must be at least 1, got {self.stride}")
        if self.camera_size is not None and min(self.camera_size) < 1:
            raise UserError(f"--camera-size must be positive, got {self.camera_size}")
        if self.camera_fps is not None and not 0 < self.camera_fps <= 1000:
            raise UserError(f"--camera-fps must be above 0 and at most 1000, got {self.camera_fps}")


def parse_size(text: str) -> tuple[int, int]:
    """``"1280x720"`` -> (1280, 720); UserError for anything else."""
    found = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", text)
    if not found or min(int(found[1]), int(found[2])) < 1:
        raise UserError(f"a size is WIDTHxHEIGHT, e.g. 1280x720, got {text[:40]!r}")
    return int(found[1]), int(found[2])


@dataclass(frozen=True)
class Frame:
    """One frame: its index in the source, a source id (path), and a path or a BGR array.

    ``timestamp_ms``: a video frame's position, a live frame's capture time since the first read
    (``time.monotonic``); None for image files.
    """

    index: int
    source: str
    data: Path | np.ndarray
    timestamp_ms: float | None = None


class Source(ABC):
    """An iterable of frames; ``total`` is the frame count when known (for progress)."""

    description: str = ""
    total: int | None = None
    #: frames arrive in real time whether read or not (cameras, streams): read the newest
    live: bool = False
    fps: float | None = None  # frames per second the source plays at, when it says

    @abstractmethod
    def __iter__(self) -> Iterator[Frame]:
        """Yield frames in order."""

    @abstractmethod
    def close(self) -> None:
        """Release the source (camera, file handle)."""

    def __enter__(self) -> Source:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def is_image_file(path: Path) -> bool:
    """True for a regular file with an image extension (case-insensitive)."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


class ImageFiles(Source):
    """Image files in a fixed order; with ``stride`` N every N-th of them (indexes kept)."""

    def __init__(self, paths: list[Path], description: str, stride: int = 1) -> None:
        self.paths = paths[::stride]
        self.stride = stride
        self.total = len(self.paths)
        self.description = description if stride == 1 else f"{description}, every {stride}th"

    def __iter__(self) -> Iterator[Frame]:
        for position, path in enumerate(self.paths):
            yield Frame(position * self.stride, str(path), path)

    def close(self) -> None:
        """Nothing to release: files are opened one at a time by the pipeline."""


#: OpenCV's and FFmpeg's own logging, unless the user set it: the sources report their failures
#: in one line each, so FFmpeg's lines (a stream that stutters, a codec warning) would only be
#: mixed into the service's log
QUIET_OPENCV = {"OPENCV_FFMPEG_LOGLEVEL": "-8", "OPENCV_LOG_LEVEL": "ERROR"}


def import_cv2() -> ModuleType:
    """Import OpenCV (its own and FFmpeg's log lines quiet unless the environment asks for them)
    or raise a SourceError that names the extra to install."""
    for name, value in QUIET_OPENCV.items():
        os.environ.setdefault(name, value)
    try:
        import cv2
    except ImportError:
        raise SourceError('video and camera sources need OpenCV: pip install ".[camera]"') from None
    return cv2


def build_feature(cv2: ModuleType, name: str) -> str:
    """What ``cv2.getBuildInformation()`` says of a feature ("GUI", "GStreamer"), e.g. "NO"."""
    found = re.search(
        rf"^[ \t]*{re.escape(name)}:[ \t]*(\S.*?)[ \t]*$", cv2.getBuildInformation(), re.M
    )
    return found.group(1) if found else "NO"


def is_gstreamer(spec: str) -> bool:
    """A GStreamer pipeline description (``... ! appsink``) rather than a file or URL."""
    return "!" in spec


class VideoSource(Source):
    """Frames of a video file, a camera (integer index), a stream URL or a GStreamer pipeline."""

    def __init__(self, target: str | int, options: SourceOptions | None = None) -> None:
        cv2 = import_cv2()
        options = options or SourceOptions()
        self.target = target
        self.is_camera = isinstance(target, int)
        gstreamer = not self.is_camera and is_gstreamer(str(target))
        if self.is_camera:
            self.description = f"camera {target}"
        elif gstreamer:
            self.description = f"GStreamer pipeline {target}"
        else:
            self.description = f"stream {target}" if "://" in str(target) else f"video {target}"
        if gstreamer and not build_feature(cv2, "GStreamer").upper().startswith("YES"):
            raise SourceError(
                "this OpenCV is built without GStreamer (cv2.getBuildInformation()); on Jetson "
                "use JetPack's python3-opencv, elsewhere an OpenCV built with GStreamer"
            )
        self.live = self.is_camera or gstreamer or "://" in str(target)
        _check_options(options, self.description, self.is_camera, self.live)
        self.stride = options.stride
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # our error says it
        try:
            if gstreamer:
                self._capture = cv2.VideoCapture(target, cv2.CAP_GSTREAMER)
            else:
                self._capture = cv2.VideoCapture(target)
        finally:
            cv2.utils.logging.setLogLevel(level)
        if not self._capture.isOpened():
            self._capture.release()
            raise SourceError(f"cannot open {self.description}")
        if self.is_camera:
            _ask_camera(cv2, self._capture, options, self.description)
        count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT))
        self.total = count if count > 0 and not self.live else None
        self.fps = float(self._capture.get(cv2.CAP_PROP_FPS)) or None
        self.source_id = f"camera:{target}" if self.is_camera else str(target)
        self._position = cv2.CAP_PROP_POS_MSEC

    def __iter__(self) -> Iterator[Frame]:
        index, start = 0, time.monotonic()
        while True:
            ok, frame = self._capture.read()
            if self.live:
                stamp = (time.monotonic() - start) * 1000.0
            else:
                stamp = float(self._capture.get(self._position))
            if not ok or frame is None:
                self._ended(index)
                return
            yield Frame(index, self.source_id, frame, round(stamp, 3))
            index += 1
            for _ in range(self.stride - 1):  # skipped frames are grabbed, never decoded
                if not self._capture.grab():
                    self._ended(index)
                    return
                index += 1

    def _ended(self, frames: int) -> None:
        """A camera or stream that stops delivering frames is an error; a video file that ends
        short of its frame count (truncated, or undecodable frames) logs a warning."""
        if self.live:
            raise SourceError(f"{self.description} stopped delivering frames after {frames}")
        if self.total is not None and frames < self.total:
            log.warning(
                "%s ended after %d of %d frames (truncated, or frames that cannot be decoded)",
                self.description,
                frames,
                self.total,
            )

    def close(self) -> None:
        """Release the capture device or file."""
        self._capture.release()


def _check_options(options: SourceOptions, description: str, camera: bool, live: bool) -> None:
    if options.stride > 1 and live:
        raise SourceError(
            f"--stride is for videos, folders and globs; {description} is read newest-frame "
            "first already (stale frames are dropped)"
        )
    if not camera and (options.camera_size or options.camera_fps):
        raise SourceError(
            f"--camera-size and --camera-fps are for camera indexes, not {description} (for a "
            "GStreamer pipeline, put the size and rate in its caps)"
        )


def _ask_camera(cv2: ModuleType, capture: Any, options: SourceOptions, description: str) -> None:
    """Ask the camera for the size and frame rate; a warning when it gives something else."""
    asked = []
    if options.camera_size is not None:
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, options.camera_size[0])
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, options.camera_size[1])
        got = (
            int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
        if got != options.camera_size:
            asked.append(
                f"{got[0]}x{got[1]} instead of {options.camera_size[0]}x{options.camera_size[1]}"
            )
    if options.camera_fps is not None:
        capture.set(cv2.CAP_PROP_FPS, options.camera_fps)
        got_fps = float(capture.get(cv2.CAP_PROP_FPS))
        if abs(got_fps - options.camera_fps) > 0.5:
            asked.append(f"{got_fps:g} fps instead of {options.camera_fps:g}")
    if asked:
        log.warning("%s delivers %s (what it supports)", description, " and ".join(asked))


def _image_named(path: Path) -> bool:
    """An image extension on anything but a folder: regular files, and the links, FIFOs and
    devices that the pipeline then reports as an error record each (never opening them)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_dir()


def _folder(path: Path, stride: int) -> ImageFiles:
    try:
        entries = list(path.iterdir())
    except OSError as exc:
        raise SourceError(f"cannot list folder {path}: {exc.strerror or exc}") from None
    paths = sorted(p for p in entries if not p.name.startswith(".") and _image_named(p))
    if not paths:
        raise SourceError(f"no images in folder {path} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return ImageFiles(paths, f"folder {path} ({len(paths)} images)", stride)


def _glob(pattern: str, stride: int) -> ImageFiles:
    """Files matching ``pattern`` (``**`` recursive), each real file once under its shortest
    name; links that point to the same file are told apart by their real path."""
    found = glob_files(pattern)
    candidates = [path for path in found if _image_named(path)]
    by_real: dict[str, Path] = {}
    for path in sorted(candidates, key=lambda p: (len(p.parts), p)):
        by_real.setdefault(os.path.realpath(path), path)
    paths = sorted(by_real.values())
    if not paths:
        raise SourceError(f"no image files match {pattern}")
    repeats = len(candidates) - len(paths)
    note = f", {repeats} repeated through symbolic links skipped" if repeats else ""
    return ImageFiles(paths, f"{pattern} ({len(paths)} images{note})", stride)


#: the largest camera index OpenCV takes (a C int)
MAX_CAMERA_INDEX = 2**31 - 1


def open_source(spec: str, options: SourceOptions | None = None) -> Source:
    """Open SOURCE as given on the command line, read as ``options`` say.

    An existing folder (its images, sorted by name), an existing file (a video by extension,
    otherwise an image), a glob pattern, a camera index (``0``), a stream URL (``rtsp://...``) or
    a GStreamer pipeline (``nvarguscamerasrc ! ... ! appsink``: anything with a ``!``).
    """
    options = options or SourceOptions()
    if is_gstreamer(spec):
        return VideoSource(spec, options)
    path = Path(spec).expanduser()
    if path.is_dir():
        _check_options(options, f"folder {path}", camera=False, live=False)
        return _folder(path, options.stride)
    if path.is_file():
        if path.suffix.lower() in VIDEO_EXTENSIONS:
            return VideoSource(str(path), options)
        _check_options(options, f"image {path}", camera=False, live=False)
        return ImageFiles([path], f"image {path}")
    if path.is_symlink() or path.exists():  # dangling link, link loop, FIFO, device: one record
        return ImageFiles([path], f"image {path}")
    if spec.isascii() and spec.isdigit():
        if int(spec) > MAX_CAMERA_INDEX:
            raise SourceError(
                f"camera index {spec[:20]}{'...' if len(spec) > 20 else ''} is out of range "
                f"(0 to {MAX_CAMERA_INDEX})"
            )
        return VideoSource(int(spec), options)
    if "://" in spec:
        return VideoSource(spec, options)
    if any(char in spec for char in GLOB_CHARS):
        _check_options(options, spec, camera=False, live=False)
        return _glob(spec, options.stride)
    raise SourceError(f"source not found: {spec}")
