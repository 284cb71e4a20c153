"""A reliability diagram (accuracy against confidence per bin) for each method, with PIL."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageDraw, ImageFont

PANEL = 320
MARGIN = 48
COLOURS = ((66, 133, 244), (15, 157, 88), (244, 160, 0), (120, 80, 200))
GAP = (250, 200, 200)  # between a bin's accuracy and its mean confidence


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def reliability_diagram(results: Mapping[str, Mapping[str, Any]]) -> Image.Image:
    """One panel per method: bars of accuracy per confidence bin, the diagonal of perfect
    calibration, bin gaps shaded, and the method's top-1 and ECE in the title.

    ``results[method]`` holds ``title``, ``top1``, ``ece`` and ``reliability`` (``edges``,
    ``counts``, ``accuracy``) as ``vlm-edge eval-tta`` computes them.
    """
    count = len(results)
    width = count * (PANEL + MARGIN) + MARGIN
    height = PANEL + 2 * MARGIN + 24
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for slot, (result, colour) in enumerate(zip(results.values(), COLOURS, strict=False)):
        left = MARGIN + slot * (PANEL + MARGIN)
        _panel(draw, left, MARGIN + 12, result, colour)
        _vertical_label(image, "accuracy", left - 46, MARGIN + 12 + PANEL // 2)
    return image


def _vertical_label(image: Image.Image, text: str, x: int, middle: int) -> None:
    """``text`` turned 90 degrees, its left edge at ``x``, centred on ``middle`` (clear of the
    title above the panel)."""
    font = _font(11)
    box = ImageDraw.Draw(image).textbbox((0, 0), text, font=font)
    label = Image.new("RGB", (box[2] + 2, box[3] + 2), "white")
    ImageDraw.Draw(label).text((1, 1), text, fill="black", font=font)
    turned = label.rotate(90, expand=True)
    image.paste(turned, (x, middle - turned.height // 2))


def _panel(
    draw: ImageDraw.ImageDraw,
    left: int,
    top: int,
    result: Mapping[str, Any],
    colour: tuple[int, int, int],
) -> None:
    bottom, right = top + PANEL, left + PANEL
    table = result["reliability"]
    edges = table["edges"]
    for low, high, accuracy, n in zip(
        edges[:-1], edges[1:], table["accuracy"], table["counts"], strict=True
    ):
        if not n:
            continue
        x0, x1 = left + low * PANEL, left + high * PANEL
        middle = (low + high) / 2
        draw.rectangle([x0, bottom - accuracy * PANEL, x1, bottom], fill=colour, outline="white")
        gap_top, gap_bottom = sorted((bottom - accuracy * PANEL, bottom - middle * PANEL))
        draw.rectangle([x0, gap_top, x1, gap_bottom], fill=GAP, outline=(200, 0, 0))
    draw.line([left, bottom, right, top], fill=(120, 120, 120), width=1)
    draw.rectangle([left, top, right, bottom], outline="black")
    small = _font(11)
    for tick in range(0, 11, 2):
        value = tick / 10
        draw.text((left + value * PANEL - 6, bottom + 4), f"{value:.1f}", fill="black", font=small)
        draw.text((left - 28, bottom - value * PANEL - 6), f"{value:.1f}", fill="black", font=small)
    draw.text((left + PANEL / 2 - 30, bottom + 20), "confidence", fill="black", font=small)
    draw.text(
        (left + 6, top + 4),
        "bars: accuracy per bin; red: gap to confidence",
        fill=(90, 90, 90),
        font=small,
    )
    top1 = "-" if result.get("top1") is None else f"{100 * result['top1']:.1f}%"
    ece = "-" if result.get("ece") is None else f"{100 * result['ece']:.1f}%"
    title = f"{result['title']}: top-1 {top1}, ECE {ece}"
    draw.text((left, top - 22), title, fill="black", font=_font(13))
