"""The operations the HTTP routes call: classify an image, embeddings, the live label space.

Each runs on the shared engine under the lanes' lock, between two frames of the sources; nothing
here touches the scheduler or the sources.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from vlm_export.core.errors import UserError, shown
from vlm_export.core.manifest import EMBEDDING_OUTPUT
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.serve.frames.lanes import Lanes
from vlm_export.runtime.teach.examples import TAUGHT_DOMAIN, UNKNOWN
from vlm_export.runtime.text.class_lists import same_prompt

if TYPE_CHECKING:
    from vlm_export.runtime.text.label_space import LabelSpace

log = logging.getLogger(__name__)


class UnknownSource(UserError):
    """A source name the service does not have (HTTP 404)."""

    http_status = 404


class Operations:
    """Requests served on the engine the sources share."""

    def __init__(self, lanes: Lanes, sources: list[str], topk: int) -> None:
        self.lanes = lanes
        self.sources = sources
        self.topk = topk
        self._classes_lock = threading.Lock()
        self._text_encoder: Any = None

    def check_source(self, name: str) -> None:
        """UnknownSource unless the service has a source ``name``."""
        if name not in self.sources:
            raise UnknownSource(f"no source named {shown(name)!r}")

    # ------------------------------------------------------------------ images
    def classify(
        self,
        image: Image.Image,
        *,
        source: str | None = None,
        adapt: bool = False,
        topk: int = 5,
    ) -> dict[str, Any]:
        """The record ``vlm-edge run`` gives ``image``.

        Without ``source``: zero-shot (with RAIL fusion when the service fuses). With
        ``source``: that source's adaptation applies (its anchors and correction); the image
        joins its reservoir only with ``adapt``. Nothing is copied either way.
        """
        if source is not None:
            self.check_source(source)
            if source not in self.lanes.by_source:
                raise UserError(f"source {shown(source)!r} is not running: {self.failed(source)}")
        elif adapt:
            raise UserError("adapt needs a source: the state of which source should change?")
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise UserError(f"topk must be a whole number of at least 1, got {topk!r}")
        lanes = self.lanes
        with lanes.lock:
            lanes.install_offer()
            lane = lanes.by_source[source] if source is not None else lanes.zeroshot()
            pipeline = lanes.use(lane)
            kept = pipeline.topk
            pipeline.topk = min(topk, pipeline.bundle.num_classes)
            try:
                result = pipeline.process(image.convert("RGB"), 0, source or "", adapt=adapt)
            finally:
                pipeline.topk = kept
        return result.to_record()

    def failed(self, source: str) -> str:
        """Why ``source`` has no lane."""
        return self.lanes.failed.get(source, "it has no state")

    def embedding(self, image: Image.Image) -> np.ndarray:
        """The engine's image embedding [E] (zero-shot: no anchors), float64, L2-normalised."""
        lanes = self.lanes
        with lanes.lock:
            pipeline = lanes.zeroshot().pipeline
            tensor = pipeline.preprocessor(image.convert("RGB"))[None]
            lanes.set_zero_anchors()
            embedding = lanes.backend.infer(tensor)[EMBEDDING_OUTPUT][0].astype(np.float64)
        norm = np.linalg.norm(embedding)
        if not np.isfinite(norm) or norm == 0:
            raise UserError("the engine gave no usable embedding for this image")
        return embedding / norm

    def embed_image(self, image: Image.Image) -> list[float]:
        """The engine's image embedding (zero-shot: no anchors), L2-normalised, as a list."""
        return [float(v) for v in self.embedding(image)]

    # ------------------------------------------------------------------ text and classes
    def encoder(self) -> Any:
        """The bundle's text engine, opened on first use."""
        if self._text_encoder is None:
            from vlm_export.runtime.text.encoder import TextEncoder

            self._text_encoder = TextEncoder.open(self.lanes.bundle)
        return self._text_encoder

    def embed_texts(self, texts: list[str]) -> list[list[float]]:
        """Text embeddings through the bundle's text engine, L2-normalised."""
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UserError("give a non-empty list of strings")
        with self._classes_lock:
            vectors = np.asarray(self.encoder().embed_prompts(list(texts)), np.float64)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors.tolist()

    def classes(self) -> dict[str, Any]:
        """The live label space: class names and the templates they were embedded with."""
        bundle = self.lanes.bundle
        return {
            "classes": list(bundle.classes),
            "templates": bundle.manifest["text"].get("templates"),
        }

    def set_classes(self, names: list[str], templates: str | None = None) -> dict[str, Any]:
        """Replace the label space, as ``vlm-edge classes`` does (bundle rewritten atomically,
        states follow their labels); the next frame uses the new classes. The classes that
        teaching made (domain ``taught``) stay: ``names`` replace the bundle's own."""
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise UserError("give a non-empty list of class names (non-empty strings)")
        if len(set(names)) != len(names):
            raise UserError("a class name is given twice")
        with self._classes_lock:
            own = [d for d in self.lanes.bundle.domains if d != TAUGHT_DOMAIN]
            if len(own) != 1:
                raise UserError(
                    f"this bundle's classes are in domains {', '.join(own)}: replace them with "
                    "vlm-edge classes BUNDLE --domain NAME"
                )
            self._check_untaught(names)
            dropped = self._replace_classes(names, templates, own[0])
        log.info("classes replaced: %d classes", len(names))
        return {**self.classes(), "dropped_entries": dropped}

    def _check_untaught(self, names: list[str]) -> None:
        """UserError for a name that is the reserved ``unknown`` or names a class teaching made
        (which stays as it is): either would be a second class for one prompt."""
        taught = [name for domain, name in self.lanes.bundle.labels if domain == TAUGHT_DOMAIN]
        for name in names:
            if same_prompt(name, UNKNOWN):
                raise UserError(
                    f"{shown(name)!r} is reserved for what teaching rejects: leave it out"
                )
            clash = next((t for t in taught if same_prompt(t, name)), None)
            if clash is not None:
                raise UserError(
                    f"{shown(name)!r} names the class {shown(clash)!r} that teaching made, which "
                    "stays: leave it out (delete its examples to remove it)"
                )

    def add_class(self, name: str, domain: str) -> None:
        """Add class ``name`` to ``domain`` (a new domain comes last), embedded by the text
        engine with the bundle's templates; the other classes stay as they are."""
        with self._classes_lock:
            bundle = self.lanes.bundle
            if name in bundle.classes:
                return
            members = [n for d, n in bundle.labels if d == domain]
            self._replace_classes([*members, name], None, domain)
        log.info("class %r added to domain %r", name, domain)

    def remove_class(self, name: str, domain: str) -> None:
        """Remove class ``name`` of ``domain`` (a domain left empty goes too); the other
        classes keep their rows. Nothing happens when it is the last class."""
        from vlm_export.runtime.text.label_space import choose_templates, embed_label_space

        with self._classes_lock:
            bundle = self.lanes.bundle
            labels = [label for label in bundle.labels if label != (domain, name)]
            if len(labels) == len(bundle.labels) or not labels:
                return
            domains = [d for d in bundle.domains if any(d == ld for ld, _ in labels)]
            templates, spec = choose_templates(bundle, None)
            space = embed_label_space(bundle, labels, domains, templates, spec, self.encoder())
            self._install(space)
        log.info("class %r removed from domain %r", name, domain)

    def _replace_classes(self, names: list[str], templates: str | None, domain: str | None) -> int:
        from vlm_export.runtime.text.label_space import label_space_for

        space = label_space_for(self.lanes.bundle, names, domain, templates, self.encoder())
        return self._install(space)

    def _install(self, space: LabelSpace) -> int:
        """Put the label space ``space`` on every lane and into the bundle (atomically; all
        lanes as they were on any error); the entries the reservoirs dropped."""
        from vlm_export.runtime.text.bundle_classes import write_label_space

        lanes = self.lanes
        bundle = lanes.bundle
        with lanes.lock:
            unique = lanes.unique()
            before = sum(lane.entries for lane in unique)
            kept = [
                (lane, lane.pipeline.bundle, lane.pipeline.tca, lane.pipeline.fusion)
                for lane in unique
            ]
            try:
                for lane in unique:
                    lane.pipeline.set_classes(
                        space.names, space.text_embeddings, [d for d, _ in space.labels]
                    )
                write_label_space(bundle, space)
                reopened = Bundle.open(bundle.path, verify=False)
            except BaseException:
                for lane, old_bundle, tca, fusion in kept:
                    pipeline = lane.pipeline
                    pipeline.bundle, pipeline.tca, pipeline.fusion = old_bundle, tca, fusion
                    pipeline.topk = min(self.topk, old_bundle.num_classes)
                    pipeline._text_t = np.ascontiguousarray(old_bundle.text_embeddings.T)
                raise
            finally:
                lanes.unbind()  # set_classes pushed the last lane's anchors
            lanes.replace_bundle(reopened)
            return before - sum(lane.entries for lane in unique)
