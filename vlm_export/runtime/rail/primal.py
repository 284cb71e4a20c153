"""Primal RAIL: ridge regression on a fixed random ReLU layer, updated exactly (spec section 2).

phi(x) = ReLU(x @ W_r) with W_r ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) drawn from a recorded seed
(hidden_dim = 0: phi(x) = x). W = (G + lambda I)^-1 B with G = sum phi^T phi, B = sum phi^T Y over
every sample seen, so any split of the data into domains or batches gives the joint solution.
Two exact routes keep it: "cholesky" accumulates G and B (additive, so states merge) and solves
when asked; "woodbury" keeps R = (G + lambda I)^-1 and W current after every batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np

from vlm_export.runtime.rail.inputs import (
    RailError,
    as_features,
    as_labels,
    check_new_class_count,
    column_targets,
)
from vlm_export.runtime.rail.linalg import (
    all_finite,
    cholesky,
    factored,
    mirror,
    rank_update,
    solve_in_place,
    solve_lower,
    solve_shifted,
    solve_upper,
    symmetric_product,
)

T = TypeVar("T")

HIDDEN_DIM = 15000
RIDGE = 0.1
ROUTES = ("cholesky", "woodbury")
CHUNK_ROWS = 1024  # samples per step of a large batch (phi of one step: CHUNK_ROWS x d_h floats)
FIRST_SOLVE_ROWS = 2048  # a fresh learner's batch up to this size is solved in sample space


def random_projection(in_dim: int, hidden_dim: int, seed: int) -> np.ndarray:
    """W_r [in_dim, hidden_dim] float64, uniform in +-1/sqrt(in_dim), from ``seed``."""
    bound = 1.0 / np.sqrt(in_dim)
    return np.random.default_rng(seed).uniform(-bound, bound, size=(in_dim, hidden_dim))


def hidden_features(features: np.ndarray, projection: np.ndarray | None) -> np.ndarray:
    """phi(x) = ReLU(x @ W_r), or x itself without a random layer (the ReLU in place)."""
    if projection is None:
        return features
    product = features @ projection
    return np.maximum(product, 0, out=product)


def column_copy(array: np.ndarray, columns: int, dtype: type = np.float64) -> np.ndarray:
    """``array`` [d, C] as a new Fortran-ordered [d, columns >= C] array of ``dtype``, zero
    columns appended; only its nonzero columns are copied (the others stay untouched zero
    pages)."""
    copy = np.zeros((array.shape[0], columns), dtype, order="F")
    for column in np.flatnonzero(array.any(axis=0)):
        copy[:, column] = array[:, column]
    return copy


def _column_run(columns: np.ndarray) -> slice | None:
    """``columns`` (ascending) as a slice when they are consecutive, else None."""
    if len(columns) and columns[-1] - columns[0] == len(columns) - 1:
        return slice(int(columns[0]), int(columns[-1]) + 1)
    return None


def columns_of(array: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """array[:, columns]: a view for consecutive columns, else a copy (taken as rows of the
    transpose: whole contiguous columns of W's column order)."""
    run = _column_run(columns)
    return array[:, run] if run is not None else array.T[columns].T


def add_to_columns(array: np.ndarray, columns: np.ndarray, rows: np.ndarray) -> None:
    """array[:, columns[i]] += rows[i] in place (``rows`` [k, d]): one product-sized add for
    consecutive columns, else column by column (contiguous in W's column order)."""
    run = _column_run(columns)
    if run is not None:
        array[:, run] += rows.T
        return
    for row, column in zip(rows, columns, strict=True):
        array[:, column] += row


def _changing(method: Callable[..., T]) -> Callable[..., T]:
    """A method that changes a learner's arrays: refused once a change was interrupted, and a
    Ctrl-C inside it (an update stopped half-way, LAPACK still writing G or W on its thread)
    leaves the learner refusing every use."""

    @functools.wraps(method)
    def changing(self: PrimalAdapter, *args: Any, **kwargs: Any) -> T:
        self._check_whole()
        try:
            return method(self, *args, **kwargs)
        except KeyboardInterrupt:
            self._interrupted = True
            raise

    return changing


class PrimalAdapter:
    """Primal RAIL learner over a global label space of ``num_classes`` classes.

    Attributes: ``projection`` (W_r, None when hidden_dim is 0), ``weights`` (W [d, C] float64),
    ``gram`` and ``cross`` (G, B; cholesky route) or ``inverse`` (R; woodbury route),
    ``learned_mask`` ([C] bool, classes seen in training), ``num_samples``, ``solved`` (W is
    current with G and B).

    The d x d matrix (G or R) is the only one of its size: updates touch its upper triangle in
    place (BLAS syrk), and ``gram`` / ``inverse`` copy that triangle onto the other, in place,
    when read. W and B are Fortran-ordered (a class is one contiguous column) and start as
    untouched zero pages: only the columns of classes seen are ever written, so the columns of
    classes never learned take no memory, and ``finalize`` solves into W's own memory.
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
        matrix: bool = True,
    ) -> None:
        """Start an empty learner; ``projection`` replaces the draw from ``seed`` (state files).

        ``matrix=False`` leaves G or R unallocated (a loader assigns it next).
        """
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
        self.weights = np.zeros((dim, num_classes), order="F")
        self.learned_mask = np.zeros(num_classes, dtype=bool)
        self.num_samples = 0
        self.solved = True
        self.cross: np.ndarray | None = (
            np.zeros((dim, num_classes), order="F") if route == "cholesky" else None
        )
        self._matrix: np.ndarray | None = None  # G or R; upper triangle current
        self._mirrored = True  # the lower triangle equals the upper
        self._interrupted = False  # a Ctrl-C stopped a change half-way (see ``_changing``)
        if matrix:
            self._matrix = np.zeros((dim, dim))
            if route == "woodbury":  # R = I / lambda, without a second d x d array (np.eye)
                np.fill_diagonal(self._matrix, 1.0 / self.ridge)

    def _check_whole(self) -> None:
        """RailError once a Ctrl-C stopped a change (G, B or W are not whole any more)."""
        if self._interrupted:
            raise RailError(
                "this learner was interrupted (Ctrl-C) while it learned or solved: its "
                "statistics are not whole; load its state file again"
            )

    def _full(self, route: str) -> np.ndarray | None:
        self._check_whole()
        if self.route != route or self._matrix is None:
            return None
        if not self._mirrored:
            mirror(self._matrix, from_upper=True)
            self._mirrored = True
        return self._matrix

    def _set(self, route: str, value: np.ndarray) -> None:
        if self.route != route:
            raise RailError(
                f"a {self.route}-route learner has no {'G' if route == 'cholesky' else 'R'}"
            )
        self._matrix, self._mirrored = value, True

    @property
    def gram(self) -> np.ndarray | None:
        """G = sum phi^T phi [d, d] (cholesky route; None on the woodbury route)."""
        return self._full("cholesky")

    @gram.setter
    def gram(self, value: np.ndarray) -> None:
        self._set("cholesky", value)

    @property
    def inverse(self) -> np.ndarray | None:
        """R = (G + lambda I)^-1 [d, d] (woodbury route; None on the cholesky route)."""
        return self._full("woodbury")

    @inverse.setter
    def inverse(self, value: np.ndarray) -> None:
        self._set("woodbury", value)

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
        self.weights = column_copy(self.weights, num_classes)
        if self.cross is not None:
            self.cross = column_copy(self.cross, num_classes)
        self.learned_mask = np.pad(self.learned_mask, (0, num_classes - len(self.learned_mask)))

    def partial_fit(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Learn a batch: features [N, in_dim], labels [N] global class indices.

        Large batches are taken CHUNK_ROWS samples at a time (the same result: updates are
        exact). On RailError (bad input, an update that would not be finite) the learner is
        unchanged, except that the woodbury route keeps the chunks learned before a failing one.
        """
        self._learn(features, labels, first_solve=True)

    def accumulate(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Add a batch to G and B only (cholesky route; W is solved by ``finalize``).

        For learners whose statistics are summed elsewhere (shards, Ray workers).
        """
        if self.route != "cholesky":
            raise RailError("accumulate needs the cholesky route (statistics G and B)")
        self._learn(features, labels, first_solve=False)

    @_changing
    def accumulate_unlabelled(self, features: np.ndarray) -> None:
        """Add samples whose targets are 0 on every class (taught ``unknown`` examples) to G
        (cholesky route; W is solved by ``finalize``). The learner is unchanged on RailError."""
        if self.route != "cholesky":
            raise RailError("samples without a class need the cholesky route (statistics G, B)")
        x = as_features(features, self.in_dim)
        if not len(x):
            return
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked and refused
            self._check_growth(x, None)
            for start in range(0, len(x), CHUNK_ROWS):
                phi = np.ascontiguousarray(
                    hidden_features(x[start : start + CHUNK_ROWS], self.projection)
                )
                rank_update(self._matrix, phi.T, 1.0)  # G += phi^T phi, upper triangle
                self._mirrored = False
        self.num_samples += len(x)
        self.solved = False

    @_changing
    def add_statistics(
        self,
        gram_blocks: Iterable[tuple[int, np.ndarray]],
        cross: np.ndarray,
        learned_mask: np.ndarray,
        num_samples: int,
    ) -> None:
        """Add another learner's statistics on the same W_r: G as (first row, rows) blocks.

        G and B are sums over samples, so the result is the learner of both sample sets.
        """
        target = self.gram
        for start, block in gram_blocks:
            target[start : start + len(block)] += block
        for column in np.flatnonzero(cross.any(axis=0)):  # the others add zero: left untouched
            self.cross[:, column] += cross[:, column]
        self.learned_mask |= learned_mask
        self.num_samples += int(num_samples)
        self.solved = False

    @_changing
    def _learn(self, features: np.ndarray, labels: np.ndarray, first_solve: bool) -> None:
        x = as_features(features, self.in_dim)
        y = as_labels(labels, x.shape[0], self.num_classes)
        if not len(y):
            return
        first = (
            first_solve
            and self.route == "cholesky"
            and self.num_samples == 0
            and not self.cross.any()
        )
        active = self.learned_mask.copy()  # columns of W that may be nonzero after this batch
        active[y] = True
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked and refused
            limit = FIRST_SOLVE_ROWS if first else CHUNK_ROWS
            whole = hidden_features(x, self.projection) if len(y) <= limit else None
            self._check_growth(x, whole)
            # W is written first: once _check_growth passed, accumulating cannot fail
            solved = first and whole is not None and self._first_solve(whole, y)
            for start in range(0, len(y), CHUNK_ROWS):
                rows = slice(start, start + CHUNK_ROWS)
                phi = (
                    whole[rows] if whole is not None else hidden_features(x[rows], self.projection)
                )
                phi = np.ascontiguousarray(phi)
                if self.route == "cholesky":
                    self._accumulate(phi, y[rows])
                else:
                    self._woodbury_update(phi, y[rows], active)
        if solved:
            self.solved = True
        self.learned_mask[y] = True
        self.num_samples += len(y)

    def _check_growth(self, x: np.ndarray, whole: np.ndarray | None) -> None:
        # G stays PSD, so |G_ij| <= sqrt(G_ii G_jj): a finite diagonal means a finite G.
        diagonal = self._matrix.diagonal().copy() if self.route == "cholesky" else 0.0
        for start in range(0, len(x), CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            phi = whole[rows] if whole is not None else hidden_features(x[rows], self.projection)
            diagonal = diagonal + np.einsum("ij,ij->j", phi, phi)
        if not np.isfinite(diagonal).all():
            raise RailError("the statistics G would overflow (features far too large)")

    def _first_solve(self, phi: np.ndarray, labels: np.ndarray) -> bool:
        """Set W of a learner whose G and B are zero by W = Phi^T (Phi Phi^T + lambda I)^-1 Y.

        The same W as (Phi^T Phi + lambda I)^-1 Phi^T Y (push-through identity), with an N x N
        system instead of d x d: used when N <= d / 2 (and N <= FIRST_SOLVE_ROWS, phi of every
        sample at once); False (W unchanged) when it does not pay. The kernel is factored in
        place and the batch's classes' columns of W are computed in W's own memory (the others
        zero); a non-finite result raises RailError with W zero.
        """
        if len(phi) > self.feature_dim // 2:
            return False
        columns = np.unique(labels)
        targets = column_targets(labels, columns)
        coef = solve_shifted(phi @ phi.T, self.ridge, targets, "Phi Phi^T + lambda I")
        self._zero_columns_but()
        packed = self.weights[:, : len(columns)]
        np.matmul(coef.T, phi, out=packed.T)  # packed.T is C-ordered: BLAS, no temporary
        if not all_finite(packed):
            packed[...] = 0.0
            raise RailError("the ridge solve gave non-finite weights")
        self._unpack(columns)
        return True

    def _zero_columns_but(self, keep: np.ndarray | None = None) -> None:
        """Zero every nonzero column of W that is not in ``keep`` (every one without it)."""
        stale = self.weights.any(axis=0)
        if keep is not None:
            stale[keep] = False
        self.weights[:, np.flatnonzero(stale)] = 0.0

    def _accumulate(self, phi: np.ndarray, labels: np.ndarray) -> None:
        rank_update(self._matrix, phi.T, 1.0)  # G += phi^T phi, upper triangle
        self._mirrored = False
        for column in np.unique(labels):  # B += phi^T Y, the batch's classes' columns only
            self.cross[:, column] += phi[labels == column].sum(axis=0)
        self.solved = False

    def _woodbury_update(self, phi: np.ndarray, labels: np.ndarray, active: np.ndarray) -> None:
        # U = R X^T; R <- R - U S^-1 U^T with S = I_b + X U = L L^T, applied as V V^T with
        # V = U L^-T; W <- W + R_new X^T (Y - X W) where R_new X^T = U S^-1 = V L^-1.
        # Every product is d x b or smaller: U by symm and the in-place d x d downdate by syrk,
        # both on R's upper triangle (never mirrored between updates): O(d^2 b), no d x d
        # temporary. Columns of W of classes not ``active`` (neither learned nor in the batch)
        # stay zero: skipped.
        u = symmetric_product(self._matrix, phi)
        system = np.eye(len(phi)) + phi @ u
        factor = cholesky(system, "the Woodbury system I + X R X^T")
        v = solve_lower(factor, u.T).T
        gain = solve_upper(factor, v.T).T
        columns = np.flatnonzero(active)
        residual = column_targets(labels, columns) - phi @ columns_of(self.weights, columns)
        step = residual.T @ gain.T  # [k, d]: row i is added to W's column columns[i]
        if not (np.isfinite(v).all() and np.isfinite(step).all()):
            raise RailError("the Woodbury update is not finite (features far too large)")
        rank_update(self._matrix, v, -1.0)
        self._mirrored = False
        add_to_columns(self.weights, columns, step)

    @_changing
    def finalize(self) -> None:
        """Solve W = (G + lambda I)^-1 B by Cholesky if G or B changed (woodbury: nothing to do).

        In place, no second d x d or d x C array: G is factored in its own memory and rebuilt
        afterwards; the columns of B that hold data are copied into W's leading columns, solved
        there (LAPACK potrs) and moved to their places; the others give zero columns of W exactly.
        A factorisation that fails raises RailError and keeps the previous W; a solution that is
        not finite (not expected of a finite positive definite system) raises RailError with W
        zero and ``solved`` False.
        """
        if self.solved:
            return
        columns = np.flatnonzero(self.cross.any(axis=0))
        if len(columns):
            self._solve_into_weights(columns)
        self._unpack(columns)
        self.solved = True

    def _solve_into_weights(self, columns: np.ndarray) -> None:
        """W's leading len(columns) columns <- (G + lambda I)^-1 B[:, columns], in place."""
        packed = self.weights[:, : len(columns)]
        with factored(self._matrix, self.ridge, "G + lambda I") as factor:
            for index, column in enumerate(columns):
                packed[:, index] = self.cross[:, column]
            finite = solve_in_place(factor, packed)
        self._mirrored = True  # factored leaves the matrix whole
        if not finite:
            self._zero_columns_but()
            raise RailError("G + lambda I gave a non-finite solution (NaN or huge entries)")

    def _unpack(self, columns: np.ndarray) -> None:
        """Move W's leading columns to ``columns`` (ascending), zeroing every other column.

        Column i goes to columns[i] >= i, last first, so no column is overwritten before it moved.
        """
        for index in range(len(columns) - 1, -1, -1):
            if columns[index] != index:
                self.weights[:, columns[index]] = self.weights[:, index]
        self._zero_columns_but(columns)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Raw regression output [B, C] float64 (solves first if statistics changed)."""
        x = as_features(features, self.in_dim)
        self.finalize()
        return hidden_features(x, self.projection) @ self.weights

    def to_inference(self) -> PrimalPredictor:
        """The predict-only form: W_r and W in float32, the learned mask (no G, B or R)."""
        self.finalize()
        projection = None if self.projection is None else self.projection.astype(np.float32)
        weights = column_copy(self.weights, self.num_classes, np.float32)
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
