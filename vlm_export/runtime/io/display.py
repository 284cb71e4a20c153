"""``--show``: a window with each frame and its label (OpenCV's GUI, checked before the run)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from vlm_export.core.errors import UserError
from vlm_export.runtime.io.sources import Frame, build_feature, import_cv2
from vlm_export.runtime.result import FrameResult

TITLE = "vlm-edge"
QUIT_KEYS = (ord("q"), 27)  # q, Esc
HEADLESS = (
    "--show needs OpenCV with a GUI, and this one is headless (opencv-python-headless, the "
    "[camera] extra's): pip uninstall -y opencv-python-headless && pip install opencv-python"
)


class Window:
    """An OpenCV window; UserError at once where it cannot be shown (headless build, no display)."""

    def __init__(self, title: str = TITLE) -> None:
        self.cv2 = import_cv2()
        if build_feature(self.cv2, "GUI").upper() == "NONE":
            raise UserError(HEADLESS)
        display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        if sys.platform.startswith("linux") and not display:
            raise UserError(
                "--show needs a display, and neither DISPLAY nor WAYLAND_DISPLAY is set"
            )
        try:
            self.cv2.namedWindow(title, self.cv2.WINDOW_NORMAL)
        except self.cv2.error as exc:
            if "not implemented" in str(exc):  # a headless build that does not say so
                raise UserError(HEADLESS) from None
            raise UserError(
                f"--show cannot open a window: {str(exc).strip().splitlines()[-1]}"
            ) from None
        self.title = title

    def show(self, frame: Frame, result: FrameResult | None) -> bool:
        """Draw the frame with its label; False when the user closed the window or pressed q."""
        cv2 = self.cv2
        image = (
            frame.data if isinstance(frame.data, np.ndarray) else cv2.imread(str(Path(frame.data)))
        )
        if image is not None:
            image = image.copy()
            text = f"{result.class_name} {result.score:.2f}" if result else "unreadable"
            cv2.putText(image, text, (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (0, 0, 0), 4)
            cv2.putText(image, text, (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (0, 255, 0), 2)
            cv2.imshow(self.title, image)
        key = cv2.waitKey(1) & 0xFF
        visible = cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) >= 1
        return key not in QUIT_KEYS and visible

    def close(self) -> None:
        """Close the window."""
        self.cv2.destroyWindow(self.title)
