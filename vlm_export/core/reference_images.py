"""The fixed synthetic reference images both sides run: the exporter records their embeddings in
the bundle, the device runs them again when an engine opens and compares (numpy only).

The images are drawn by arithmetic, not from a random number generator whose stream could change
between numpy versions: a colour gradient, a checkerboard, smooth blobs and pixel noise (from an
integer hash of the pixel position and ``seed``). They are made directly at the engine's input
size and normalised with the bundle's mean and std, so resizing code plays no part: the check is
about the engine alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: how many reference images, and the seed of their noise (bump GENERATOR when they change)
REFERENCE_COUNT = 4
REFERENCE_SEED = 20261207
GENERATOR = "vlm-export reference images v1"


def _hash_unit(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """Values in [0, 1) from an integer hash of (row, column, channel, seed): [H, W, C]."""
    rows, cols, chans = np.meshgrid(
        np.arange(height, dtype=np.uint64),
        np.arange(width, dtype=np.uint64),
        np.arange(channels, dtype=np.uint64),
        indexing="ij",
    )
    with np.errstate(over="ignore"):
        x = rows * np.uint64(0x9E3779B97F4A7C15) ^ cols * np.uint64(0xC2B2AE3D27D4EB4F)
        x ^= chans * np.uint64(0x165667B19E3779F9) ^ np.uint64(seed)
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xFF51AFD7ED558CCD)
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xC4CEB9FE1A85EC53)
        x ^= x >> np.uint64(33)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def reference_pixels(
    height: int, width: int, count: int = REFERENCE_COUNT, seed: int = REFERENCE_SEED
) -> np.ndarray:
    """The reference images as RGB in [0, 1] (multiples of 1/255): float32 [count, H, W, 3]."""
    if not 1 <= count <= 4:
        raise ValueError(f"1 to 4 reference images, not {count}")
    y = np.linspace(0.0, 1.0, height)[:, None]
    x = np.linspace(0.0, 1.0, width)[None, :]
    gradient = np.stack([x + 0 * y, y + 0 * x, 1.0 - (x + y) / 2], axis=-1)
    cell = max(2, min(height, width) // 8)
    rows = np.arange(height)[:, None] // cell
    cols = np.arange(width)[None, :] // cell
    check = ((rows + cols) % 2).astype(np.float64)
    checker = np.stack([check * 0.9 + 0.05, 1.0 - check * 0.8, check * 0.5 + 0.25], axis=-1)
    blobs = np.stack(
        [
            0.5 + 0.5 * np.sin(2 * np.pi * (x * 1.5 + y * 0.5) + phase) * np.cos(np.pi * y * 2)
            for phase in (0.0, 2.1, 4.2)
        ],
        axis=-1,
    )
    noise = _hash_unit(height, width, 3, seed)
    images = np.clip(np.stack([gradient, checker, blobs, noise])[:count], 0.0, 1.0)
    # in 8-bit steps, as a camera gives them (and a last-bit difference of sin() disappears)
    return (np.round(images * 255.0) / 255.0).astype(np.float32)


def reference_inputs(
    size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    count: int = REFERENCE_COUNT,
    seed: int = REFERENCE_SEED,
) -> np.ndarray:
    """The reference images as the engine takes them: float32 [count, 3, H, W], normalised."""
    height, width = int(size[0]), int(size[1])
    pixels = reference_pixels(height, width, count, seed).transpose(0, 3, 1, 2)
    mean_ = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    std_ = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((pixels - mean_) / std_, dtype=np.float32)
