"""A RAIL predictor carried over to another label space: each class follows its label."""

from __future__ import annotations

import numpy as np

from vlm_export.core.errors import StateError
from vlm_export.core.labels import Label, describe_change, label_sources
from vlm_export.runtime.rail import dual, primal
from vlm_export.runtime.rail.state import Predictor


def follow_labels(
    predictor: Predictor, old: list[Label], new: list[Label], where: str = "RAIL state"
) -> Predictor:
    """The predictor over label space ``new``: each class keeps the output column (and learned
    flag) of the same label in ``old``; new labels are unlearned (zero column); labels not in
    ``new`` are dropped. StateError when none of its learned classes is left (it no longer fits).
    """
    sources = label_sources(old, new)
    present = np.array([source is not None for source in sources])
    take = np.array([0 if source is None else source for source in sources], dtype=np.int64)
    mask = predictor.learned_mask[take] & present
    learned = int(predictor.learned_mask.sum())
    if learned and not mask.any():
        raise StateError(
            f"{where} no longer fits: none of the {learned} classes it learned is in the "
            f"bundle's classes ({describe_change(old, new)})"
        )
    if isinstance(predictor, primal.PrimalPredictor):
        weights = predictor.weights[:, take] * present.astype(predictor.weights.dtype)
        return primal.PrimalPredictor(predictor.projection, weights, mask)
    coef = predictor.coef[:, take] * present.astype(predictor.coef.dtype)
    return dual.DualPredictor(predictor.features, coef, predictor.gamma, mask)
