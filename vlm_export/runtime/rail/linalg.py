"""Float64 Cholesky factor, solve and inverse (NumPy has no triangular solve; scipy is not used).

The triangular solves run by blocks: each block of rows subtracts the already-solved part with one
matrix product and solves its small diagonal block, so the cost is that of the products.
"""

from __future__ import annotations

import numpy as np

from vlm_export.runtime.rail.inputs import RailError

BLOCK = 256


def cholesky(matrix: np.ndarray, what: str) -> np.ndarray:
    """Lower factor L (L @ L.T == matrix) of a symmetric positive definite matrix.

    Raises RailError naming ``what`` if the matrix is not positive definite or not finite.
    """
    try:
        factor = np.linalg.cholesky(matrix)
    except np.linalg.LinAlgError:
        raise RailError(f"{what} is not positive definite (degenerate or huge features)") from None
    if not np.isfinite(factor).all():
        raise RailError(f"{what} has non-finite entries (features too large?)")
    return factor


def solve_lower(factor: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve L X = rhs for lower-triangular L (forward substitution by blocks)."""
    solution = np.empty(rhs.shape, dtype=np.float64)
    for start in range(0, factor.shape[0], BLOCK):
        stop = min(start + BLOCK, factor.shape[0])
        block = rhs[start:stop] - factor[start:stop, :start] @ solution[:start]
        solution[start:stop] = np.linalg.solve(factor[start:stop, start:stop], block)
    return solution


def solve_upper(factor: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve L.T X = rhs for lower-triangular L (back substitution by blocks)."""
    size = factor.shape[0]
    solution = np.empty(rhs.shape, dtype=np.float64)
    for stop in range(size, 0, -BLOCK):
        start = max(stop - BLOCK, 0)
        block = rhs[start:stop] - factor[stop:, start:stop].T @ solution[stop:]
        solution[start:stop] = np.linalg.solve(factor[start:stop, start:stop].T, block)
    return solution


def cholesky_solve(factor: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve (L L.T) X = rhs given the lower Cholesky factor L."""
    return solve_upper(factor, solve_lower(factor, rhs))


def cholesky_inverse(factor: np.ndarray) -> np.ndarray:
    """(L L.T)^-1 given the lower Cholesky factor L."""
    inverse_factor = solve_lower(factor, np.eye(factor.shape[0]))
    return inverse_factor.T @ inverse_factor
