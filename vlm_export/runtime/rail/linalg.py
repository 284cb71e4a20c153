"""Float64 dense linear algebra for RAIL through SciPy's LAPACK and BLAS, in place where it pays.

Small systems (a Woodbury batch, a dual block) use ``cholesky`` and the triangular solves. The
d x d matrices of the primal learner (G or R, 1.8 GB at d = 15000) are never copied: they are
updated by symmetric rank-k updates on one triangle (``rank_update``, then ``mirror``) and solved
inside ``factored``, which factors G + shift I in place and restores G from the untouched
triangle afterwards (``solve_in_place`` writes the solution over its right-hand side meanwhile).
Those two long calls go through ``released``, so a Ctrl-C is taken at once.
"Upper" below is the upper triangle of the C-ordered NumPy array (the lower triangle of its
Fortran-ordered transpose, which LAPACK sees).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
from scipy.linalg import blas, lapack, solve_triangular

from vlm_export.runtime.rail import released
from vlm_export.runtime.rail.inputs import RailError

BLOCK = 256  # rows per block of the block-wise passes (mirror, finiteness checks)


def cholesky(matrix: np.ndarray, what: str) -> np.ndarray:
    """Lower factor L (L @ L.T == matrix) of a symmetric positive definite matrix (a new array).

    Raises RailError naming ``what`` if the matrix is not positive definite or not finite.
    """
    if not np.isfinite(matrix).all():
        raise RailError(f"{what} has non-finite entries (features too large?)")
    factor, info = lapack.dpotrf(np.asarray(matrix, dtype=np.float64), lower=1, clean=1)
    if info != 0:
        raise RailError(f"{what} is not positive definite (degenerate or huge features)")
    if not np.isfinite(factor).all():
        raise RailError(f"{what} has non-finite entries (features too large?)")
    return factor


def solve_lower(factor: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve L X = rhs for lower-triangular L."""
    return solve_triangular(factor, rhs, lower=True, check_finite=False)


def solve_upper(factor: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve L.T X = rhs for lower-triangular L."""
    return solve_triangular(factor, rhs, lower=True, trans="T", check_finite=False)


def cholesky_solve(factor: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve (L L.T) X = rhs given the lower Cholesky factor L."""
    solution, info = lapack.dpotrs(factor, np.asarray(rhs, dtype=np.float64), lower=1)
    if info != 0:
        raise RailError(f"the Cholesky solve failed (LAPACK info {info})")
    return solution


def cholesky_inverse(factor: np.ndarray) -> np.ndarray:
    """(L L.T)^-1 given the lower Cholesky factor L (LAPACK potri, then the other triangle)."""
    inverse, info = lapack.dpotri(factor, lower=1)
    if info != 0:
        raise RailError(f"the Cholesky inverse failed (LAPACK info {info})")
    inverse = np.ascontiguousarray(inverse)
    mirror(inverse, from_upper=False)
    return inverse


def _square(matrix: np.ndarray) -> np.ndarray:
    """The Fortran view LAPACK works on; the matrix must be C-contiguous float64 and square."""
    if matrix.dtype != np.float64 or not matrix.flags.c_contiguous:
        raise ValueError("expected a C-contiguous float64 matrix")
    return matrix.T


def rank_update(matrix: np.ndarray, columns: np.ndarray, alpha: float) -> None:
    """matrix += alpha * columns @ columns.T on the upper triangle only, in place (BLAS syrk).

    ``columns`` is [d, k]. The lower triangle is left as it was: call ``mirror`` before reading
    the whole matrix.
    """
    result = blas.dsyrk(
        alpha, columns, beta=1.0, c=_square(matrix), trans=0, lower=1, overwrite_c=1
    )
    if not np.shares_memory(result, matrix):  # never expected: a silent copy would lose the update
        raise RuntimeError("BLAS syrk did not update the matrix in place")


def symmetric_product(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """matrix @ rows.T [d, k] for a symmetric matrix of which only the upper triangle is read
    (BLAS symm; no mirror, no d x d temporary). ``rows`` is [k, d]."""
    # Fortran view: (rows @ matrix) [k, d] with the matrix's lower triangle = C's upper
    product = blas.dsymm(1.0, _square(matrix), np.asarray(rows, dtype=np.float64), side=1, lower=1)
    return product.T


def mirror(matrix: np.ndarray, from_upper: bool = True) -> None:
    """Copy one triangle of a square matrix onto the other, block by block (no d x d copy)."""
    size = matrix.shape[0]
    for start in range(0, size, BLOCK):
        stop = min(start + BLOCK, size)
        block = matrix[start:stop, start:stop]
        if from_upper:
            matrix[stop:, start:stop] = matrix[start:stop, stop:].T
            block[...] = np.triu(block) + np.triu(block, 1).T
        else:
            matrix[start:stop, stop:] = matrix[stop:, start:stop].T
            block[...] = np.tril(block) + np.tril(block, -1).T


@contextlib.contextmanager
def factored(matrix: np.ndarray, shift: float, what: str) -> Iterator[np.ndarray]:
    """The Cholesky factor of matrix + shift I, made in place; the matrix is rebuilt on exit.

    The upper triangle must be valid. potrf overwrites it (and the diagonal) with the factor;
    the lower triangle keeps the matrix meanwhile, so on exit, failed or not, ``matrix`` holds
    the same symmetric matrix in full.
    """
    diagonal = matrix.diagonal().copy()
    if not np.isfinite(diagonal).all():
        raise RailError(f"{what} has non-finite entries (NaN or inf on its diagonal)")
    mirror(matrix, from_upper=True)
    view = _square(matrix)
    abandoned = False
    try:
        matrix.flat[:: matrix.shape[0] + 1] += shift
        try:
            info = released.potrf_lower(view)
        except released.Interrupted:
            abandoned = True  # LAPACK factors on, writing the matrix: it cannot be rebuilt
            raise
        if info != 0:
            raise RailError(f"{what} is not positive definite (degenerate, huge or corrupt)")
        yield view
    finally:
        if not abandoned:
            mirror(matrix, from_upper=False)
            matrix.flat[:: matrix.shape[0] + 1] = diagonal


def check_factorable(matrix: np.ndarray, shift: float, what: str) -> None:
    """Raise RailError unless matrix + shift I has a Cholesky factor (found in place, no copy)."""
    with factored(matrix, shift, what):
        pass


def solve_in_place(factor: np.ndarray, rhs: np.ndarray) -> bool:
    """Solve (L L.T) X = rhs given the lower factor L; ``rhs`` (Fortran-contiguous float64 [d, k])
    receives X in place (LAPACK potrs, no copy). Returns whether X is finite."""
    return released.potrs_lower(factor, rhs) == 0 and all_finite(rhs)


def solve_shifted(matrix: np.ndarray, shift: float, rhs: np.ndarray, what: str) -> np.ndarray:
    """Solve (matrix + shift I) X = rhs for a symmetric matrix whose upper triangle is valid.

    Factors in place (LAPACK potrf) and solves (potrs); on return, failed or not, ``matrix``
    holds the same symmetric matrix in full. Raises RailError naming ``what`` if matrix + shift I
    is not positive definite or the solution is not finite.
    """
    with factored(matrix, shift, what) as factor:
        solution, info = lapack.dpotrs(factor, np.asarray(rhs, dtype=np.float64), lower=1)
    if info != 0 or not np.isfinite(solution).all():
        raise RailError(f"{what} gave a non-finite solution (NaN or huge entries)")
    return solution


def all_finite(array: np.ndarray) -> bool:
    """True when every entry is finite, checked by row blocks (no full-size boolean temporary)."""
    rows = array.reshape(len(array), -1) if array.ndim > 1 else array.reshape(-1, 1)
    step = max(1, (BLOCK * BLOCK * 16) // max(1, rows.shape[1]))
    return all(np.isfinite(rows[i : i + step]).all() for i in range(0, len(rows), step))


def symmetric_problem(matrix: np.ndarray, what: str) -> str | None:
    """Why a symmetric positive semi-definite ``matrix`` cannot be one, or None.

    Cheap, block by block, no copy: NaN or inf entries, asymmetry, a negative diagonal entry, or
    a 2 x 2 principal minor below zero (|a_ij| > sqrt(a_ii a_jj)).
    """
    diagonal = matrix.diagonal()
    if not np.isfinite(diagonal).all() or not all_finite(matrix):
        return f"{what} holds NaN or inf entries"
    if (diagonal < 0).any():
        return f"{what} has a negative diagonal entry: it is not positive semi-definite"
    root = np.sqrt(diagonal)
    size = matrix.shape[0]
    for start in range(0, size, BLOCK):
        stop = min(start + BLOCK, size)
        rows = matrix[start:stop]
        scale = np.abs(rows).max(initial=0.0)
        if np.abs(rows - matrix[:, start:stop].T).max(initial=0.0) > 1e-10 * max(scale, 1e-300):
            return f"{what} is not symmetric"
        bound = root[start:stop, None] * root[None, :]
        if (np.abs(rows) > bound * (1 + 1e-9) + 1e-12 * max(scale, 1e-300)).any():
            return f"{what} is not positive semi-definite (|a_ij| > sqrt(a_ii a_jj))"
    return None
