"""What the pipeline decided for one frame: the record every consumer of a decision reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: the decision reported when the best score is below ``min_score``: no class of the label space
UNKNOWN_LABEL = -1
UNKNOWN_CLASS = "unknown"


@dataclass(frozen=True)
class FrameResult:
    """What the pipeline decided for one frame, with per-stage timings in milliseconds.

    ``embedding`` is the engine's image embedding [E] that the logits were computed from.
    ``token_fate`` [R, P] int8 is each original patch's fate at every reduction block
    (``vlm_export.core.manifest.TOKEN_FATE`` codes; ``vlm_export.runtime.draw`` draws it), None
    for a full tower. ``time_utc`` is the wall-clock time of the decision (ISO 8601, UTC). A
    decision below the pipeline's ``min_score`` is unknown: ``label`` is ``UNKNOWN_LABEL`` (-1),
    ``class_name`` ``"unknown"`` and ``domain`` empty, with ``topk`` and ``scores`` kept.
    ``drop_rate`` is the rung that ran, for a ladder of budgets (else None).
    """

    index: int
    source: str
    label: int
    class_name: str
    domain: str
    topk: list[tuple[int, str, float]]
    scores: np.ndarray
    logits: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    embedding: np.ndarray | None = None
    token_fate: np.ndarray | None = None
    time_utc: str = ""
    drop_rate: float | None = None

    @property
    def score(self) -> float:
        """The reported score of the best class (also when the decision is unknown)."""
        return float(self.scores.max())

    @property
    def unknown(self) -> bool:
        """True when the best score was below the pipeline's ``min_score``."""
        return self.label == UNKNOWN_LABEL

    def to_record(self) -> dict[str, Any]:
        """A JSON-serialisable record (one line of ``vlm-edge run`` output)."""
        return {
            "index": self.index,
            "source": self.source,
            "label": self.label,
            "class": self.class_name,
            "domain": self.domain,
            "topk": [{"index": i, "class": name, "score": round(s, 6)} for i, name, s in self.topk],
            "timings_ms": {name: round(ms, 3) for name, ms in self.timings.items()},
            "time_utc": self.time_utc,
            **({} if self.drop_rate is None else {"drop_rate": self.drop_rate}),
        }
