"""The ``vlm-edge explain`` figure: what the engine saw, what each reduction block did with every
patch, and what the engine decided.

Top to bottom: a title (image, decision) and a line of facts (model, GFLOPs); a row of panels,
the engine's view of the image and then the same view with its patch grid coloured by fate at
every reduction block, each with its counts; the legend; the top-k classes as bars.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from vlm_export.runtime.draw.bars import TopK, topk_bars
from vlm_export.runtime.draw.fate import (
    FATE_STYLE,
    Box,
    fate_counts,
    fate_legend,
    fate_overlay,
    outline_view,
)
from vlm_export.runtime.draw.style import MUTED, stack, text_block

PANEL_PX = 320
LEGEND_NOTE = (
    "One cell per image patch; the counts are of patches. A token merged or fused at an earlier "
    "block has no cell (its patches show as already gone)."
)
TOKENS_NOTE = (
    "Tokens in -> out (as `vlm-edge info` prints them) also count the CLS token, the merge "
    "centres and the fused token, so they differ from the patch counts."
)


def upscale(seen: Image.Image, grid: tuple[int, int], target: int = PANEL_PX) -> Image.Image:
    """The engine's view enlarged for reading, to a whole number of pixels per patch cell."""
    rows, cols = grid
    cell = max(1, -(-target // max(rows, cols)))
    return seen.convert("RGB").resize((cols * cell, rows * cell), Image.Resampling.BICUBIC)


def _panel(image: Image.Image, lines: list[str], size: int) -> Image.Image:
    caption = text_block(lines, size, width=image.width)
    return stack([caption, image], vertical=True, gap=size // 2)


def _counts_line(fate_row: np.ndarray) -> str:
    counts = fate_counts(fate_row)
    return ", ".join(f"{n} {name}" for name, n in counts.items() if n)


def explain_figure(
    seen: Image.Image,
    topk: TopK,
    title: str,
    facts: Sequence[str],
    grid: tuple[int, int],
    fate: np.ndarray | None = None,
    blocks: Sequence[int] = (),
    size: int = 16,
    frame: Image.Image | None = None,
    box: Box | None = None,
    tokens: Sequence[tuple[int, int]] = (),
    scores: str = "zero-shot",
) -> Image.Image:
    """The whole figure as one RGB image.

    ``seen`` is the image as the engine saw it (after resize and crop), ``grid`` its patch grid
    (rows, columns), ``fate`` the engine's [R, P] token fate (None for a full tower: then only
    the view and the top-k are drawn) and ``blocks`` the R reduction blocks' numbers. With the
    whole ``frame`` and the ``box`` of it that the engine saw, a first panel shows the frame with
    that part outlined, when the crop left some of it out. ``tokens`` gives each reduction
    block's (tokens in, tokens out), ``scores`` names what the top-k bars are.
    """
    view = upscale(seen, grid)
    rows, cols = grid
    facts_of_view = f"{seen.width} x {seen.height} px, {rows} x {cols} patches"
    panels = [_panel(view, ["the engine's view", facts_of_view], size)]
    if frame is not None and box is not None:
        whole = frame.convert("RGB")
        outlined = outline_view(whole, box)
        if outlined is not whole:  # the crop left part of the frame out
            scale = view.height / outlined.height
            shown = outlined.resize(
                (max(1, round(outlined.width * scale)), view.height), Image.Resampling.BILINEAR
            )
            kept = (box[2] - box[0]) * (box[3] - box[1]) / (frame.width * frame.height)
            lines = ["the frame (dashed: what the engine saw)", f"{100 * min(kept, 1):.0f}% of it"]
            panels.insert(0, _panel(shown, lines, size))
    if fate is not None:
        fate = np.asarray(fate)
        labels = list(blocks) if len(blocks) == len(fate) else list(range(1, len(fate) + 1))
        flows = list(tokens) if len(tokens) == len(fate) else [None] * len(fate)
        for block, row, flow in zip(labels, fate, flows, strict=True):
            drawn = fate_overlay(view, row, grid)
            heading = f"reduction at block {block}"
            if flow is not None:
                heading += f": {flow[0]} -> {flow[1]} tokens"
            panels.append(_panel(drawn, [heading, _counts_line(row)], size))
    row_of_panels = stack(panels, vertical=False, gap=size)
    header = [
        text_block([title], round(size * 1.4)),
        text_block(list(facts), size, colour=MUTED),
    ]
    parts = [*header, row_of_panels]
    if fate is not None:
        parts.append(fate_legend(size, list(FATE_STYLE)))
        notes = [LEGEND_NOTE, *([TOKENS_NOTE] if tokens else [])]
        parts.append(text_block(notes, size - 2, colour=MUTED))
    bars_width = min(row_of_panels.width, max(2 * view.width, 560))
    heading = text_block([f"top {len(topk)} classes ({scores})"], size)
    parts += [heading, topk_bars(topk, bars_width, size)]
    return stack(parts, vertical=True, gap=size, pad=size)
