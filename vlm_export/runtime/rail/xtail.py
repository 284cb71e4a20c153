"""X-TAIL protocol and metrics (spec section 1): learn domain after domain, test on all domains.

acc[t, j] is the accuracy on domain j after learning step t, for EVERY t and j (future domains
too). Transfer = mean over j >= 2 (1-indexed) of mean_{t < j} acc[t, j]; Average = mean over j of
mean over all t; Last = mean of the final row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from vlm_export.runtime.rail.fusion import BETA, fuse
from vlm_export.runtime.rail.inputs import RailError


class Learner(Protocol):
    """What the protocol needs of an adapter (PrimalAdapter, DualAdapter)."""

    learned_mask: np.ndarray

    def partial_fit(self, features: np.ndarray, labels: np.ndarray) -> None: ...
    def finalize(self) -> None: ...
    def predict(self, features: np.ndarray) -> np.ndarray: ...


def xtail_metrics(acc: np.ndarray) -> dict[str, float | None]:
    """Transfer, Average and Last of a full [T, T] accuracy table (Transfer is None if T = 1).

    Every cell counts, zeros included; a table with NaN (unfilled) cells is refused.
    """
    table = np.asarray(acc, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] != table.shape[1] or not table.size:
        raise RailError(f"the accuracy table must be square [T, T], got {list(table.shape)}")
    if np.isnan(table).any():
        cells = [list(map(int, cell)) for cell in np.argwhere(np.isnan(table))[:3]]
        raise RailError(f"the accuracy table has unfilled (NaN) cells, e.g. [t, j] = {cells}")
    steps = table.shape[0]
    transfer = None
    if steps > 1:
        transfer = float(np.mean([table[:j, j].mean() for j in range(1, steps)]))
    return {
        "transfer": transfer,
        "average": float(table.mean(axis=0).mean()),
        "last": float(table[-1].mean()),
    }


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax is the label."""
    return float(np.mean(np.argmax(scores, axis=1) == labels))


def run_xtail(
    train: Sequence[tuple[np.ndarray, np.ndarray]],
    test: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    learner: Learner | None = None,
    beta: float = BETA,
) -> np.ndarray:
    """Fill the accuracy table [T, T].

    ``train[t]`` = (features, labels) of domain t; ``test[j]`` = (features, zero-shot logits,
    labels) of domain j; labels are global class indices. Without a learner: zero-shot accuracy.
    """
    if len(train) != len(test):
        raise RailError(f"{len(train)} training domains but {len(test)} test domains")
    table = np.empty((len(train), len(test)))
    for step, (features, labels) in enumerate(train):
        if learner is not None:
            learner.partial_fit(features, labels)
            learner.finalize()
        for domain, (test_features, logits, test_labels) in enumerate(test):
            scores = logits
            if learner is not None:
                adapter = learner.predict(test_features)
                scores = fuse(logits, adapter, learner.learned_mask, beta)
            table[step, domain] = accuracy(scores, test_labels)
    return table
