"""``vlm-edge run --save-annotated PATH``: every frame with its label, score and fps drawn on it.

Image sources (a file, a folder, a glob) give a folder of ``<image stem>.annotated.png``, each
written atomically; video and camera sources give one video file (OpenCV, mp4v), written under a
temporary name beside PATH and renamed to PATH when the run ends, so PATH never holds half a
video. With ``--annotate-fate`` the patch grid over the part of the frame the engine saw is
tinted by where each patch left the tower (merged or pruned, at any reduction block) or kept,
with the legend in the bottom-left corner where the frame has room for it.

Outputs never replace an input: an annotated image whose name is one of the run's images gets a
``-2``, ``-3`` suffix, and the source video itself is refused as PATH before any work.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image

from vlm_export.core.atomic import WriteError, atomic_file, check_can_create
from vlm_export.core.errors import UserError
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.commands import status
from vlm_export.runtime.draw.frame import FrameDrawer
from vlm_export.runtime.io.preprocess import ImageError, load_image
from vlm_export.runtime.io.sources import Frame, ImageFiles, Source, import_cv2
from vlm_export.runtime.result import FrameResult

IMAGE_SUFFIX = ".annotated.png"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v")
DEFAULT_FPS = 30.0


class AnnotatedImages:
    """Annotated copies of image files in a folder, one atomic PNG each."""

    def __init__(self, folder: Path, drawer: FrameDrawer, inputs: list[Path]) -> None:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--save-annotated {folder} is a file; for images it is a folder")
        if (
            folder.suffix.lower() in VIDEO_SUFFIXES + (".png", ".jpg", ".jpeg")
            and not folder.exists()
        ):
            raise UserError(
                f"--save-annotated {folder}: image sources give a folder of PNGs, not a "
                f"{folder.suffix} file; give a folder name"
            )
        check_can_create(folder, folder=True)
        self.folder = folder
        self.drawer = drawer
        self._taken: set[str] = set()
        self._inputs = {os.path.realpath(path) for path in inputs}  # never replaced
        self.written = 0

    def add(self, frame: Frame, result: FrameResult | None, fps: float) -> None:
        """Write the annotated image (an unreadable image has nothing to draw on)."""
        if result is None:
            return
        try:
            image = load_image(frame.data)
        except ImageError:  # it changed since the pipeline read it
            return
        stem, number = Path(frame.source).stem, 1
        name = f"{stem}{IMAGE_SUFFIX}"
        while name in self._taken or os.path.realpath(self.folder / name) in self._inputs:
            number += 1
            name = f"{stem}-{number}{IMAGE_SUFFIX}"
        self._taken.add(name)
        with atomic_file(self.folder / name) as handle:
            self.drawer(image.convert("RGB"), result, fps).save(handle, format="PNG")
        self.written += 1

    def close(self, complete: bool) -> None:
        """Say what was written: every image is whole once written, nothing to finish."""
        if complete:
            status(f"{self.written} annotated images written to {self.folder}")


class AnnotatedVideo:
    """An annotated video file, renamed into place when the run ends."""

    def __init__(self, path: Path, drawer: FrameDrawer, fps: float | None) -> None:
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise UserError(
                f"--save-annotated {path}: for a video or camera source give a video file "
                f"name ending in {', '.join(VIDEO_SUFFIXES)}"
            )
        check_can_create(path)
        self.cv2 = import_cv2()
        self.path = path
        self.drawer = drawer
        self.fps = fps if fps and fps > 0 else DEFAULT_FPS
        self._writer: Any = None
        self._tmp: Path | None = None
        self._size: tuple[int, int] = (0, 0)  # the video's frame size
        self._drawn: tuple[int, int] = (0, 0)  # the first drawn frame's size
        self.frames = 0

    def _open(self, width: int, height: int) -> None:
        name = self.path.with_name(
            f".{self.path.stem}.{secrets.token_hex(4)}.partial{self.path.suffix}"
        )
        try:  # O_EXCL: a name of our own; mode 0o666 less the umask, as for any new file
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as exc:
            raise WriteError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._tmp = Path(name)
        fourcc = self.cv2.VideoWriter_fourcc(*"mp4v")
        self._writer = self.cv2.VideoWriter(str(name), fourcc, self.fps, (width, height))
        if not self._writer.isOpened():
            raise WriteError(f"cannot write {self.path}: OpenCV has no mp4v video writer here")
        self._size = (width, height)

    def add(self, frame: Frame, result: FrameResult | None, fps: float) -> None:
        """Draw on the BGR frame and append it to the video."""
        bgr = np.asarray(frame.data)
        image = self.drawer(Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])), result, fps)
        if self._writer is None:  # the drawn frame (picture and banner), padded to even sides
            self._drawn = image.size
            self._open(image.width + image.width % 2, image.height + image.height % 2)
        if image.size != self._drawn:  # a later frame of another size (a stream that changed)
            image = image.resize(self._drawn, Image.Resampling.BILINEAR)
        if image.size != self._size:  # mp4v encodes even sides only: pad, never squash
            canvas = Image.new("RGB", self._size)
            canvas.paste(image)
            image = canvas
        self._writer.write(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]))
        self.frames += 1

    def close(self, complete: bool) -> None:
        """Finish the video and rename it to its path, or (not complete) remove it."""
        if self._writer is not None:
            self._writer.release()
        if self._tmp is None:
            return
        try:
            if complete and self.frames:
                os.replace(self._tmp, self.path)
                status(f"annotated video of {self.frames} frames written to {self.path}")
        except OSError as exc:
            raise WriteError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        finally:  # gone after the rename; otherwise nothing half-written stays
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)


class AnnotatedOutput:
    """Context manager over either output: finished on a normal end, removed on an error."""

    def __init__(
        self, path: str, source: Source, bundle: Bundle, with_fate: bool, crop: str | None = None
    ) -> None:
        drawer = FrameDrawer(bundle, with_fate, crop)
        target = Path(path).expanduser()
        if isinstance(source, ImageFiles):
            self.sink: AnnotatedImages | AnnotatedVideo = AnnotatedImages(
                target, drawer, source.paths
            )
        else:
            video = getattr(source, "target", None)
            if isinstance(video, str) and os.path.realpath(video) == os.path.realpath(target):
                raise UserError(
                    f"--save-annotated {path} is the source video: write it to another path"
                )
            fps = getattr(source, "fps", None)
            stride = getattr(source, "stride", 1)
            if fps and stride > 1:  # every stride-th frame is drawn: it plays at the real pace
                fps = fps / stride
            self.sink = AnnotatedVideo(target, drawer, fps)

    def add(self, frame: Frame, result: FrameResult | None, fps: float) -> None:
        """Draw and write one frame."""
        self.sink.add(frame, result, fps)

    def __enter__(self) -> AnnotatedOutput:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.sink.close(complete=exc_type is None)
