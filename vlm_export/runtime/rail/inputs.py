"""Checks on what callers hand to the RAIL adapters, and the one-hot targets built from labels."""

from __future__ import annotations

import numpy as np

from vlm_export.core.errors import UserError


class RailError(UserError):
    """Bad RAIL input (features, labels, hyperparameters) or an update that would not be finite."""


def as_features(features: np.ndarray, in_dim: int) -> np.ndarray:
    """Return ``features`` as a finite float64 array [N, in_dim]; RailError otherwise."""
    array = np.asarray(features)
    if array.ndim != 2 or array.shape[1] != in_dim:
        raise RailError(f"features must have shape [N, {in_dim}], got {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise RailError(f"features must be floating point, got {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        raise RailError("features contain NaN or inf")
    return array


def as_labels(labels: np.ndarray, count: int, num_classes: int) -> np.ndarray:
    """Return ``labels`` as int64 [count], each a global class index in [0, num_classes)."""
    array = np.asarray(labels)
    if array.shape != (count,):
        raise RailError(f"labels must have shape [{count}] (one per row), got {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.integer):
        raise RailError(f"labels must be integer class indices, got {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if count and (array.min() < 0 or array.max() >= num_classes):
        raise RailError(f"labels must lie in [0, {num_classes}), got {array.min()}..{array.max()}")
    return array


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """One-hot rows [N, num_classes] float64 for int64 ``labels``."""
    targets = np.zeros((labels.shape[0], num_classes))
    targets[np.arange(labels.shape[0]), labels] = 1.0
    return targets


def column_targets(labels: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The one-hot targets of ``columns`` only: [N, len(columns)] float64, 1 where a sample's label
    is that column's class (the other classes' columns of the full one-hot matrix are zero)."""
    return (labels[:, None] == columns[None, :]).astype(np.float64)


def check_new_class_count(num_classes: int, current: int) -> None:
    """A label space may grow, never shrink."""
    if num_classes < current:
        raise RailError(f"the label space can only grow: has {current} classes, not {num_classes}")
