"""An accuracy matrix as a heatmap with the numbers in its cells (``vlm-edge eval --plot``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from vlm_export.runtime.draw.style import (
    BACKGROUND,
    INK,
    MUTED,
    Colour,
    Font,
    font,
    stack,
    text_block,
    text_size,
)
from vlm_export.runtime.terminal import printable

#: a light-to-dark blue scale (value 0 -> first colour, 1 -> last)
SCALE: tuple[Colour, ...] = ((247, 251, 255), (158, 202, 225), (66, 146, 198), (8, 48, 107))


def scale_colour(value: float) -> Colour:
    """The scale's colour at ``value`` in [0, 1] (clipped), linearly between its stops."""
    position = min(max(float(value), 0.0), 1.0) * (len(SCALE) - 1)
    low = min(int(position), len(SCALE) - 2)
    t = position - low
    a, b = np.array(SCALE[low], float), np.array(SCALE[low + 1], float)
    return tuple(int(round(v)) for v in (1 - t) * a + t * b)  # type: ignore[return-value]


def _ink_on(colour: Colour) -> Colour:
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    return INK if luminance > 140 else (255, 255, 255)


def _column_heads(labels: Sequence[str], face: Font, line: int, room: int) -> list[Image.Image]:
    """Each column label as a picture: level when every label fits its column (``room`` pixels),
    else all turned upright (read bottom to top), so that none is cut or runs into the next."""
    level = all(text_size(label, face)[0] <= room for label in labels)
    heads = []
    for label in labels:
        head = Image.new("RGB", (text_size(label, face)[0], line), BACKGROUND)
        ImageDraw.Draw(head).text((0, 0), label, fill=INK, font=face)
        heads.append(head if level else head.rotate(90, expand=True))
    return heads


def heatmap(
    table: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    note: str = "",
    cell: int = 72,
    size: int = 15,
) -> Image.Image:
    """A [rows, cols] table of values in [0, 1] (NaN: an empty cell) as coloured cells with the
    values in percent, row labels on the left, column labels on top (upright when one is wider
    than its column), a title and a note below."""
    table = np.asarray(table, dtype=float)
    rows, cols = table.shape
    row_labels, col_labels = [printable(s) for s in row_labels], [printable(s) for s in col_labels]
    face = font(size)
    label_w = max((text_size(label, face)[0] for label in row_labels), default=0) + size
    line = text_size("Hg", face)[1]
    heads = _column_heads(col_labels, face, line, cell - size // 2)
    top = max((head.height for head in heads), default=line) + size // 2
    image = Image.new("RGB", (label_w + cols * cell, top + rows * cell), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for j, head in enumerate(heads):
        x = label_w + j * cell + (cell - head.width) // 2
        image.paste(head, (x, top - size // 2 - head.height))
    for i, label in enumerate(row_labels):
        y = top + i * cell
        draw.text((0, y + (cell - line) // 2), label, fill=INK, font=face)
        for j in range(cols):
            x = label_w + j * cell
            value = table[i, j]
            box = (x, y, x + cell - 2, y + cell - 2)
            if np.isnan(value):
                draw.rectangle(box, fill=BACKGROUND, outline=MUTED)
                continue
            colour = scale_colour(value)
            draw.rectangle(box, fill=colour, outline=SCALE[1])
            text = f"{100 * value:.1f}"
            width = text_size(text, face)[0]
            position = (x + (cell - width) // 2, y + (cell - line) // 2)
            draw.text(position, text, fill=_ink_on(colour), font=face)
    parts = [text_block([title], round(size * 1.2)), image]
    if note:
        parts.append(text_block([note], size, MUTED))
    return stack(parts, vertical=True, gap=size // 2)
