"""The patch grid coloured by token fate, and its legend.

``token_fate`` holds, per original patch and reduction block, one of the ``TOKEN_FATE`` codes of
``vlm_export.core.manifest``: kept (0), merged into a centre (1), pruned into the fused token (2)
or already gone at an earlier block (-1). Each cell of the grid is tinted with its fate's colour,
except kept patches, which stay as they are; gone ones are darkened.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlm_export.core.manifest import TOKEN_FATE
from vlm_export.runtime.draw.style import INK, Colour, font, stack, text_size

#: code -> (name, RGB colour, opacity of the tint over the image)
FATE_STYLE: dict[int, tuple[str, Colour, float]] = {
    TOKEN_FATE["kept"]: ("kept", (255, 255, 255), 0.0),
    TOKEN_FATE["merged"]: ("merged", (240, 200, 0), 0.6),
    TOKEN_FATE["pruned"]: ("pruned", (213, 60, 0), 0.6),
    TOKEN_FATE["gone"]: ("already gone", (45, 45, 45), 0.8),
}
GRID_LINE = (255, 255, 255, 70)

Box = tuple[float, float, float, float]


def patch_grid(manifest: dict[str, Any]) -> tuple[int, int]:
    """(rows, columns) of the engine's patch grid: the preprocess size over the patch size."""
    height, width = (int(v) for v in manifest["preprocess"]["size"])
    patch = manifest["model"]["patch_size"]
    patch_h, patch_w = (int(patch), int(patch)) if np.isscalar(patch) else map(int, patch)
    return height // patch_h, width // patch_w


def final_fate(fate: np.ndarray) -> np.ndarray:
    """[R, P] -> [P]: where each patch left (merged or pruned, at its block), else kept."""
    fate = np.asarray(fate)
    left = (fate == TOKEN_FATE["merged"]) | (fate == TOKEN_FATE["pruned"])
    first = np.argmax(left, axis=0)
    leaving = fate[first, np.arange(fate.shape[1])]
    return np.where(left.any(axis=0), leaving, TOKEN_FATE["kept"]).astype(np.int8)


def fate_counts(fate: np.ndarray) -> dict[str, int]:
    """How many patches have each fate in one block's [P] fate row, by name."""
    fate = np.asarray(fate)
    return {name: int((fate == code).sum()) for code, (name, _, _) in FATE_STYLE.items()}


def engine_view_box(frame_size: tuple[int, int], engine_size: tuple[int, int], mode: str) -> Box:
    """(left, top, right, bottom) of the part of a frame (w, h) that the engine saw (h, w).

    ``shortest``: the centred crop with the engine's aspect ratio; ``longest``: the padded view
    (it extends past the frame); ``squash``: the whole frame.
    """
    width, height = frame_size
    engine_h, engine_w = engine_size
    if mode == "squash":
        return 0.0, 0.0, float(width), float(height)
    ratios = (width / engine_w, height / engine_h)
    scale = min(ratios) if mode == "shortest" else max(ratios)
    view_w, view_h = engine_w * scale, engine_h * scale
    left, top = (width - view_w) / 2, (height - view_h) / 2
    return left, top, left + view_w, top + view_h


#: the dashed outline of the part of a frame the engine saw
OUTLINE_COLOUR: Colour = (255, 214, 0)


def outline_view(image: Image.Image, box: Box, colour: Colour = OUTLINE_COLOUR) -> Image.Image:
    """``image`` with ``box`` (the part the engine saw) outlined, dashed, where it lies inside
    the frame; unchanged when the engine saw the whole frame (letterbox, squash)."""
    left, top, right, bottom = (round(v) for v in box)
    if left <= 0 and top <= 0 and right >= image.width and bottom >= image.height:
        return image
    left, top = max(left, 0), max(top, 0)
    right, bottom = min(right, image.width) - 1, min(bottom, image.height) - 1
    image = image.convert("RGB")  # a copy: the caller's frame is not drawn on
    draw = ImageDraw.Draw(image)
    width = max(2, min(image.size) // 200)
    dash = 6 * width
    for start in range(left, right, 2 * dash):
        for y in (top, bottom):
            draw.line([(start, y), (min(start + dash, right), y)], fill=colour, width=width)
    for start in range(top, bottom, 2 * dash):
        for x in (left, right):
            draw.line([(x, start), (x, min(start + dash, bottom))], fill=colour, width=width)
    return image


def fate_overlay(
    image: Image.Image,
    fate: np.ndarray,
    grid: tuple[int, int],
    box: Box | None = None,
    lines: bool = True,
) -> Image.Image:
    """``image`` (RGB copy) with the [P] fate row tinted cell by cell over ``box`` (default: all).

    Patches are numbered row by row, as the engine's patch tokens are.
    """
    rows, cols = grid
    fate = np.asarray(fate).reshape(-1)
    if fate.size != rows * cols:
        raise ValueError(f"{fate.size} patch fates do not fill a {rows} x {cols} patch grid")
    base = image.convert("RGBA")
    left, top, right, bottom = box or (0.0, 0.0, float(base.width), float(base.height))
    xs = np.rint(np.linspace(left, right, cols + 1)).astype(int)
    ys = np.rint(np.linspace(top, bottom, rows + 1)).astype(int)
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for index, code in enumerate(fate.tolist()):
        _, colour, opacity = FATE_STYLE.get(int(code), FATE_STYLE[TOKEN_FATE["gone"]])
        row, col = divmod(index, cols)
        cell = (xs[col], ys[row], xs[col + 1] - 1, ys[row + 1] - 1)
        if (
            cell[2] >= cell[0] and cell[3] >= cell[1]
        ):  # a frame smaller than the grid has empty cells
            draw.rectangle(cell, fill=(*colour, round(255 * opacity)))
    if lines:
        for x in xs[1:-1]:
            draw.line([(x, ys[0]), (x, ys[-1] - 1)], fill=GRID_LINE)
        for y in ys[1:-1]:
            draw.line([(xs[0], y), (xs[-1] - 1, y)], fill=GRID_LINE)
    return Image.alpha_composite(base, layer).convert("RGB")


def fate_legend(size: int, codes: Sequence[int] | None = None) -> Image.Image:
    """A row of colour swatches with the fate names (all fates, or ``codes``)."""
    face = font(size)
    swatch = size
    parts = []
    for code in codes if codes is not None else FATE_STYLE:
        name, colour, opacity = FATE_STYLE[code]
        name = f"{name} (as is)" if opacity == 0 else name
        width, height = text_size(name, face)
        item = Image.new("RGB", (swatch + size // 2 + width, max(swatch, height)), (255, 255, 255))
        draw = ImageDraw.Draw(item)
        draw.rectangle((0, 0, swatch - 1, swatch - 1), fill=colour, outline=INK)
        draw.text((swatch + size // 2, 0), name, fill=INK, font=face)
        parts.append(item)
    return stack(parts, vertical=False, gap=2 * size)
