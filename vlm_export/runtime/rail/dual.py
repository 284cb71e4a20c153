"""Dual RAIL: RBF kernel ridge regression on the raw embeddings, grown exactly (spec section 3).

alpha = (K + lambda I)^-1 Y over every stored sample; predict k(x, X) @ alpha. The inverse
M = (K + lambda I)^-1 is kept and grown by a block (Schur complement) update when samples arrive,
never re-inverted; alpha is grown with it, so each update costs O(N n + N n C) beyond the N^2
copy of M (N stored, n new samples).
"""

from __future__ import annotations

import numpy as np

from vlm_export.runtime.rail.inputs import (
    RailError,
    as_features,
    as_labels,
    check_new_class_count,
    one_hot,
)
from vlm_export.runtime.rail.linalg import cholesky, cholesky_inverse, cholesky_solve

GAMMA = 0.1
RIDGE = 1e-3


def rbf_kernel(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """k(a_i, b_j) = exp(-gamma ||a_i - b_j||^2), [len(a), len(b)]."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.exp(-gamma * np.maximum(squared, 0.0))


class DualAdapter:
    """Dual RAIL learner over a global label space of ``num_classes`` classes.

    Attributes: ``features`` [N, in_dim] and ``labels`` [N] (every training sample), ``inverse``
    (M [N, N]), ``coef`` (alpha [N, C]), ``learned_mask`` ([C] bool), all float64 but the masks.
    """

    def __init__(
        self, in_dim: int, num_classes: int, gamma: float = GAMMA, ridge: float = RIDGE
    ) -> None:
        if in_dim < 1 or num_classes < 1:
            raise RailError(f"need in_dim >= 1 and num_classes >= 1; got {in_dim}, {num_classes}")
        if not (gamma > 0 and ridge > 0):
            raise RailError(f"gamma and ridge must be positive, got {gamma}, {ridge}")
        self.in_dim = int(in_dim)
        self.gamma = float(gamma)
        self.ridge = float(ridge)
        self.features = np.zeros((0, in_dim))
        self.labels = np.zeros(0, dtype=np.int64)
        self.inverse = np.zeros((0, 0))
        self.coef = np.zeros((0, num_classes))
        self.learned_mask = np.zeros(num_classes, dtype=bool)

    @property
    def num_classes(self) -> int:
        """Size C of the global label space."""
        return self.coef.shape[1]

    @property
    def num_samples(self) -> int:
        """Number of stored training samples N."""
        return self.features.shape[0]

    def extend_classes(self, num_classes: int) -> None:
        """Grow the label space to ``num_classes``: new classes get zero columns in alpha."""
        check_new_class_count(num_classes, self.num_classes)
        self.coef = np.pad(self.coef, ((0, 0), (0, num_classes - self.num_classes)))
        self.learned_mask = np.pad(self.learned_mask, (0, num_classes - len(self.learned_mask)))

    def partial_fit(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Add samples (features [n, in_dim], labels [n]) by a block update of M and alpha.

        With A = [[K + lambda I, C], [C^T, D]] and S = D - C^T M C (Schur complement):
        A^-1 = [[M + M C S^-1 C^T M, -M C S^-1], [-S^-1 C^T M, S^-1]], and the new alpha is
        [alpha - M C Z; Z] with Z = S^-1 (Y_new - C^T alpha). On RailError nothing changes.
        """
        x = as_features(features, self.in_dim)
        y = as_labels(labels, x.shape[0], self.num_classes)
        if not len(y):
            return
        cross = rbf_kernel(self.features, x, self.gamma)
        block = rbf_kernel(x, x, self.gamma)
        block.flat[:: len(y) + 1] += self.ridge
        projected = self.inverse @ cross
        factor = cholesky(block - cross.T @ projected, "the kernel system's Schur complement")
        schur_inverse = cholesky_inverse(factor)
        new_coef = cholesky_solve(factor, one_hot(y, self.num_classes) - cross.T @ self.coef)
        gain = projected @ schur_inverse
        inverse = np.block([[self.inverse + gain @ projected.T, -gain], [-gain.T, schur_inverse]])
        coef = np.vstack([self.coef - projected @ new_coef, new_coef])
        if not (np.isfinite(inverse).all() and np.isfinite(coef).all()):
            raise RailError("the kernel update is not finite")
        self.inverse, self.coef = inverse, coef
        self.features = np.vstack([self.features, x])
        self.labels = np.concatenate([self.labels, y])
        self.learned_mask[y] = True

    def finalize(self) -> None:
        """Nothing to do: alpha is exact after every ``partial_fit``."""

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Raw regression output k(x, X) @ alpha, [B, C] float64."""
        x = as_features(features, self.in_dim)
        return rbf_kernel(x, self.features, self.gamma) @ self.coef

    def to_inference(self) -> DualPredictor:
        """The predict-only form: stored features and alpha (no M, no labels)."""
        return DualPredictor(
            self.features.copy(), self.coef.copy(), self.gamma, self.learned_mask.copy()
        )


class DualPredictor:
    """Predict-only dual adapter. Stays float64: alpha's large entries cancel (lambda = 1e-3)."""

    def __init__(
        self, features: np.ndarray, coef: np.ndarray, gamma: float, learned_mask: np.ndarray
    ) -> None:
        self.features = features
        self.coef = coef
        self.gamma = float(gamma)
        self.learned_mask = learned_mask

    @property
    def in_dim(self) -> int:
        """Width of the image embeddings it takes."""
        return self.features.shape[1]

    @property
    def num_classes(self) -> int:
        """Size C of the global label space."""
        return self.coef.shape[1]

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Raw regression output [B, C] float64."""
        x = as_features(features, self.in_dim)
        return rbf_kernel(x, self.features, self.gamma) @ self.coef
