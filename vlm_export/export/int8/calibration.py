"""The images an INT8 graph is calibrated and gated on: read from a folder, preprocessed as the
device will, some held out of calibration, and fed to ONNX Runtime's calibration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import ANCHORS_INPUT, ANCHORS_VALID_INPUT, IMAGE_INPUT
from vlm_export.runtime.io.preprocess import ImageError, Preprocessor, load_image
from vlm_export.runtime.io.sources import is_image_file

HELD_OUT_EVERY = 5  # without --held-out: every 5th calibration image is held out
log = logging.getLogger(__name__)


class CalibrationError(UserError):
    """The calibration images are missing, empty or unreadable."""


def image_paths(folder: str | Path, role: str = "calibration") -> list[Path]:
    """The image files of ``folder`` (sorted); CalibrationError when none or unreadable, its
    message naming the folder's ``role`` (calibration, held-out)."""
    folder = Path(folder)
    if not folder.exists():
        raise CalibrationError(f"{role} folder not found: {folder}")
    if not folder.is_dir():
        raise CalibrationError(f"{role} folder {folder} is a file, not a folder of images")
    try:
        paths = sorted(
            p for p in folder.iterdir() if not p.name.startswith(".") and is_image_file(p)
        )
    except OSError as exc:
        raise CalibrationError(f"cannot read {role} folder {folder}: {exc}") from None
    if not paths:
        raise CalibrationError(f"no images in {role} folder {folder}")
    return paths


def preprocess_all(paths: Sequence[Path], preprocess: Preprocessor) -> list[np.ndarray]:
    """Each readable image as a [1, 3, H, W] array; unreadable ones are skipped with a warning."""
    arrays, skipped = [], []
    for path in paths:
        try:
            arrays.append(preprocess(load_image(path))[None].astype(np.float32))
        except ImageError as exc:
            skipped.append(str(exc))
    if skipped and arrays:
        log.warning("%d calibration image(s) skipped: %s", len(skipped), skipped[0])
    if not arrays:
        raise CalibrationError(f"none of the {len(paths)} calibration images can be read")
    return arrays


def split_held_out(images: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every HELD_OUT_EVERY-th image held out (at least one kept for calibration)."""
    if len(images) < 2:
        return images, []
    held = [img for i, img in enumerate(images) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    kept = [img for i, img in enumerate(images) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return kept, held


def engine_feeds(manifest: dict[str, Any], image: np.ndarray) -> dict[str, np.ndarray]:
    """The engine inputs for one image: anchors zero and invalid for a condensing engine."""
    feeds = {IMAGE_INPUT: image}
    for record in manifest["engine"]["inputs"]:
        if record["name"] in (ANCHORS_INPUT, ANCHORS_VALID_INPUT):
            feeds[record["name"]] = np.zeros(record["shape"], np.float32)
    return feeds


def calibration_reader(
    manifest: dict[str, Any],
    images: list[np.ndarray],
    on_image: Callable[[int, int], None] | None = None,
) -> Any:
    """An onnxruntime CalibrationDataReader over ``images`` (imports onnxruntime only now);
    ``on_image(done, total)`` after each image handed out."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Feeds ``images[start:end]``; ``set_range`` lets ONNX Runtime calibrate in strides."""

        def __init__(self) -> None:
            self._given = 0
            self.set_range(0, len(images))

        def __len__(self) -> int:
            return len(images)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._feeds: Iterator[dict[str, np.ndarray]] = iter(
                [engine_feeds(manifest, image) for image in images[start_index:end_index]]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(self._feeds, None)
            if feed is not None and on_image is not None:
                self._given += 1
                on_image(min(self._given, len(images)), len(images))
            return feed

    return Reader()
