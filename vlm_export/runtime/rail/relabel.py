"""A RAIL predictor or learner carried over to another label space: each class follows its
label (the bundle's classes changed, ``vlm-edge classes``; its image engine did not)."""

from __future__ import annotations

import numpy as np

from vlm_export.core.errors import StateError
from vlm_export.core.labels import Label, describe_change, label_sources
from vlm_export.runtime.rail import dual, primal

#: a RAIL learner and a RAIL predictor, either route (rail/state.py takes the names from here)
Learner = primal.PrimalAdapter | dual.DualAdapter
Predictor = primal.PrimalPredictor | dual.DualPredictor


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


def _moved_columns(array: np.ndarray, sources: list[int | None], order: str) -> np.ndarray:
    """[d, len(sources)] in ``order``: column j is ``array``'s column ``sources[j]``, zero for
    None; only nonzero columns are copied (the others stay untouched zero pages)."""
    moved = np.zeros((array.shape[0], len(sources)), array.dtype, order=order)
    for column, source in enumerate(sources):
        if source is not None and array[:, source].any():
            moved[:, column] = array[:, source]
    return moved


def follow_learner_labels(
    learner: Learner, old: list[Label], new: list[Label], where: str = "RAIL state"
) -> Learner:
    """The learner over label space ``new``, in place: each class keeps the output column and
    learned flag of its label in ``old``; new labels start unlearned.

    Primal: the samples of a dropped label stay in G (seen data, counted against every class as
    the predictor of ``follow_labels`` does); W and B lose the label's column, so solving again
    gives the kept columns unchanged. Dual: a dropped label that holds samples is refused
    (StateError), since each of its samples names it; the others are renumbered.
    """
    if len(old) != learner.num_classes:
        raise StateError(f"{where} records {len(old)} labels for {learner.num_classes} classes")
    sources = label_sources(old, new)
    mask = np.array([s is not None and bool(learner.learned_mask[s]) for s in sources], bool)
    if isinstance(learner, primal.PrimalAdapter):
        learner.weights = _moved_columns(learner.weights, sources, "F")
        if learner.cross is not None:
            learner.cross = _moved_columns(learner.cross, sources, "F")
        learner.learned_mask = mask
        return learner
    kept = {source for source in sources if source is not None}
    dropped = [old[i][1] for i in np.flatnonzero(learner.learned_mask) if i not in kept]
    if dropped:
        raise StateError(
            f"{where} learned classes the bundle no longer has ({', '.join(dropped[:5])}): a dual "
            "learner keeps every sample with its class; put them back in the bundle's classes "
            "or learn into a new state"
        )
    renumber = np.full(len(old), -1, dtype=np.int64)
    for column, source in enumerate(sources):
        if source is not None:
            renumber[source] = column
    learner.labels = renumber[learner.labels]
    learner.coef = _moved_columns(learner.coef, sources, "C")
    learner.learned_mask = mask
    return learner
