"""One frame drawn with what the pipeline decided: the fate overlay (optional), the outline of
the part the engine saw, and the label / score / fps banner (``run --save-annotated``, the
service's annotated frames)."""

from __future__ import annotations

from PIL import Image

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import FATE_OUTPUT, TOKEN_FATE
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.draw.annotate import annotate_frame
from vlm_export.runtime.draw.fate import (
    engine_view_box,
    fate_legend,
    fate_overlay,
    final_fate,
    outline_view,
    patch_grid,
)
from vlm_export.runtime.io.preprocess import Preprocessor
from vlm_export.runtime.result import FrameResult


class FrameDrawer:
    """Draws one frame: the fate overlay (optional), then the label / score / fps banner."""

    def __init__(self, bundle: Bundle, with_fate: bool, crop: str | None = None) -> None:
        if with_fate and FATE_OUTPUT not in bundle.engine_io("outputs"):
            raise UserError(
                f"--annotate-fate needs a condensing bundle (method tca or tca+rail); "
                f"{bundle.path} is a full tower ({bundle.method})"
            )
        self.with_fate = with_fate
        self.grid = patch_grid(bundle.manifest)
        self.engine_size = tuple(int(v) for v in bundle.manifest["preprocess"]["size"])
        self.resize_mode = Preprocessor.from_manifest(bundle.manifest, crop).resize_mode

    def __call__(self, image: Image.Image, result: FrameResult | None, fps: float) -> Image.Image:
        """``image`` with what ``result`` decided (None: the frame failed) drawn on it, and the
        outline of the part the engine saw where it is not the whole frame."""
        if result is None:
            return annotate_frame(image, "error: frame not classified", None, fps)
        box = engine_view_box(image.size, self.engine_size, self.resize_mode)
        if self.with_fate and result.token_fate is not None:
            image = fate_overlay(image, final_fate(result.token_fate), self.grid, box)
            image = _with_legend(image)
        image = outline_view(image, box)
        return annotate_frame(image, result.class_name, result.topk[0][2], fps)


def _with_legend(image: Image.Image) -> Image.Image:
    """The fate legend in the bottom-left corner, where the frame is wide enough for it."""
    size = max(10, image.height // 36)
    legend = fate_legend(size, [TOKEN_FATE[name] for name in ("kept", "merged", "pruned")])
    margin = size // 2
    if legend.width + 4 * margin > image.width or legend.height * 6 > image.height:
        return image
    image = image.copy()
    framed = Image.new("RGB", (legend.width + 2 * margin, legend.height + 2 * margin), "white")
    framed.paste(legend, (margin, margin))
    image.paste(framed, (margin, image.height - framed.height - margin))
    return image
