"""``--min-score auto``: the threshold chosen from leave-one-out predictions of the examples.

Each stored example is scored as a frame by the learner of all the OTHER examples (exact
leave-one-out for ridge regression, ``TeachLearner.loo_predictions``), fused with its zero-shot
logits against the current classes (100 cos, the pipeline's factor) as ``TeachFusion`` does. The
threshold is the smallest that rejects (top score below it) at least ``reject`` of the
``unknown`` examples; what it keeps of the known examples (decided as their label, top score at
or above it) is reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlm_export.core.labels import Label
from vlm_export.runtime.pipeline import LOGIT_FACTOR
from vlm_export.runtime.rail.fusion import BETA
from vlm_export.runtime.teach.examples import UNKNOWN
from vlm_export.runtime.teach.fusion import TEACH_GATE, class_columns, gate_columns, teach_fuse
from vlm_export.runtime.teach.learner import TeachLearner

REJECT = 0.9


@dataclass(frozen=True)
class Calibration:
    """The chosen ``min_score`` (None: no threshold) and what it achieves on the examples."""

    threshold: float | None
    rejected_unknown: float  # share of the unknown examples scored below the threshold
    kept_known: float  # share of the known examples decided right at or above it
    n_unknown: int
    n_known: int
    reason: str

    def describe(self) -> str:
        """One line for the log and the page."""
        chosen = "no --min-score" if self.threshold is None else f"--min-score {self.threshold:.4f}"
        return f"{chosen}: {self.reason}"


def loo_scores(
    learner: TeachLearner,
    labels: Sequence[Label],
    text_embeddings: np.ndarray,
    beta: float = BETA,
    gate: float = TEACH_GATE,
) -> np.ndarray:
    """Fused class scores [N, C] of each example (in ``learner.ids`` order) with itself left
    out of the learner."""
    text = np.asarray(text_embeddings, np.float64)
    logits = LOGIT_FACTOR * (learner.embeddings.astype(np.float64) @ text.T)
    columns = class_columns(learner.labels, labels)
    gates = gate_columns(learner.labels, columns)
    return teach_fuse(logits, learner.loo_predictions(), columns, gates, beta, gate)


def calibrate(
    learner: TeachLearner,
    labels: Sequence[Label],
    text_embeddings: np.ndarray,
    fallback: float | None,
    reject: float = REJECT,
    beta: float = BETA,
    gate: float = TEACH_GATE,
) -> Calibration:
    """The smallest threshold that rejects at least ``reject`` of the unknown examples
    (leave-one-out); ``fallback`` when there are no unknown examples."""
    if not 0.0 < reject <= 1.0:
        raise ValueError(f"reject must lie in (0, 1], got {reject}")
    names = [name for _, name in labels]
    unknown = np.array([label == UNKNOWN for label in learner.example_labels], bool)
    n_unknown, n_known = int(unknown.sum()), int((~unknown).sum())
    if not n_unknown:
        return Calibration(
            fallback, 0.0, 0.0, 0, n_known, "no unknown examples to choose from (kept as given)"
        )
    scores = loo_scores(learner, labels, text_embeddings, beta, gate)
    top = scores.max(axis=1)
    decided = [names[column] for column in scores.argmax(axis=1)]
    needed = math.ceil(reject * n_unknown - 1e-9)
    ordered = np.sort(top[unknown])
    threshold = float(np.nextafter(ordered[needed - 1], np.inf))  # strictly above the needed-th
    capped = threshold > 1.0
    threshold = min(threshold, 1.0)
    rejected = int((top[unknown] < threshold).sum())
    right = np.array([d == label for d, label in zip(decided, learner.example_labels, strict=True)])
    kept = int((right & (top >= threshold) & ~unknown).sum())
    keeps = f"keeps {kept}/{n_known} known ({kept / n_known:.0%})" if n_known else "no known"
    reason = (
        f"rejects {rejected}/{n_unknown} unknown examples ({rejected / n_unknown:.0%}), "
        f"{keeps}, leave-one-out"
    )
    if capped:
        reason += f"; {reject:.0%} of the unknown examples cannot be rejected (scores above 1)"
    return Calibration(
        threshold,
        rejected / n_unknown,
        kept / n_known if n_known else 0.0,
        n_unknown,
        n_known,
        reason,
    )
