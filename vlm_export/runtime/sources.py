"""Frame sources: an image file, a folder, a glob, a video file, a camera index or a stream URL.

Image sources yield paths (the pipeline decodes them, so an unreadable file becomes one error
record); video and camera sources yield BGR uint8 frames from OpenCV, which is imported only when
such a source is opened (the optional ``camera`` extra).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType

import numpy as np

from vlm_export.core.errors import UserError

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
GLOB_CHARS = "*?["


class SourceWarning(UserWarning):
    """A source that ended early but gave what it could (a truncated video)."""


class SourceError(UserError):
    """A source that does not exist, holds no images, or cannot be opened."""


@dataclass(frozen=True)
class Frame:
    """One frame: its index in the source, a source id (path), and a path or a BGR array."""

    index: int
    source: str
    data: Path | np.ndarray


class Source(ABC):
    """An iterable of frames; ``total`` is the frame count when known (for progress)."""

    description: str = ""
    total: int | None = None

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
    """Image files in a fixed order."""

    def __init__(self, paths: list[Path], description: str) -> None:
        self.paths = paths
        self.total = len(paths)
        self.description = description

    def __iter__(self) -> Iterator[Frame]:
        for index, path in enumerate(self.paths):
            yield Frame(index, str(path), path)

    def close(self) -> None:
        """Nothing to release: files are opened one at a time by the pipeline."""


def import_cv2() -> ModuleType:
    """Import OpenCV or raise a SourceError that names the extra to install."""
    try:
        import cv2
    except ImportError:
        raise SourceError(
            "video and camera sources need OpenCV: pip install 'vlm-export[camera]'"
        ) from None
    return cv2


class VideoSource(Source):
    """Frames of a video file, a camera (integer index) or a stream URL, read with OpenCV."""

    def __init__(self, target: str | int) -> None:
        cv2 = import_cv2()
        self.target = target
        self.is_camera = isinstance(target, int)
        if self.is_camera:
            self.description = f"camera {target}"
        else:
            self.description = f"stream {target}" if "://" in str(target) else f"video {target}"
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # our error says it
        try:
            self._capture = cv2.VideoCapture(target)
        finally:
            cv2.utils.logging.setLogLevel(level)
        if not self._capture.isOpened():
            self._capture.release()
            raise SourceError(f"cannot open {self.description}")
        count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT))
        self.total = count if count > 0 and not self.is_camera else None
        self._source_id = f"camera:{target}" if self.is_camera else str(target)

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        while True:
            ok, frame = self._capture.read()
            if not ok or frame is None:
                self._ended(index)
                return
            yield Frame(index, self._source_id, frame)
            index += 1

    def _ended(self, frames: int) -> None:
        """A camera or stream that stops delivering frames is an error; a video file that ends
        short of its frame count (truncated, or undecodable frames) is a warning."""
        if self.is_camera or "://" in str(self.target):
            raise SourceError(f"{self.description} stopped delivering frames after {frames}")
        if self.total is not None and frames < self.total:
            warnings.warn(
                f"{self.description} ended after {frames} of {self.total} frames "
                "(truncated, or frames that cannot be decoded)",
                SourceWarning,
                stacklevel=2,
            )

    def close(self) -> None:
        """Release the capture device or file."""
        self._capture.release()


def _image_named(path: Path) -> bool:
    """An image extension on anything but a folder: regular files, and the links, FIFOs and
    devices that the pipeline then reports as an error record each (never opening them)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_dir()


def _folder(path: Path) -> ImageFiles:
    try:
        entries = list(path.iterdir())
    except OSError as exc:
        raise SourceError(f"cannot list folder {path}: {exc.strerror or exc}") from None
    paths = sorted(p for p in entries if not p.name.startswith(".") and _image_named(p))
    if not paths:
        raise SourceError(f"no images in folder {path} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return ImageFiles(paths, f"folder {path} ({len(paths)} images)")


def _segments_match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """glob's rules for one relative path: ``**`` is any number of folders, other wildcards stay
    inside one name, and a wildcard does not match a leading dot."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        if _segments_match(parts, pattern[1:]):
            return True
        return bool(parts) and not parts[0].startswith(".") and _segments_match(parts[1:], pattern)
    if not parts or (parts[0].startswith(".") and not pattern[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], pattern[0]) and _segments_match(parts[1:], pattern[1:])


def _walk_glob(pattern: str) -> list[Path]:
    """A ``**`` pattern's matches, each folder visited once by its real path (``glob.glob``
    follows every symbolic link again: two links to ``.`` make its walk exponential)."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
    root, rest = Path(*parts[:fixed]) if fixed else Path(), parts[fixed:]
    found, visited = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders.clear()
            continue
        visited.add(real)
        relative = Path(folder).relative_to(root).parts
        found += [Path(folder, name) for name in names if _segments_match((*relative, name), rest)]
    return found


def _glob(pattern: str) -> ImageFiles:
    """Files matching ``pattern`` (``**`` recursive), each real file once under its shortest
    name; links that point to the same file are told apart by their real path."""
    recursive = "**" in pattern
    found = _walk_glob(pattern) if recursive else [Path(name) for name in glob.glob(pattern)]
    candidates = [path for path in found if _image_named(path)]
    by_real: dict[str, Path] = {}
    for path in sorted(candidates, key=lambda p: (len(p.parts), p)):
        by_real.setdefault(os.path.realpath(path), path)
    paths = sorted(by_real.values())
    if not paths:
        raise SourceError(f"no image files match {pattern}")
    repeats = len(candidates) - len(paths)
    note = f", {repeats} repeated through symbolic links skipped" if repeats else ""
    return ImageFiles(paths, f"{pattern} ({len(paths)} images{note})")


def open_source(spec: str) -> Source:
    """Open SOURCE as given on the command line.

    An existing folder (its images, sorted by name), an existing file (a video by extension,
    otherwise an image), a glob pattern, a camera index (``0``) or a stream URL (``rtsp://...``).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder(path)
    if path.is_file():
        if path.suffix.lower() in VIDEO_EXTENSIONS:
            return VideoSource(str(path))
        return ImageFiles([path], f"image {path}")
    if path.is_symlink() or path.exists():  # dangling link, link loop, FIFO, device: one record
        return ImageFiles([path], f"image {path}")
    if spec.isdigit():
        return VideoSource(int(spec))
    if "://" in spec:
        return VideoSource(spec)
    if any(char in spec for char in GLOB_CHARS):
        return _glob(spec)
    raise SourceError(f"source not found: {spec}")
