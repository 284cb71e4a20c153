"""Small numerical helpers shared by the pipeline and the adapters."""

from __future__ import annotations

import numpy as np

from vlm_export.core.errors import UserError


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis``, in the input's floating dtype."""
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


#: a float32 row whose norm is within this of 1 is taken as L2-normalised (float32 rounding
#: leaves ~1e-7)
UNIT_TOLERANCE = 1e-5


def unit_rows(array: object, rows: int, width: int) -> np.ndarray:
    """``array`` as float32 [rows, width] with L2-normalised rows (text embeddings given by a
    caller: rows of unit length as given, others normalised); UserError for another shape,
    non-numbers, NaN or infinity, or a row of zeros."""
    given = np.asarray(array)
    if given.dtype.kind not in "fiu":  # complex, text, objects: not embeddings
        raise UserError(f"text embeddings must be an array of real numbers, got {given.dtype}")
    values = given.astype(np.float64)
    if values.shape != (rows, width):
        raise UserError(
            f"text embeddings must be [{rows}, {width}] (one row per class), got "
            f"{list(values.shape)}"
        )
    if not np.isfinite(values).all():
        raise UserError("text embeddings hold NaN or infinite values")
    scale = np.abs(values).max(axis=1, initial=0.0)
    if not (scale > 0).all():
        raise UserError(f"text embedding row {int(np.argmin(scale))} is all zeros")
    scaled = values / scale[:, None]  # lengths of rows near 1e308 without overflow
    lengths = np.linalg.norm(scaled, axis=1)
    with np.errstate(over="ignore"):
        off = np.abs(lengths * scale - 1.0) > UNIT_TOLERANCE
    out = np.empty(values.shape, np.float32)
    out[~off] = values[~off]  # rows already of unit length keep their bits
    out[off] = scaled[off] / lengths[off, None]
    return out
