"""Image preprocessing without torch, matching open_clip's inference transform.

Driven by the manifest's ``preprocess`` section. For each image: resize with PIL (the same output
size rounding as torchvision's ``Resize`` / open_clip's ``ResizeKeepRatio``), centre crop (or pad)
with torchvision's offsets, ``convert("RGB")``, scale to [0, 1] and normalise, giving [3, H, W]
float32. The order of operations is open_clip's: resize and crop happen in the image's own mode and
the RGB conversion comes last, so palette images resize nearest-neighbour and RGBA/LA images resize
with premultiplied alpha, exactly as PIL does inside open_clip's transform.

EXIF orientation is not applied (open_clip's transform does not apply it either).

Memory is bounded by what an image really holds, checked from its header before any decoding:
its area (``max_pixels``, a pixel of a mode heavier than RGB counting for more: ``WORKING_BYTES``),
each side (``MAX_SIDE``), and its aspect ratio (``max_aspect``: the
resize to the engine size would otherwise blow a 1x100000 line up to gigabytes, and the model
would see a sliver of it). A JPEG above the area limit is decoded at 1/2, 1/4 or 1/8 scale by
libjpeg itself (``Image.draft``) when that brings it under the limit, instead of being refused;
images within the limits decode in full, exactly as open_clip's transform sees them.

The manifest's ``interpolation`` applies where open_clip applies it: ``squash``, ``longest`` and
``shortest`` with a square size. For ``shortest`` with a non-square size open_clip calls
``ResizeKeepRatio(image_size)`` without its interpolation argument, so that case always resizes
bicubic whatever the config says; this module does the same.

One deliberate difference: 16-bit grayscale images (modes ``I;16*``, and mode ``I`` holding values
above 255) are scaled to 8 bits first, ``round(v * 255 / 65535)`` with values clipped to
[0, 65535]. PIL's ``convert("RGB")``, which open_clip relies on, clips them at 255 instead, which
turns every ordinary 16-bit photo white. Mode ``I`` images whose values all fit in 8 bits are
used as they are, exactly as open_clip does (see ``to_8bit``).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlm_export.core.errors import BundleError, UserError

RESIZE_MODES = ("shortest", "longest", "squash")
#: --crop: how a frame of another aspect ratio becomes the engine's square, as resize modes.
#: ``center`` is open_clip's inference transform (what CLIP models were trained with);
#: ``letterbox`` keeps the whole frame, padded; ``squash`` keeps it, distorted.
CROP_MODES = {"center": "shortest", "letterbox": "longest", "squash": "squash"}
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
#: channel orders of image arrays (OpenCV gives BGR; PIL, GStreamer RGB and jetson-utils RGBA)
CHANNEL_ORDERS = ("RGB", "BGR", "RGBA", "BGRA", "GRAY")
#: default --max-pixels: larger images are refused before decoding (40 MP is a 7300x5500 photo)
DEFAULT_MAX_PIXELS = 40_000_000
#: the longest side any image may have, whatever its area (JPEG's and WebP's own limits)
MAX_SIDE = 65_535
#: the widest aspect ratio an engine input is made from: beyond it the centre crop sees less than
#: 1/256 of the image (resize "shortest"), or its short side shrinks below a pixel ("longest")
MAX_ASPECT = 256
#: the most pixels the resize to the engine size may produce (the aspect limit of a large engine
#: input is lower: a 448x448 one is fed images up to 79:1)
MAX_RESIZED_PIXELS = 16_000_000
#: bytes per pixel that decoding, the 8-bit conversion and the resize hold at their peak, by mode
WORKING_BYTES = {"1": 1, "L": 1, "P": 1, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "LA": 4}
WORKING_BYTES |= {"PA": 4, "RGBA": 8, "RGBa": 4, "CMYK": 4, "F": 4, "I": 9}
WORKING_BYTES |= {mode: 5 for mode in ("I;16", "I;16L", "I;16B", "I;16N")}
#: rows of a deep grayscale image converted to 8 bits at a time (bounded temporary memory)
_ROWS_PER_BLOCK = 256


class ImageError(UserError):
    """An image file that cannot be read: missing, empty, truncated or not an image."""


def pixel_weight(mode: str) -> float:
    """How many RGB pixels' worth of memory one pixel of ``mode`` takes to decode, convert and
    resize (``WORKING_BYTES`` / 3): RGBA resizes through a premultiplied copy, deep grayscale
    through an 8-bit copy."""
    return WORKING_BYTES.get(mode, 4) / 3


def check_pixels(
    width: int, height: int, max_pixels: int | None, what: str, mode: str = "RGB"
) -> None:
    """Refuse an image above ``max_pixels`` (None or 0: no limit) before it is decoded; a pixel
    of a mode that needs more memory than RGB counts for more (``pixel_weight``)."""
    weight = max(pixel_weight(mode), 1.0)
    if max_pixels and width * height * weight > max_pixels:
        counted = (
            f" (a {mode} pixel counts {weight:.3g}x: {WORKING_BYTES.get(mode, 4)} bytes to decode "
            "and resize, against 3 for RGB)"
            if weight > 1
            else ""
        )
        raise ImageError(
            f"{what} is {width}x{height} = {width * height / 1e6:.1f} megapixels{counted}, above "
            f"the limit of {max_pixels / 1e6:g} (--max-pixels; 0 = no limit)"
        )


def check_sides(width: int, height: int, what: str) -> None:
    """Refuse an image with a side longer than ``MAX_SIDE`` (whatever its area) or an empty
    one, before it is decoded."""
    if width < 1 or height < 1:
        raise ImageError(f"{what} is empty ({width}x{height} pixels)")
    if max(width, height) > MAX_SIDE:
        raise ImageError(
            f"{what} is {width}x{height} pixels: a side longer than {MAX_SIDE} pixels is refused"
        )


def check_aspect(width: int, height: int, max_aspect: float | None, what: str) -> None:
    """Refuse an image whose aspect ratio is above ``max_aspect`` (None: no limit)."""
    if max_aspect and max(width, height) > max_aspect * min(width, height):
        ratio = max(width, height) / min(width, height)
        raise ImageError(
            f"{what} is {width}x{height} pixels, an aspect ratio of {ratio:.0f}:1; the engine "
            f"is fed images up to {max_aspect:g}:1 (beyond it the model sees a sliver of the "
            "image and the resize to its input alone takes a lot of memory): crop it first"
        )


def _draft_under(image: Image.Image, max_pixels: int | None) -> None:
    """A JPEG above ``max_pixels``: ask libjpeg to decode it at 1/2, 1/4 or 1/8 scale, the
    largest that fits (the header's size then reports the reduced size)."""
    weight = max(pixel_weight(image.mode), 1.0)
    if (
        not max_pixels
        or image.format != "JPEG"
        or image.width * image.height * weight <= max_pixels
    ):
        return
    for scale in (2, 4, 8):
        if -(-image.width // scale) * -(-image.height // scale) * weight <= max_pixels:
            image.draft(image.mode, (-(-image.width // scale), -(-image.height // scale)))
            return


def file_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable image file, or None: checked without opening it, so a FIFO
    (which would block a reader forever) or a device is never opened."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return "dangling symbolic link" if path.is_symlink() else "file not found"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return exc.strerror or str(exc)
    if stat.S_ISDIR(info.st_mode):
        return "a folder, not a file"
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "not a regular file"
        kind = "a socket" if stat.S_ISSOCK(info.st_mode) else kind
        kind = "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else kind
        return f"{kind}, not a regular file (never opened)"
    if info.st_size == 0:
        return "file is empty"
    return None


#: PIL's decompression-bomb cap is one process-wide setting: lifted under this lock only
_PIL_CAP = threading.Lock()


def open_uncapped(source: Any, formats: Sequence[str] | None = None) -> Image.Image:
    """``Image.open`` (header only) with PIL's decompression-bomb cap lifted: the caller checks
    the size itself before decoding. Thread-safe: the cap is lifted and restored under a lock, so
    concurrent opens (capture threads, HTTP uploads) never leave it lifted."""
    with _PIL_CAP, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(source, formats=formats)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def load_image(
    path: str | Path,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_aspect: float | None = MAX_ASPECT,
) -> Image.Image:
    """Open and fully decode an image file; raise ImageError naming the file and the reason.

    The size in the file's header is checked before decoding (a small PNG can decode to
    gigabytes): area against ``max_pixels`` (a JPEG above it is decoded at a reduced scale when
    one fits, see the module docstring), each side against ``MAX_SIDE``, the aspect ratio
    against ``max_aspect``. PIL's own decompression-bomb limit gives way to these.
    """
    text = os.fspath(path)
    if not text:
        raise ImageError("cannot read an image from an empty path: give an image file's path")
    if "\x00" in text:
        raise ImageError(f"cannot read image {text!r}: a path cannot hold a NUL character")
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise ImageError(f"cannot read image {path}: {problem}")
    try:
        with open_uncapped(path) as image:
            _draft_under(image, max_pixels)
            check_sides(image.width, image.height, f"image {path}")
            check_pixels(image.width, image.height, max_pixels, f"image {path}", image.mode)
            check_aspect(image.width, image.height, max_aspect, f"image {path}")
            image.load()
        return image
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"cannot read image {path}: file not found") from None
    except PermissionError:
        raise ImageError(f"cannot read image {path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {path}: not an image PIL can decode") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from None


def image_from_array(array: np.ndarray, channels: str | None = None) -> Image.Image:
    """A uint8 array -> a PIL image, its channel order stated, never guessed.

    [H, W] (or [H, W, 1]) is grayscale; [H, W, 3] needs ``channels`` "RGB" or "BGR" (OpenCV);
    [H, W, 4] "RGBA" or "BGRA". Anything else, or a non-uint8 array, is an ImageError: float
    arrays are refused because [0, 1] and [0, 255] cannot be told apart.
    """
    if not isinstance(array, np.ndarray):
        raise ImageError(f"expected a numpy array, got {type(array).__name__}")
    if channels is not None and channels not in CHANNEL_ORDERS:
        raise ImageError(f"channels must be one of {', '.join(CHANNEL_ORDERS)}, got {channels!r}")
    if array.dtype != np.uint8:
        raise ImageError(
            f"image arrays must be uint8 (0-255), got {array.dtype}; for floats in [0, 1]: "
            "(array * 255).round().astype(np.uint8)"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    shape = "x".join(str(n) for n in array.shape) or "() (a single number)"
    if array.size == 0:
        raise ImageError(f"the image array is empty: got shape {shape}")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] > 4):
        hint = " (channels first? use array.transpose(1, 2, 0))" if array.ndim == 3 else ""
        raise ImageError(f"expected an HxW or HxWx3 image array, got shape {shape}{hint}")
    bands = 1 if array.ndim == 2 else array.shape[2]
    if bands == 2:
        raise ImageError(f"expected an HxW or HxWx3 image array, got shape {shape}")
    if bands == 1:
        if channels not in (None, "GRAY"):
            raise ImageError(f"channels={channels!r} given for a grayscale {shape} array")
        return Image.fromarray(np.ascontiguousarray(array))
    orders = " or ".join(repr(c) for c in CHANNEL_ORDERS if c != "GRAY" and len(c) == bands)
    if channels is None:
        raise ImageError(f"a {shape} array needs its channel order: channels={orders}")
    if channels == "GRAY" or len(channels) != bands:
        raise ImageError(
            f"channels={channels!r} does not fit a {shape} array: give channels={orders}"
        )
    if channels.startswith("BGR"):
        array = array[:, :, [2, 1, 0, 3][:bands]]
    return Image.fromarray(np.ascontiguousarray(array))  # mode L, RGB or RGBA from the shape


def decoded(image: Image.Image) -> Image.Image:
    """``image`` with its pixels loaded (PIL opens files lazily); ImageError if it is empty or
    its file cannot be decoded."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        name = getattr(image, "filename", "") or "the image"
        raise ImageError(f"cannot read image {name}: {exc}") from None
    if image.width < 1 or image.height < 1:
        raise ImageError(f"the image is empty ({image.width}x{image.height} pixels)")
    if image.mode in _PREMULTIPLIED:  # PIL converts ``La`` to nothing but ``LA``
        image = image.convert(_PREMULTIPLIED[image.mode])
    return image


#: modes whose colour is premultiplied by alpha, and the straight-alpha mode of each
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}


def to_8bit(image: Image.Image) -> Image.Image:
    """Deep grayscale -> ``L`` by its real value range; other modes as they are.

    ``I;16*`` images are 16-bit: ``round(v * 255 / 65535)``. Mode ``I`` (32-bit integers) says
    nothing about the range its values use, so the values decide: all <= 255 are 8-bit values and
    the image is returned as it is (resized in mode ``I`` and clipped by ``convert``, exactly
    open_clip's path), all <= 65535 are 16-bit (scaled as above), larger ones are scaled from
    the 31-bit range. Negative values count as 0.
    """
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    pixels = np.asarray(image)
    top = 65535
    if image.mode == "I":
        peak = int(pixels.max(initial=0))
        if peak <= 255:
            return image
        top = 65535 if peak <= 65535 else 2**31 - 1
    out = np.empty(pixels.shape, dtype=np.uint8)
    for row in range(0, pixels.shape[0], _ROWS_PER_BLOCK):  # int64 temporaries, a block at a time
        block = np.clip(pixels[row : row + _ROWS_PER_BLOCK].astype(np.int64), 0, top)
        out[row : row + _ROWS_PER_BLOCK] = (block * 255 + top // 2) // top
    return Image.fromarray(out)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)`` output (h, w): shorter side = ``size``, longer truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w


def keep_ratio_size(
    height: int, width: int, target: tuple[int, int], longest: bool
) -> tuple[int, int]:
    """open_clip ``ResizeKeepRatio`` output (h, w): fit the shorter (or longer) side, round."""
    ratio_h, ratio_w = height / target[0], width / target[1]
    ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
    return round(height / ratio), round(width / ratio)


def crop_or_pad(image: Image.Image, size: tuple[int, int], fill: int) -> Image.Image:
    """Centre crop to (h, w) with torchvision's offsets, padding with ``fill`` where too small."""
    target_h, target_w = size
    if image.width < target_w or image.height < target_h:
        pad_left = max(target_w - image.width, 0) // 2
        pad_top = max(target_h - image.height, 0) // 2
        padded_w, padded_h = max(image.width, target_w), max(image.height, target_h)
        bands = len(image.getbands())
        canvas = Image.new(
            image.mode, (padded_w, padded_h), fill if bands == 1 else (fill,) * bands
        )
        if image.mode == "P":
            canvas.putpalette(image.getpalette())
        canvas.paste(image, (pad_left, pad_top))
        image = canvas
    top = int(round((image.height - target_h) / 2.0))
    left = int(round((image.width - target_w) / 2.0))
    if (top, left, image.height, image.width) == (0, 0, target_h, target_w):
        return image
    return image.crop((left, top, left + target_w, top + target_h))


def aspect_limit(size: tuple[int, int], resize_mode: str) -> int:
    """The widest aspect ratio an engine input of ``size`` is made from: ``MAX_ASPECT``, lower
    where the resize would produce more than ``MAX_RESIZED_PIXELS``, and for "longest" no more
    than the input's short side (the image's short side must stay a pixel or more)."""
    short = min(size)
    limit = max(1, min(MAX_ASPECT, MAX_RESIZED_PIXELS // (short * short)))
    return min(limit, short) if resize_mode == "longest" else limit


class Preprocessor:
    """The manifest's preprocessing as a callable: image -> [3, H, W] float32."""

    def __init__(self, config: dict[str, Any], crop: str | None = None) -> None:
        try:
            height, width = (int(v) for v in config["size"])
            self.resize_mode = str(config["resize_mode"])
            self.interpolation = str(config["interpolation"])
            mean = np.asarray(config["mean"], dtype=np.float32).reshape(3)
            std = np.asarray(config["std"], dtype=np.float32).reshape(3)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest preprocess section is malformed ({exc})") from None
        if self.resize_mode not in RESIZE_MODES:
            raise BundleError(f"unsupported resize_mode {self.resize_mode!r} in manifest")
        if crop is not None:
            if crop not in CROP_MODES:
                raise UserError(f"unknown crop {crop!r} (choose from {', '.join(CROP_MODES)})")
            self.resize_mode = CROP_MODES[crop]
        if self.interpolation not in INTERPOLATIONS:
            raise BundleError(f"unsupported interpolation {self.interpolation!r} in manifest")
        self.size = (height, width)
        self.max_pixels: int | None = DEFAULT_MAX_PIXELS
        self.max_aspect = aspect_limit(self.size, self.resize_mode)
        self.fill_color = int(config.get("fill_color", 0))
        self._resample = INTERPOLATIONS[self.interpolation]
        # ToTensor then Normalize, in float32 as torch does: one lookup table row per channel.
        levels = np.arange(256, dtype=np.float32) / np.float32(255)
        self._lut = ((levels[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)

    @property
    def resample(self) -> Image.Resampling:
        """The PIL filter of the resize step (open_clip's choice, see the module docstring)."""
        if self.resize_mode == "shortest" and self.size[0] != self.size[1]:
            return Image.Resampling.BICUBIC  # open_clip's ResizeKeepRatio(image_size) default
        return self._resample

    @property
    def crop(self) -> str:
        """The crop as ``--crop`` names it: center, letterbox or squash."""
        return next(name for name, mode in CROP_MODES.items() if mode == self.resize_mode)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], crop: str | None = None) -> Preprocessor:
        """Build from a bundle manifest; ``crop`` (a CROP_MODES name) overrides its resize."""
        return cls(manifest["preprocess"], crop)

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """Resize and centre crop/pad to the engine size, in the image's own mode.

        Sides and aspect ratio are checked first (see the module docstring), and the area
        against ``max_pixels`` too while the image is not decoded yet.
        """
        check_sides(image.width, image.height, "the image")
        check_aspect(image.width, image.height, self.max_aspect, "the image")
        if getattr(image, "tile", None):  # a file opened lazily, its pixels not decoded yet
            check_pixels(image.width, image.height, self.max_pixels, "the image", image.mode)
        image = to_8bit(decoded(image))
        height, width = image.height, image.width
        if self.resize_mode == "squash":
            new_size = self.size
        elif self.resize_mode == "longest":
            new_size = keep_ratio_size(height, width, self.size, longest=True)
        elif self.size[0] == self.size[1]:
            new_size = shortest_side_size(height, width, self.size[0])
        else:
            new_size = keep_ratio_size(height, width, self.size, longest=False)
        if new_size != (height, width):
            image = image.resize((new_size[1], new_size[0]), self.resample)
        fill = self.fill_color if self.resize_mode == "longest" else 0
        return crop_or_pad(image, self.size, fill)

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] RGB -> normalised [3, H, W] float32."""
        out = np.empty((3, *rgb.shape[:2]), dtype=np.float32)
        for channel in range(3):
            np.take(self._lut[channel], rgb[:, :, channel], out=out[channel])
        return out

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A PIL image of any mode -> [3, H, W] float32."""
        cropped = self.resize_crop(image)
        return self.normalize(np.asarray(cropped.convert("RGB")))

    def from_path(self, path: str | Path) -> np.ndarray:
        """An image file -> [3, H, W] float32; ImageError if it cannot be read."""
        return self(load_image(path, self.max_pixels, self.max_aspect))

    def from_bgr(self, frame: np.ndarray) -> np.ndarray:
        """A BGR uint8 [H, W, 3] frame (OpenCV) -> the same tensor as the RGB image would give."""
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(
                f"expected a BGR uint8 [H, W, 3] frame, got {frame.dtype} {frame.shape}"
            )
        rgb = np.ascontiguousarray(frame[:, :, ::-1])
        cropped = self.resize_crop(Image.fromarray(rgb))
        return self.normalize(np.asarray(cropped))

    def batch(self, items: Sequence[Image.Image | np.ndarray | str | Path]) -> np.ndarray:
        """Several images (PIL, BGR arrays or paths) -> [B, 3, H, W] float32."""
        out = np.empty((len(items), 3, *self.size), dtype=np.float32)
        for index, item in enumerate(items):
            out[index] = self.convert(item)
        return out

    def convert(self, item: Image.Image | np.ndarray | str | Path) -> np.ndarray:
        """Any supported input (PIL image, BGR array, path) -> [3, H, W] float32."""
        if isinstance(item, Image.Image):
            return self(item)
        if isinstance(item, np.ndarray):
            return self.from_bgr(item)
        return self.from_path(item)
