"""The top-k classes as horizontal bars, longest first, with their scores."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from vlm_export.runtime.draw.style import (
    ACCENT,
    ACCENT_LIGHT,
    BACKGROUND,
    INK,
    fit_text,
    font,
    text_size,
)

TopK = Sequence[tuple[int, str, float]]


def topk_bars(topk: TopK, width: int, size: int = 16) -> Image.Image:
    """One row per (index, class name, score): the name, a bar as long as the score (0..1)
    and the score in percent; the first row (the decision) in the strong colour."""
    face = font(size)
    row = text_size("Hg", face)[1] + size // 2
    names = [name for _, name, _ in topk]
    name_w = min(max((text_size(n, face)[0] for n in names), default=0), width // 3) + size
    score_w = text_size("100.0%", face)[0] + size // 2
    bar_w = max(width - name_w - score_w, 10)
    image = Image.new("RGB", (width, max(row * len(topk), 1)), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for rank, (_, name, score) in enumerate(topk):
        y = rank * row
        draw.text((0, y + size // 4), fit_text(name, face, name_w - size), fill=INK, font=face)
        length = round(bar_w * min(max(score, 0.0), 1.0))
        colour = ACCENT if rank == 0 else ACCENT_LIGHT
        if length > 0:
            bar = (name_w, y + size // 4, name_w + length - 1, y + row - size // 4)
            draw.rectangle(bar, fill=colour)
        draw.text((name_w + length + size // 4, y + size // 4), f"{100 * score:.1f}%", INK, face)
    return image
