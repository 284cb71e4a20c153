"""A frame with what the pipeline decided drawn on it: label, score and frames per second."""

from __future__ import annotations

from PIL import Image, ImageDraw

from vlm_export.runtime.draw.style import fit_text, font, text_size

BANNER = (0, 0, 0, 150)
BANNER_TEXT = (255, 255, 255)


def banner_text(label: str, score: float | None, fps: float | None) -> str:
    """``cat  87.3%  |  12.4 fps`` (the parts that are known)."""
    parts = [label if score is None else f"{label}  {100 * score:.1f}%"]
    if fps is not None:
        parts.append(f"{fps:.1f} fps")
    return "  |  ".join(parts)


def annotate_frame(
    image: Image.Image, label: str, score: float | None = None, fps: float | None = None
) -> Image.Image:
    """``image`` (RGB copy) with a translucent banner across its top: label, score and fps.

    The text is about a twentieth of the frame's height (at least 12 px), so it reads at the
    frame's own size.
    """
    base = image.convert("RGBA")
    size = max(12, min(base.height // 20, base.width // 16))
    face = font(size)
    margin = max(3, size // 3)
    text = fit_text(banner_text(label, score, fps), face, base.width - 2 * margin)
    height = text_size(text, face)[1] + 2 * margin
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.rectangle((0, 0, base.width - 1, height - 1), fill=BANNER)
    draw.text((margin, margin), text, fill=(*BANNER_TEXT, 255), font=face)
    return Image.alpha_composite(base, layer).convert("RGB")
