"""Primal RAIL: ridge regression on a fixed random ReLU layer, updated exactly (spec section 2).

phi(x) = ReLU(x @ W_r) with W_r ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) drawn from a recorded seed
(hidden_dim = 0: phi(x) = x). W = (G + lambda I)^-1 B with G = sum phi^T phi, B = sum phi^T Y over
every sample seen, so any split of the data into domains or batches gives the joint solution.
Two exact routes keep it: "cholesky" accumulates G and B (additive, so states merge) and solves
when asked; "woodbury" keeps R = (G + lambda I)^-1 and W current after every batch.
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
from vlm_export.runtime.rail.linalg import cholesky, cholesky_solve, solve_lower, solve_upper

HIDDEN_DIM = 15000
RIDGE = 0.1
ROUTES = ("cholesky", "woodbury")
_BLOCK_ELEMENTS = 1 << 23  # elements of one temporary block in the in-place d x d updates (64 MB)


def random_projection(in_dim: int, hidden_dim: int, seed: int) -> np.ndarray:
    """W_r [in_dim, hidden_dim] float64, uniform in +-1/sqrt(in_dim), from ``seed``."""
    bound = 1.0 / np.sqrt(in_dim)
    return np.random.default_rng(seed).uniform(-bound, bound, size=(in_dim, hidden_dim))


def hidden_features(features: np.ndarray, projection: np.ndarray | None) -> np.ndarray:
    """phi(x) = ReLU(x @ W_r), or x itself without a random layer."""
    if projection is None:
        return features
    return np.maximum(features @ projection, 0)


def _add_product(target: np.ndarray, left: np.ndarray, right: np.ndarray, sign: float) -> None:
    """target += sign * left @ right in place, by row blocks (no second d x d temporary)."""
    rows = max(1, _BLOCK_ELEMENTS // target.shape[1])
    for start in range(0, target.shape[0], rows):
        product = left[start : start + rows] @ right
        if sign > 0:
            target[start : start + rows] += product
        else:
            target[start : start + rows] -= product


class PrimalAdapter:
    """Primal RAIL learner over a global label space of ``num_classes`` classes.

    Attributes: ``projection`` (W_r, None when hidden_dim is 0), ``weights`` (W [d, C] float64),
    ``gram`` and ``cross`` (G, B; cholesky route) or ``inverse`` (R; woodbury route),
    ``learned_mask`` ([C] bool, classes seen in training), ``num_samples``, ``solved`` (W is
    current with G and B).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = HIDDEN_DIM,
        ridge: float = RIDGE,
        seed: int = 0,
        route: str = "cholesky",
        projection: np.ndarray | None = None,
    ) -> None:
        """Start an empty learner; ``projection`` replaces the draw from ``seed`` (state files)."""
        if route not in ROUTES:
            raise RailError(f"unknown primal route {route!r}; choose one of {', '.join(ROUTES)}")
        if in_dim < 1 or num_classes < 1 or hidden_dim < 0:
            raise RailError(
                f"need in_dim >= 1, num_classes >= 1, hidden_dim >= 0; got {in_dim}, "
                f"{num_classes}, {hidden_dim}"
            )
        if not ridge > 0:
            raise RailError(f"ridge must be positive, got {ridge}")
        if seed < 0:
            raise RailError(f"the seed must be a non-negative integer, got {seed}")
        if projection is not None and projection.shape != (in_dim, hidden_dim):
            raise RailError(f"projection must be [{in_dim}, {hidden_dim}], got {projection.shape}")
        self.in_dim = int(in_dim)
        self.hidden_dim = int(hidden_dim)
        self.ridge = float(ridge)
        self.seed = int(seed)
        self.route = route
        if projection is None and hidden_dim:
            projection = random_projection(in_dim, hidden_dim, seed)
        self.projection = projection
        dim = self.feature_dim
        self.weights = np.zeros((dim, num_classes))
        self.learned_mask = np.zeros(num_classes, dtype=bool)
        self.num_samples = 0
        self.solved = True
        self.gram: np.ndarray | None = None
        self.cross: np.ndarray | None = None
        self.inverse: np.ndarray | None = None
        if route == "cholesky":
            self.gram = np.zeros((dim, dim))
            self.cross = np.zeros((dim, num_classes))
        else:
            self.inverse = np.zeros((dim, dim))  # one d_h^2 array, not two (np.eye(d) / ridge)
            np.fill_diagonal(self.inverse, 1.0 / self.ridge)

    @property
    def feature_dim(self) -> int:
        """Width d of phi(x): hidden_dim, or in_dim without a random layer."""
        return self.hidden_dim or self.in_dim

    @property
    def num_classes(self) -> int:
        """Size C of the global label space."""
        return self.weights.shape[1]

    def extend_classes(self, num_classes: int) -> None:
        """Grow the label space to ``num_classes``: new classes get zero columns in W and B."""
        check_new_class_count(num_classes, self.num_classes)
        extra = num_classes - self.num_classes
        self.weights = np.pad(self.weights, ((0, 0), (0, extra)))
        if self.cross is not None:
            self.cross = np.pad(self.cross, ((0, 0), (0, extra)))
        self.learned_mask = np.pad(self.learned_mask, (0, extra))

    def partial_fit(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Learn a batch: features [N, in_dim], labels [N] global class indices.

        On RailError (bad input, an update that would not be finite) the learner is unchanged.
        """
        x = as_features(features, self.in_dim)
        y = as_labels(labels, x.shape[0], self.num_classes)
        if not len(y):
            return
        phi = hidden_features(x, self.projection)
        targets = one_hot(y, self.num_classes)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked and refused
            if self.route == "cholesky":
                self._accumulate(phi, targets)
            else:
                self._woodbury_update(phi, targets)
        self.learned_mask[y] = True
        self.num_samples += len(y)

    def _accumulate(self, phi: np.ndarray, targets: np.ndarray) -> None:
        # G stays PSD, so |G_ij| <= sqrt(G_ii G_jj): a finite diagonal means a finite G.
        diagonal = self.gram.diagonal() + np.einsum("ij,ij->j", phi, phi)
        if not np.isfinite(diagonal).all():
            raise RailError("the statistics G would overflow (features far too large)")
        _add_product(self.gram, phi.T, phi, 1.0)
        self.cross += phi.T @ targets
        self.solved = False

    def _woodbury_update(self, phi: np.ndarray, targets: np.ndarray) -> None:
        # U = R X^T; R <- R - U S^-1 U^T with S = I_b + X U = L L^T, applied as V V^T with
        # V = U L^-T; W <- W + R_new X^T (Y - X W) where R_new X^T = U S^-1 = V L^-1.
        # Every product is d x b or smaller, except the in-place d x d downdate: O(d^2 b).
        u = self.inverse @ phi.T
        system = np.eye(len(phi)) + phi @ u
        factor = cholesky(system, "the Woodbury system I + X R X^T")
        v = solve_lower(factor, u.T).T
        gain = solve_upper(factor, v.T).T
        weights = self.weights + gain @ (targets - phi @ self.weights)
        if not (np.isfinite(v).all() and np.isfinite(weights).all()):
            raise RailError("the Woodbury update is not finite (features far too large)")
        _add_product(self.inverse, v, v.T, -1.0)
        self.weights = weights

    def finalize(self) -> None:
        """Solve W = (G + lambda I)^-1 B by Cholesky if G or B changed (woodbury: nothing to do).

        A solve that fails or is not finite raises RailError and keeps the previous W.
        """
        if self.solved:
            return
        system = self.gram.copy()
        system.flat[:: self.feature_dim + 1] += self.ridge
        factor = cholesky(system, "G + lambda I")
        del system
        weights = cholesky_solve(factor, self.cross)
        if not np.isfinite(weights).all():
            raise RailError("the ridge solve gave non-finite weights")
        self.weights = weights
        self.solved = True

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Raw regression output [B, C] float64 (solves first if statistics changed)."""
        x = as_features(features, self.in_dim)
        self.finalize()
        return hidden_features(x, self.projection) @ self.weights

    def to_inference(self) -> PrimalPredictor:
        """The predict-only form: W_r and W in float32, the learned mask (no G, B or R)."""
        self.finalize()
        projection = None if self.projection is None else self.projection.astype(np.float32)
        weights = self.weights.astype(np.float32)
        return PrimalPredictor(projection, weights, self.learned_mask.copy())


class PrimalPredictor:
    """Predict-only primal adapter: float32 W_r (or None) and W, and the learned-class mask."""

    def __init__(
        self, projection: np.ndarray | None, weights: np.ndarray, learned_mask: np.ndarray
    ) -> None:
        self.projection = projection
        self.weights = weights
        self.learned_mask = learned_mask

    @property
    def in_dim(self) -> int:
        """Width of the image embeddings it takes."""
        return self.weights.shape[0] if self.projection is None else self.projection.shape[0]

    @property
    def num_classes(self) -> int:
        """Size C of the global label space."""
        return self.weights.shape[1]

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Raw regression output [B, C] float32."""
        x = as_features(features, self.in_dim).astype(np.float32)
        return hidden_features(x, self.projection) @ self.weights
