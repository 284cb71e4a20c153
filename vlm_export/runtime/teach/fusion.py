"""RAIL-Fusion with the taught predictor: the frame path of a service that is being taught.

The predictor's columns are taught labels; each of the bundle's classes takes the column of the
label equal to its name (taught labels that are no class, and ``unknown``, give no class column).
Scores follow spec/rail.md section 4 (``rail.fusion.fuse``) with a wider gate: the mix
(1 - beta) p_zs + beta a is used when argmax p_zs is a learned class (the spec's gate) OR when
the predictor's own top output over the class columns and ``unknown`` is at least TEACH_GATE. So
a class taught under a name zero-shot cannot read ("line 3 jam") still wins on frames like its
examples, and a frame like the ``unknown`` examples (targets 0 on every class) gets class scores
near (1 - beta) p_zs, below a sensible ``min_score``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlm_export.core.labels import Label
from vlm_export.runtime.numerics import softmax
from vlm_export.runtime.rail.fusion import BETA, fuse
from vlm_export.runtime.rail.inputs import RailError
from vlm_export.runtime.teach.examples import UNKNOWN
from vlm_export.runtime.teach.learner import TeachPredictor

TEACH_GATE = 0.5


def class_columns(taught: Sequence[str], labels: Sequence[Label]) -> np.ndarray:
    """For each class (domain, name), the column of the taught label equal to its name, else -1
    (``unknown`` is never a class's column)."""
    index = {name: column for column, name in enumerate(taught) if name != UNKNOWN}
    return np.array([index.get(name, -1) for _, name in labels], np.int64)


def gate_columns(taught: Sequence[str], columns: np.ndarray) -> np.ndarray:
    """The predictor columns whose output opens the teach gate: the classes' and ``unknown``."""
    gate = np.zeros(len(taught), bool)
    gate[columns[columns >= 0]] = True
    if UNKNOWN in taught:
        gate[list(taught).index(UNKNOWN)] = True
    return gate


def teach_fuse(
    logits: np.ndarray,
    outputs: np.ndarray,
    columns: np.ndarray,
    gates: np.ndarray,
    beta: float = BETA,
    gate: float = TEACH_GATE,
) -> np.ndarray:
    """Fused class scores [B, C] (or [C]) from zero-shot logits [B, C] and the predictor's
    outputs [B, L] (``columns``: ``class_columns``; ``gates``: ``gate_columns``)."""
    logits = np.asarray(logits)
    outputs = np.asarray(outputs)
    if outputs.ndim != logits.ndim or outputs.shape[:-1] != logits.shape[:-1]:
        raise RailError(
            f"logits {list(logits.shape)} and taught outputs {list(outputs.shape)} do not match"
        )
    mask = columns >= 0
    if outputs.shape[-1]:
        scores = np.where(mask, outputs[..., np.maximum(columns, 0)], 0.0)
    else:  # nothing taught yet
        scores = np.zeros(logits.shape, outputs.dtype)
    spec = fuse(logits, scores.astype(logits.dtype, copy=False), mask, beta)
    if not gates.any():
        return spec
    taught_top = np.where(gates, outputs, -np.inf).max(axis=-1) >= gate
    if not taught_top.any():
        return spec
    dtype = spec.dtype
    mixed = (1.0 - beta) * softmax(logits.astype(dtype, copy=False)) + beta * scores
    return np.where(taught_top[..., None], mixed, spec).astype(dtype, copy=False)


class TeachFusion:
    """The pipeline's fusion stage over the bundle's classes with a taught predictor."""

    def __init__(
        self,
        predictor: TeachPredictor,
        labels: Sequence[Label],
        beta: float = BETA,
        gate: float = TEACH_GATE,
    ) -> None:
        self.predictor = predictor
        self.labels = [(str(domain), str(name)) for domain, name in labels]
        self.beta, self.gate = float(beta), float(gate)
        self.columns = class_columns(predictor.labels, self.labels)
        self.gates = gate_columns(predictor.labels, self.columns)

    @property
    def learned_mask(self) -> np.ndarray:
        """[C] bool: the classes that have taught examples."""
        return self.columns >= 0

    def for_labels(self, old: list[Label], new: list[Label]) -> TeachFusion:
        """This fusion over label space ``new`` (classes find their taught label by name)."""
        return TeachFusion(self.predictor, new, self.beta, self.gate)

    def with_predictor(self, predictor: TeachPredictor) -> TeachFusion:
        """This fusion with a newer predictor (the learner's next snapshot)."""
        return TeachFusion(predictor, self.labels, self.beta, self.gate)

    def fused_scores(self, logits: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        """Fused scores [C] of one frame from its final logits [C] and embedding [E]."""
        outputs = self.predictor.predict(np.asarray(embedding)[None])[0]
        return teach_fuse(logits, outputs, self.columns, self.gates, self.beta, self.gate)
