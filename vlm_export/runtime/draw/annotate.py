"""A frame with what the pipeline decided drawn on it: label, score and frames per second."""

from __future__ import annotations

from PIL import Image, ImageDraw

from vlm_export.runtime.draw.style import Font, fit_text, font, text_size

BANNER = (24, 24, 24)
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
    """``image`` (RGB) under a banner strip with label, score and fps: the frame is not covered.

    The text is about a twentieth of the frame's height (at least 12 px), so it reads at the
    frame's own size; the strip's height depends only on the frame's size (:func:`banner_height`),
    so every frame of a video grows by the same amount.
    """
    size = banner_font_size(image.size)
    face = font(size)
    margin = max(3, size // 3)
    text = banner_fitted(label, score, fps, face, image.width - 2 * margin)
    strip = banner_height(image.size)
    canvas = Image.new("RGB", (image.width, image.height + strip), BANNER)
    canvas.paste(image.convert("RGB"), (0, strip))
    ImageDraw.Draw(canvas).text((margin, margin), text, fill=BANNER_TEXT, font=face)
    return canvas


def banner_fitted(
    label: str, score: float | None, fps: float | None, face: Font, width: int
) -> str:
    """The banner text in ``width`` pixels: a long label is cut short (with an ellipsis) so that
    the score and the frame rate always show; only when even they do not fit is the whole cut."""
    whole = fit_text(banner_text(label, score, fps), face, width)
    if not whole.endswith("..."):
        return whole
    room = width - text_size(banner_text("", score, fps), face)[0]
    if room < text_size("M...", face)[0]:
        return whole
    return banner_text(fit_text(label, face, room), score, fps)


def banner_font_size(frame_size: tuple[int, int]) -> int:
    """The banner's text size for a frame (width, height)."""
    width, height = frame_size
    return max(12, min(height // 20, width // 16))


def banner_height(frame_size: tuple[int, int]) -> int:
    """Pixels the banner strip adds above a frame (width, height)."""
    size = banner_font_size(frame_size)
    ascent, descent = font(size).getmetrics()
    return ascent + descent + 2 * max(3, size // 3)
