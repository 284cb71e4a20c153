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


def _spd(size, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(size, size // 2 + 1))
    return a @ a.T  # rank-deficient PSD, like G with fewer samples than d_h


@pytest.mark.parametrize("size", [3, linalg.BLOCK + 5])
def test_in_place_updates_touch_one_triangle_then_mirror(size):
    rng = np.random.default_rng(1)
    matrix, columns = _spd(size), rng.normal(size=(size, 4))
    expected = matrix + 0.5 * columns @ columns.T
    lower_before = np.tril(matrix, -1).copy()
    linalg.rank_update(matrix, columns, 0.5)
    np.testing.assert_allclose(np.triu(matrix), np.triu(expected), rtol=1e-13, atol=1e-12)
    np.testing.assert_array_equal(np.tril(matrix, -1), lower_before)  # untouched
    linalg.mirror(matrix)
    np.testing.assert_allclose(matrix, expected, rtol=1e-13, atol=1e-12)
    np.testing.assert_array_equal(matrix, matrix.T)


@pytest.mark.parametrize("size", [1, 6, linalg.BLOCK + 5])
def test_symmetric_product_reads_the_upper_triangle_only(size):
    rng = np.random.default_rng(2)
    symmetric, rows = _spd(size), rng.normal(size=(5, size))
    stale = symmetric.copy()
    stale[np.tril_indices(size, -1)] = rng.normal(size=size * (size - 1) // 2)  # not mirrored
    before = stale.copy()
    product = linalg.symmetric_product(stale, rows)
    np.testing.assert_allclose(product, symmetric @ rows.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(stale, before)


@pytest.mark.parametrize("size", [4, 2 * linalg.BLOCK + 3])
def test_solve_shifted_restores_the_matrix(size):
    matrix = _spd(size, 2)
    original = matrix.copy()
    rhs = np.random.default_rng(3).normal(size=(size, 5))
    solution = linalg.solve_shifted(matrix, 0.1, rhs, "G + lambda I")
    expected = np.linalg.solve(original + 0.1 * np.eye(size), rhs)
    assert np.abs(solution - expected).max() < 1e-9 * np.abs(expected).max()
    np.testing.assert_array_equal(matrix, original)
    matrix[1, 1] = -50.0  # not positive definite: refused, and still restored
    broken = matrix.copy()
    with pytest.raises(RailError, match="G \\+ lambda I is not positive definite"):
        linalg.solve_shifted(matrix, 0.1, rhs, "G + lambda I")
    np.testing.assert_array_equal(matrix, broken)


@pytest.mark.parametrize("size", [4, 2 * linalg.BLOCK + 3])
def test_factored_solves_into_the_right_hand_side(size):
    matrix = _spd(size, 5)
    original = matrix.copy()
    rhs = np.asfortranarray(np.random.default_rng(6).normal(size=(size, 4)))
    expected = np.linalg.solve(original + 0.1 * np.eye(size), rhs)
    memory = rhs.__array_interface__["data"][0]
    with linalg.factored(matrix, 0.1, "G + lambda I") as factor:
        assert linalg.solve_in_place(factor, rhs)
    assert rhs.__array_interface__["data"][0] == memory  # the same array, solved in place
    assert np.abs(rhs - expected).max() < 1e-9 * np.abs(expected).max()
    np.testing.assert_array_equal(matrix, original)
    with linalg.factored(matrix, 0.1, "G + lambda I") as factor, pytest.raises(ValueError):
        linalg.solve_in_place(factor, np.ascontiguousarray(rhs))  # C order: would be a copy


def test_symmetric_problem_names_what_is_wrong():
    good = _spd(linalg.BLOCK + 9, 4)
    assert linalg.symmetric_problem(good, "G") is None
    cases = {"NaN": (2, 3, np.nan), "negative diagonal": (5, 5, -1.0)}
    for message, (i, j, value) in cases.items():
        bad = good.copy()
        bad[i, j] = value
        assert message in linalg.symmetric_problem(bad, "G")
    bad = good.copy()
    bad[0, 7] += 1.0
    assert "not symmetric" in linalg.symmetric_problem(bad, "G")
    bad[7, 0] += 1.0
    bad[0, 7] = bad[7, 0] = 10 * np.sqrt(bad[0, 0] * bad[7, 7])
    assert "not positive semi-definite" in linalg.symmetric_problem(bad, "G")
    assert linalg.all_finite(good) and not linalg.all_finite(np.array([1.0, np.inf]))
