"""Teaching one pipeline in this process (the Python API's ``teach``, ``forget``, ``examples``).

The same store, learner and fusion as ``vlm-edge serve`` teaches with, without threads: each call
learns before it returns. A label that is not a class becomes one of the domain ``taught`` for
this pipeline (its text embedding from the bundle's text engine); the bundle on disk is not
rewritten (``vlm-edge classes`` does that).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.errors import UserError
from vlm_export.runtime.pipeline import Pipeline, utc_now
from vlm_export.runtime.teach.examples import (
    TAUGHT_DOMAIN,
    UNKNOWN,
    Example,
    check_id,
    check_label,
    new_id,
    same_label,
)
from vlm_export.runtime.teach.fusion import TeachFusion
from vlm_export.runtime.teach.learner import DEFAULT_HIDDEN_DIM, TeachLearner
from vlm_export.runtime.teach.store import ExampleStore

log = logging.getLogger(__name__)


class LocalTeaching:
    """Examples taught to ``pipeline``, kept in ``database`` (SQLite; None: in memory)."""

    def __init__(
        self,
        pipeline: Pipeline,
        database: str | Path | None = None,
        hidden_dim: int = DEFAULT_HIDDEN_DIM,
    ) -> None:
        if pipeline.fusion is not None and not isinstance(pipeline.fusion, TeachFusion):
            raise UserError("this pipeline fuses a RAIL state (rail_state): it cannot be taught")
        self.pipeline = pipeline
        bundle = pipeline.bundle
        self.dim = int(bundle.text_embeddings.shape[1])
        self.store = ExampleStore.open(database, bundle.engine_fingerprint, self.dim)
        self._encoder: Any = None
        for label in self.store.counts():  # stored labels are classes (as teaching made them)
            named = same_label(label, self.pipeline.bundle.classes)
            if named != label:
                self.store.relabel(label, named)
                continue
            try:
                self._ensure_class(label)
            except UserError as exc:  # e.g. no text engine: learned, not decided
                log.warning("examples of %r are not decided: %s", label, exc)
        self.learner = TeachLearner.fit(self.store.all(), self.dim, hidden_dim)
        self._install()

    def teach(self, embedding: np.ndarray, label: str, source: str = "") -> Example:
        """Learn one example; it decides the next frames. A label names a class as CLIP reads
        it (``Cat`` is the class ``cat``); one that is no class becomes one."""
        label = same_label(check_label(label), self.pipeline.bundle.classes)
        self._ensure_class(label)
        example = Example(new_id(), label, source, utc_now(), np.asarray(embedding, np.float32))
        self.store.add(example, share=True)
        self.learner.apply(added=[example])
        self._install()
        return example

    def forget(self, example_id: str) -> bool:
        """Unlearn one example exactly; False if it was not stored."""
        if self.store.delete(check_id(example_id), share=True) is None:
            return False
        self.learner.apply(removed=[example_id])
        self._install()
        return True

    def examples(self, label: str | None = None) -> list[Example]:
        """The stored examples, newest first (``label``: only those)."""
        return self.store.page(label=label, limit=max(1, self.store.count()))

    def close(self) -> None:
        """Close the database."""
        self.store.close()

    def _install(self) -> None:
        pipeline = self.pipeline
        if self.learner.num_samples == 0:
            pipeline.fusion = None
        else:
            pipeline.fusion = TeachFusion(self.learner.predictor(), pipeline.bundle.labels)

    def _ensure_class(self, label: str) -> None:
        from vlm_export.runtime.text.encoder import TextEncoder
        from vlm_export.runtime.text.label_space import label_space_for

        bundle = self.pipeline.bundle
        if label == UNKNOWN or label in bundle.classes:
            return
        if self._encoder is None:
            self._encoder = TextEncoder.open(bundle)
        members = [name for domain, name in bundle.labels if domain == TAUGHT_DOMAIN]
        space = label_space_for(bundle, [*members, label], TAUGHT_DOMAIN, None, self._encoder)
        self.pipeline.set_classes(space.names, space.text_embeddings, [d for d, _ in space.labels])
