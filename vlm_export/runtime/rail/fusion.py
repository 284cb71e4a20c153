"""RAIL-Fusion: zero-shot probabilities, gated by learned classes, mixed with the adapter (spec 4).

p_zs = softmax(logits) with logits = 100 * cos(x, t_c) over ALL class names (plus TCA's
correction for tca+rail). An image is
taken to be from a learned domain iff argmax p_zs is a learned class (set membership on a mask);
then score = (1 - beta) p_zs + beta a, with a the adapter output zeroed on unlearned classes;
otherwise score = p_zs.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from vlm_export.runtime.numerics import softmax
from vlm_export.runtime.rail.inputs import RailError
from vlm_export.runtime.rail.relabel import follow_labels

BETA = 0.8


class Adapter(Protocol):
    """What fusion needs of an adapter (learner or predictor, primal or dual)."""

    learned_mask: np.ndarray

    def predict(self, features: np.ndarray) -> np.ndarray: ...


def fuse(
    logits: np.ndarray,
    adapter_scores: np.ndarray,
    learned_mask: np.ndarray,
    beta: float = BETA,
) -> np.ndarray:
    """Fused scores [B, C] (or [C] for one image) from zero-shot logits and adapter output."""
    logits = np.asarray(logits)
    adapter_scores = np.asarray(adapter_scores)
    learned_mask = np.asarray(learned_mask)
    if logits.ndim not in (1, 2) or adapter_scores.shape != logits.shape:
        raise RailError(
            f"logits and adapter scores must both be [B, C] or [C], got {list(logits.shape)} and "
            f"{list(adapter_scores.shape)}"
        )
    if learned_mask.dtype != bool or learned_mask.shape != logits.shape[-1:]:
        raise RailError(
            f"learned_mask must be bool [{logits.shape[-1]}], got {learned_mask.dtype} "
            f"{list(learned_mask.shape)}"
        )
    if not 0.0 <= beta <= 1.0:
        raise RailError(f"beta must lie in [0, 1], got {beta}")
    dtype = np.result_type(logits.dtype, adapter_scores.dtype, np.float32)
    probs = softmax(logits.astype(dtype, copy=False))
    gated = learned_mask[probs.argmax(axis=-1)][..., None]
    mixed = (1.0 - beta) * probs + beta * np.where(learned_mask, adapter_scores, 0.0)
    return np.where(gated, mixed, probs).astype(dtype, copy=False)


class RailFusion:
    """The pipeline's fusion stage: one frame's final logits [C] and embedding [E] -> scores [C]."""

    def __init__(self, adapter: Adapter, beta: float = BETA) -> None:
        self.adapter = adapter
        self.beta = beta

    def for_labels(self, old: list[tuple[str, str]], new: list[tuple[str, str]]) -> RailFusion:
        """This fusion over label space ``new``, the adapter following its classes by label."""
        adapter = getattr(self.adapter, "to_inference", lambda: self.adapter)()
        return RailFusion(follow_labels(adapter, old, new), self.beta)

    def fused_scores(self, logits: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        """RAIL-Fusion of one frame (the adapter sees the embedding as a batch of one)."""
        scores = self.adapter.predict(np.asarray(embedding)[None])[0]
        return fuse(logits, scores, self.adapter.learned_mask, self.beta)
