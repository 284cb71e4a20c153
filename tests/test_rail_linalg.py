"""Blocked Cholesky solves against numpy.linalg on sizes spanning several blocks."""

import numpy as np
import pytest

from vlm_export.runtime.rail import RailError, linalg


@pytest.mark.parametrize("size", [1, 5, linalg.BLOCK, 2 * linalg.BLOCK + 37])
def test_solves_and_inverse(size):
    rng = np.random.default_rng(size)
    a = rng.normal(size=(size, size))
    matrix = a @ a.T + size * np.eye(size)
    rhs = rng.normal(size=(size, 3))
    factor = linalg.cholesky(matrix, "test matrix")
    np.testing.assert_allclose(linalg.solve_lower(factor, rhs), np.linalg.solve(factor, rhs))
    np.testing.assert_allclose(linalg.solve_upper(factor, rhs), np.linalg.solve(factor.T, rhs))
    np.testing.assert_allclose(linalg.cholesky_solve(factor, rhs), np.linalg.solve(matrix, rhs))
    np.testing.assert_allclose(linalg.cholesky_inverse(factor), np.linalg.inv(matrix), atol=1e-12)


def test_not_positive_definite_is_refused():
    with pytest.raises(RailError, match="my matrix is not positive definite"):
        linalg.cholesky(np.array([[1.0, 2.0], [2.0, 1.0]]), "my matrix")
