"""The primal peak estimate counts exactly the arrays a learner holds, plus one batch."""

import numpy as np
import pytest

from vlm_export.runtime.rail import PrimalAdapter, footprint

IN_DIM, CLASSES = 16, 11


@pytest.mark.parametrize("hidden", [0, 40])
def test_estimate_counts_the_learners_arrays_and_one_batch(hidden):
    learner = PrimalAdapter(IN_DIM, CLASSES, hidden, seed=0)
    rows = learner.feature_dim  # below FIRST_SOLVE_ROWS: the estimate's batch is d rows
    rng = np.random.default_rng(0)
    learner.partial_fit(rng.normal(size=(rows, IN_DIM)), rng.integers(0, CLASSES, rows))
    learner.finalize()
    held = [learner.gram, learner.cross, learner.weights]
    held += [] if learner.projection is None else [learner.projection]
    phi_and_kernel = 8 * rows * (learner.feature_dim + rows)
    arrays = sum(array.nbytes for array in held) + phi_and_kernel
    estimate = footprint.primal_peak_bytes(IN_DIM, CLASSES, hidden)
    assert estimate == arrays + footprint.PROCESS_BYTES  # nothing else of d x d or d x C size
