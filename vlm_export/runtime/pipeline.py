"""The per-frame pipeline: preprocess -> engine -> zero-shot logits -> adaptation -> decision.

A method is a choice of stages, not a separate code path: ``zeroshot`` runs none (a condensing
engine gets all-zero anchors, i.e. ordinary attention), ``tca`` adds the TCA stage (reservoir
update, anchors pushed to the engine when they changed, logit correction).
A ``fusion`` stage (RAIL) may follow: it turns the final logits and the embedding into the reported
scores. Without fusion the reported scores are the softmax of the final logits. ``rail`` and
``tca+rail`` are ``zeroshot`` and ``tca`` with the fusion stage required.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from vlm_export.core.errors import BundleError, UserError
from vlm_export.core.json_text import dumps, name_fields
from vlm_export.core.labels import label_sources
from vlm_export.core.manifest import ANCHORS_INPUT, CLS_OUTPUT, EMBEDDING_OUTPUT, FATE_OUTPUT
from vlm_export.core.option_names import option
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.base import EngineBackend
from vlm_export.runtime.io.preprocess import ImageError, Preprocessor
from vlm_export.runtime.io.sources import Frame
from vlm_export.runtime.numerics import softmax, unit_rows
from vlm_export.runtime.result import UNKNOWN_CLASS, UNKNOWN_LABEL, FrameResult
from vlm_export.runtime.tca.reservoir import TokenReservoir
from vlm_export.runtime.tca.stage import TcaStage, build_reservoir, save_reservoir
from vlm_export.runtime.text.class_lists import check_class_names, is_domain_name, prompt_key


@dataclass(frozen=True)
class Stages:
    """The stages a method runs after the zero-shot logits."""

    tca: bool = False
    fusion: bool = False


METHOD_STAGES = {
    "zeroshot": Stages(),
    "tca": Stages(tca=True),
    "rail": Stages(fusion=True),
    "tca+rail": Stages(tca=True, fusion=True),
}
METHODS = tuple(METHOD_STAGES)

#: fixed zero-shot logit factor of the spec (not the model's logit_scale)
LOGIT_FACTOR = 100.0
FrameInput = Image.Image | np.ndarray | str | Path


class FrameError(UserError):
    """One frame could not be classified (a non-finite engine output); the run can go on."""


class Fusion(Protocol):
    """A stage after the logits (RAIL-Fusion): final logits [C] + embedding [E] -> scores [C]."""

    def fused_scores(self, logits: np.ndarray, embedding: np.ndarray) -> np.ndarray: ...

    def for_labels(self, old: list[tuple[str, str]], new: list[tuple[str, str]]) -> Fusion:
        """The same stage over label space ``new`` (rows follow their (domain, name) label)."""
        ...


class Pipeline:
    """Composes preprocess, engine, logits, the optional TCA stage and fusion, per frame."""

    def __init__(
        self,
        bundle: Bundle,
        backend: EngineBackend,
        method: str = "zeroshot",
        reservoir: TokenReservoir | None = None,
        fusion: Fusion | None = None,
        topk: int = 5,
        min_score: float | None = None,
        crop: str | None = None,
    ) -> None:
        if method not in METHOD_STAGES:
            raise UserError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
        stages = METHOD_STAGES[method]
        if stages.fusion and fusion is None:
            raise UserError(f"method {method} needs a RAIL fusion stage (a learned RAIL state)")
        if topk < 1:
            raise UserError(f"{option('topk')} must be at least 1, got {topk}")
        batch = int(bundle.manifest["engine"]["batch_size"])
        if batch != 1:
            raise BundleError(
                f"the per-frame pipeline needs a batch-1 engine; this one has {batch}"
            )
        self.bundle = bundle
        self.backend = backend
        self.method = method
        self.min_score = check_min_score(min_score)
        self._topk = topk
        self.topk = min(topk, bundle.num_classes)
        self.preprocessor = Preprocessor.from_manifest(bundle.manifest, crop)
        self.fusion = fusion
        self.tca: TcaStage | None = None
        if reservoir is not None and not stages.tca:
            raise UserError(f"a reservoir needs method tca or tca+rail, not {method}")
        if stages.tca:
            if reservoir is None:
                reservoir = build_reservoir(bundle)
            shape = (reservoir.num_classes, reservoir.anchor_rows)
            if shape != (bundle.num_classes, bundle.class_capacity):
                raise UserError(
                    f"the reservoir has {shape[0]} classes and {shape[1]} anchor rows; the bundle "
                    f"has {bundle.num_classes} classes and class capacity {bundle.class_capacity} "
                    "(make it with build_reservoir)"
                )
            self.tca = TcaStage(reservoir, backend)
        elif ANCHORS_INPUT in bundle.engine_io("inputs"):
            shape = [int(v) for v in bundle.engine_io("inputs")[ANCHORS_INPUT]["shape"]]
            backend.set_anchors(np.zeros(shape, np.float32), np.zeros(shape[0], np.float32))
        self._text_t = np.ascontiguousarray(bundle.text_embeddings.T)
        self._normalize = not bundle.manifest["engine"].get("embedding_normalized", True)

    @property
    def reservoir(self) -> TokenReservoir | None:
        """The TCA reservoir, or None for methods without one."""
        return self.tca.reservoir if self.tca else None

    def save_state(self, path: str | Path) -> None:
        """Save the adaptation state (the reservoir) atomically; UserError if there is none."""
        if self.tca is None:
            raise UserError(f"method {self.method} keeps no state to save")
        save_reservoir(self.tca.reservoir, path, self.bundle)

    def set_classes(
        self,
        names: Sequence[str],
        text_embeddings: np.ndarray,
        domains: Sequence[str] | None = None,
    ) -> None:
        """Classify with another label space from the next frame on (call between two frames).

        ``names`` [C] and ``text_embeddings`` [C, E] (e.g. from the text engine; rows are
        L2-normalised here) row by row; ``domains`` gives each class's domain (default: the
        bundle's domain, when it has just one). Adaptation follows the labels (domain, name):
        the TCA reservoir keeps the entries of kept classes, new classes start empty, removed
        ones are dropped; a RAIL fusion stage keeps predicting for its classes still present and
        refuses (StateError) when none of them is left. Bad names or embeddings, or more classes
        than the engine's capacity, are a UserError. Nothing changes when this raises.
        """
        names = check_class_names(names, "set_classes")
        self.bundle.check_capacity(len(names))
        if domains is None:
            if len(self.bundle.domains) != 1:
                raise UserError(
                    f"the bundle has domains {', '.join(self.bundle.domains)}: give each class's "
                    "domain"
                )
            domains = self.bundle.domains * len(names)
        if isinstance(domains, str) or len(domains) != len(names):
            raise UserError(f"give one domain per class: {len(domains)} for {len(names)} classes")
        for domain in domains:
            if not is_domain_name(domain):
                raise UserError(
                    f"domain {domain!r} is not a domain name (letters, digits, '_', '-' and '.')"
                )
        labels = list(zip(domains, names, strict=True))
        seen: set[tuple[str, str]] = set()
        for domain, name in labels:
            key = (domain, prompt_key(name))  # one class per prompt CLIP reads, per domain
            if key in seen:
                raise UserError(f"class {name!r} is given twice in domain {domain!r}")
            seen.add(key)
        text = unit_rows(text_embeddings, len(names), self.bundle.text_embeddings.shape[1])
        order = list(dict.fromkeys(domain for domain, _ in labels))
        bundle = self.bundle.with_classes(labels, text, order)
        old = self.bundle.labels
        tca = fusion = None
        if self.tca is not None:
            reservoir = self.tca.reservoir.select_classes(label_sources(old, labels))
        if self.fusion is not None:
            fusion = self.fusion.for_labels(old, labels)
        if self.tca is not None:
            tca = TcaStage(reservoir, self.backend)  # pushes the new anchors to the engine
        self.bundle, self.tca, self.fusion = bundle, tca, fusion
        self.topk = min(self._topk, bundle.num_classes)
        self._text_t = np.ascontiguousarray(bundle.text_embeddings.T)

    def process(
        self, frame: FrameInput, index: int = 0, source: str = "", adapt: bool = True
    ) -> FrameResult:
        """Run one frame: a PIL image, a BGR uint8 array (OpenCV) or an image path.

        ``adapt=False`` decides with the adaptation state as it is, without adding this frame
        to the reservoir (a look that changes nothing). Raises ImageError for an unreadable
        image file (nothing else has happened then).
        """
        start = time.perf_counter()
        tensor = self.preprocessor.convert(frame)[None]
        timings = {"preprocess": _ms(start)}
        return self._run(tensor, index, source, start, timings, adapt)

    def process_tensor(self, tensor: np.ndarray, index: int = 0, source: str = "") -> FrameResult:
        """Run one already preprocessed frame [3, H, W] or [1, 3, H, W] float32."""
        start = time.perf_counter()
        tensor = np.asarray(tensor, dtype=np.float32).reshape(1, 3, *self.preprocessor.size)
        return self._run(tensor, index, source, start, {"preprocess": 0.0})

    def _run(
        self,
        tensor: np.ndarray,
        index: int,
        source: str,
        start: float,
        timings: dict[str, float],
        adapt: bool = True,
    ) -> FrameResult:
        mark = time.perf_counter()
        drop_rate = getattr(self.backend, "drop_rate", None)  # the rung this frame runs on
        outputs = self.backend.infer(tensor)
        timings["engine"] = _ms(mark)
        embedding = outputs[EMBEDDING_OUTPUT][0]
        if not np.isfinite(embedding).all():
            raise FrameError(f"the engine returned a non-finite embedding for frame {index}")
        if self._normalize:
            embedding = embedding / np.linalg.norm(embedding)
        logits = np.float32(LOGIT_FACTOR) * (embedding @ self._text_t)
        if self.tca is not None:
            cls_stack = outputs[CLS_OUTPUT][0]
            if not np.isfinite(cls_stack).all():  # would poison the reservoir for good
                raise FrameError(f"the engine returned non-finite CLS tokens for frame {index}")
            if adapt:
                mark = time.perf_counter()
                self.tca.update(logits, cls_stack)
                timings["reservoir"] = _ms(mark)
            mark = time.perf_counter()
            logits = logits + self.tca.correction(cls_stack)
            timings["correction"] = _ms(mark)
        if self.fusion is not None:
            mark = time.perf_counter()
            scores = np.asarray(self.fusion.fused_scores(logits, embedding), dtype=np.float32)
            timings["fusion"] = _ms(mark)
        else:
            scores = softmax(logits.astype(np.float64)).astype(np.float32)
        label = int(np.argmax(scores))
        order = np.argsort(-scores, kind="stable")[: self.topk]
        classes = self.bundle.classes
        fate = outputs.get(FATE_OUTPUT)
        timings["total"] = _ms(start)
        result = FrameResult(
            index=index,
            source=source,
            label=label,
            class_name=classes[label],
            domain=self.bundle.class_domains[label],
            topk=[(int(i), classes[i], float(scores[i])) for i in order],
            scores=scores,
            logits=logits,
            timings=timings,
            embedding=embedding,
            token_fate=None if fate is None else fate[0].astype(np.int8),
            time_utc=utc_now(),
            drop_rate=drop_rate,
        )
        if self.min_score is not None and result.score < self.min_score:
            return replace(result, label=UNKNOWN_LABEL, class_name=UNKNOWN_CLASS, domain="")
        return result


def check_min_score(min_score: float | None) -> float | None:
    """``min_score`` if it is a number in [0, 1] (or None); UserError otherwise."""
    if min_score is None:
        return None
    if isinstance(min_score, bool) or not isinstance(min_score, int | float):
        raise UserError(f"min_score must be a number from 0 to 1, got {type(min_score).__name__}")
    if not 0.0 <= float(min_score) <= 1.0:  # also refuses NaN
        raise UserError(f"{option('min_score')} must be from 0 to 1 (a score), got {min_score:g}")
    return float(min_score)


def utc_now() -> str:
    """The current wall-clock time as ISO 8601 in UTC with milliseconds (``...T12:00:00.000Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def process_frame(pipeline: Pipeline, frame: Frame) -> tuple[FrameResult | None, dict[str, Any]]:
    """Run one source frame; return (result, its strict-JSON record), as ``vlm-edge run`` writes.

    An unreadable image or a bad engine output gives (None, an error record); so does a
    non-finite score (the record would not be strict JSON). File names become text fields.
    """
    try:
        result = pipeline.process(frame.data, frame.index, frame.source)
    except (ImageError, FrameError) as exc:
        result, record = None, {"index": frame.index, "source": frame.source, "error": str(exc)}
    else:
        record = result.to_record()
    if frame.timestamp_ms is not None:
        record = {"index": frame.index, "timestamp_ms": frame.timestamp_ms, **record}
    record = {**record, **name_fields("source", record["source"])}
    try:
        dumps(record)
        return result, record
    except ValueError:
        error = "non-finite score (NaN or infinity): the bundle or a state holds bad numbers"
        kept = ("index", "timestamp_ms", "source", "source_hex")
        keep = {k: v for k, v in record.items() if k in kept}
        return None, {**keep, "error": error}


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0
