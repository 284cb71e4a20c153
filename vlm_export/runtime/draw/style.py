"""Fonts and colours shared by every picture of ``vlm_export.runtime.draw``."""

from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from vlm_export.runtime.terminal import printable

Colour = tuple[int, int, int]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

BACKGROUND: Colour = (255, 255, 255)
INK: Colour = (30, 30, 30)
MUTED: Colour = (110, 110, 110)
ACCENT: Colour = (0, 114, 178)  # Okabe-Ito blue
ACCENT_LIGHT: Colour = (150, 190, 220)


#: system fonts that draw accented and other non-ASCII letters (class names, file names), tried
#: in order where installed (Pillow looks in the system's font folders); PIL's own default draws
#: ASCII only (an ``é`` comes out as a box)
UNICODE_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "LiberationSans-Regular.ttf")


@lru_cache(maxsize=16)
def font(size: int) -> Font:
    """A font at ``size`` pixels: the first of UNICODE_FONTS installed, else PIL's default
    (Pillow >= 10.1 with FreeType; else its bitmap)."""
    for name in UNICODE_FONTS:
        try:
            return ImageFont.truetype(name, size=size)
        except (OSError, ImportError):  # not installed here, or Pillow without FreeType
            continue
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # older Pillow, or Pillow without FreeType
        return ImageFont.load_default()


def text_size(text: str, face: Font) -> tuple[int, int]:
    """Width and height in pixels of one line of ``text`` drawn at (0, 0): room for the font's
    tallest letters and deepest descenders, and a small gap below."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    right = probe.textbbox((0, 0), text, font=face)[2]
    _, top, _, bottom = probe.textbbox((0, 0), "Hgjy", font=face)
    return right, bottom + max(2, (bottom - top) // 4)


def fit_text(text: str, face: Font, width: int) -> str:
    """``text`` on one line (line breaks and other controls as escapes), cut with an ellipsis
    so that it fits in ``width`` pixels."""
    text = printable(text)
    if text_size(text, face)[0] <= width:
        return text
    while text and text_size(text + "...", face)[0] > width:
        text = text[:-1]
    return text + "..."


def text_block(lines: list[str], size: int, colour: Colour = INK, width: int = 0) -> Image.Image:
    """Lines of text on the background, at least ``width`` wide (each kept on its line)."""
    lines = [printable(line) for line in lines]
    face = font(size)
    sizes = [text_size(line, face) for line in lines]
    height = sum(h for _, h in sizes)
    image = Image.new("RGB", (max(width, *(w for w, _ in sizes), 1), max(height, 1)), BACKGROUND)
    draw = ImageDraw.Draw(image)
    y = 0
    for line, (_, h) in zip(lines, sizes, strict=True):
        draw.text((0, y), line, fill=colour, font=face)
        y += h
    return image


def stack(parts: list[Image.Image], vertical: bool, gap: int, pad: int = 0) -> Image.Image:
    """Paste images one after another (top to bottom or left to right) on the background."""
    if vertical:
        width = max(p.width for p in parts) + 2 * pad
        height = sum(p.height for p in parts) + gap * (len(parts) - 1) + 2 * pad
    else:
        width = sum(p.width for p in parts) + gap * (len(parts) - 1) + 2 * pad
        height = max(p.height for p in parts) + 2 * pad
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    offset = pad
    for part in parts:
        canvas.paste(part.convert("RGB"), (pad, offset) if vertical else (offset, pad))
        offset += (part.height if vertical else part.width) + gap
    return canvas
