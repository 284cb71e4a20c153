"""Teaching the running service by example: stored examples, the learner beside the frame loop.

A person labels a frame a source already decided (by its sequence number: each source keeps the
embeddings of its last frames, ``recent``) or uploads an image with a label. The example
(embedding, label, source, time, thumbnail) is stored in SQLite first, then learned: a learning
thread applies every change that arrived meanwhile as one batch (``TeachLearner.apply``) and puts
the new predictor on every lane (``TeachFusion``) under the engine lock, between two frames; the
request is answered once its example is in the decisions. A delete is the exact downdate. With
``--min-score auto`` the threshold is chosen again after each batch from the examples' exact
leave-one-out scores. The learner is checkpointed beside the reservoirs; at start a checkpoint
that does not hold exactly the stored examples (a crash between the two) is rebuilt from them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlm_export.core.atomic import atomic_write_bytes
from vlm_export.core.errors import StateError, UserError, shown, shown_path
from vlm_export.core.state_file import read_meta
from vlm_export.runtime.pipeline import utc_now
from vlm_export.runtime.serve.config import ServeSettings
from vlm_export.runtime.serve.frames.lanes import Lanes
from vlm_export.runtime.serve.frames.recent import NotFound, RecentFrames
from vlm_export.runtime.serve.operations import Operations
from vlm_export.runtime.serve.teaching.queue import Change, LearningQueue
from vlm_export.runtime.teach.calibrate import Calibration, calibrate
from vlm_export.runtime.teach.examples import (
    TAUGHT_DOMAIN,
    UNKNOWN,
    Example,
    check_id,
    check_label,
    new_id,
    same_label,
    thumbnail_jpeg,
)
from vlm_export.runtime.teach.fleet import FleetSync, Refused
from vlm_export.runtime.teach.fusion import TeachFusion
from vlm_export.runtime.teach.learner import DEFAULT_HIDDEN_DIM, TeachLearner
from vlm_export.runtime.teach.store import DB_NAME, TEACH_FOLDER, ExampleStore
from vlm_export.runtime.text.class_lists import same_prompt

log = logging.getLogger(__name__)

DEFAULT_MAX_EXAMPLES = 5000
LEARNER_STATE = "teach.npz"
DEVICE_ID = "device-id"


class Full(UserError):
    """As many examples are stored as the service keeps (HTTP 409: delete some first)."""

    http_status = 409


class Teaching:
    """The service's examples, learner and fusion; every method is thread-safe."""

    def __init__(
        self,
        lanes: Lanes,
        operations: Operations,
        settings: ServeSettings,
    ) -> None:
        self.lanes = lanes
        self.operations = operations
        self.settings = settings
        self.fleet: FleetSync | None = None
        bundle = lanes.bundle
        self.dim = int(bundle.text_embeddings.shape[1])
        self.hidden_dim = (
            DEFAULT_HIDDEN_DIM if settings.teach_hidden_dim is None else settings.teach_hidden_dim
        )
        if self.hidden_dim < 0:
            raise UserError(f"--teach-hidden-dim must be 0 or more, got {self.hidden_dim}")
        self.max_examples = settings.teach_max_examples
        folder = Path(settings.state_dir) / TEACH_FOLDER if settings.state_dir else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            _check_database_present(folder)
        self.store = ExampleStore.open(
            folder / DB_NAME if folder else None, bundle.engine_fingerprint, self.dim
        )
        self.state = folder / LEARNER_STATE if folder else None
        self.device_id = _device_id(folder)
        self.notes: list[str] = []
        respelled = self._match_classes()
        self.learner = self._resume(trust_state=not respelled)
        self.calibration: Calibration | None = None
        self.recent = RecentFrames([name for name, _ in settings.sources])
        self._learner_lock = threading.Lock()
        self._store_lock = threading.Lock()  # a limit's check and the store's change, as one
        self._repeated: set[str] = set()  # ids whose delete was published again this run
        self.queue = LearningQueue(self._apply)
        self._install()
        if settings.fleet:
            self.fleet = FleetSync(
                settings.fleet,
                self.device_id,
                bundle.engine_fingerprint,
                self.dim,
                on_add=self.add_remote,
                on_delete=self.forget_remote,
                on_shared=self.store.shared,
            )
            self.notes.append(f"fleet: device {self.device_id} on {shown(settings.fleet)}")

    # ------------------------------------------------------------------ start and stop
    def _match_classes(self) -> bool:
        """At start, make the stored labels and the bundle's classes agree: a label that names
        a class in another spelling takes the class's (True then: the learner is rebuilt), a
        label that is no class becomes one (a crash between storing an example and adding its
        class, or examples imported from a device with other classes). Classes are only added
        here: the bundle may be shared with services that hold other examples."""
        respelled = False
        for label, count in self.store.counts().items():
            named = same_label(label, self.lanes.bundle.classes)
            if named != label:
                self.store.relabel(label, named)
                respelled = True
                self.notes.append(f"teaching: {count} examples of {shown(label)!r} now {named!r}")
            elif label != UNKNOWN and label not in self.lanes.bundle.classes:
                try:
                    self._ensure_class(label)
                except UserError as exc:
                    self.notes.append(f"teaching: {count} examples are not decided: {shown(exc)}")
                    continue
                self.notes.append(f"teaching: {shown(label)!r} ({count} examples) made a class")
        return respelled

    def _resume(self, trust_state: bool = True) -> TeachLearner:
        """The checkpointed learner if it holds exactly the stored examples (and
        ``trust_state``), else rebuilt."""
        stored = self.store.count()
        where = "memory only (no --state-dir)" if self.state is None else str(self.state.parent)
        peak = TeachLearner.peak_bytes(self.dim, self.hidden_dim, self.max_examples, 1000)
        self.notes.append(
            f"teaching: examples in {where} ({stored} stored), d_h {self.hidden_dim}, up to "
            f"{self.max_examples} examples, learner peak about {peak / 2**20:,.0f} MB"
        )
        if self.state is not None and self.state.exists() and trust_state:
            try:
                learner = TeachLearner.load(self.state, self.lanes.bundle.engine_fingerprint)
                if learner.digest == self.store.digest() and learner.hidden_dim == self.hidden_dim:
                    return learner
                self.notes.append(
                    f"teaching: {self.state.name} holds {learner.num_samples} examples, the "
                    f"database {stored}: rebuilt from the database"
                )
            except StateError as exc:
                self.notes.append(f"teaching: {shown(exc)}; rebuilt from the database")
        elif stored:
            self.notes.append(f"teaching: no learner state: learned {stored} examples")
        return TeachLearner.fit(self.store.all(), self.dim, self.hidden_dim)

    def start(self) -> None:
        """Start the learning thread, then the fleet link, and publish the store's outbox: the
        changes the broker never acknowledged (made while it was away, or just before a crash,
        or imported); peers apply each id once."""
        self.queue.start()
        if self.fleet is not None:
            self.fleet.start()
            for op, example_id in self.store.unshared():
                example = self.store.get(example_id) if op == "add" else None
                if example is not None:
                    self.fleet.publish_add(example)
                elif op == "delete":
                    self.fleet.publish_delete(example_id)

    def finish(self) -> None:
        """Learn the changes in hand and stop the thread and the fleet link (then the last
        checkpoint holds them)."""
        self.queue.stop()
        if self.fleet is not None:
            self.fleet.close()

    def close(self) -> None:
        """Close the database (after ``finish`` and the last checkpoint)."""
        self.store.close()

    def checkpoint(self) -> Path | None:
        """Save the learner state atomically (None without a state directory)."""
        if self.state is None:
            return None
        with self._learner_lock:
            self.learner.save(self.state, self.lanes.bundle.engine_fingerprint)
        return self.state

    # ------------------------------------------------------------------ teaching
    def teach_frame(self, source: str, seq: int, label: str) -> dict[str, Any]:
        """Label the frame ``seq`` of ``source`` (one the service decided lately)."""
        self.operations.check_source(source)
        recent = self.recent.find(source, seq)
        thumbnail = recent.thumbnail()
        return self._teach(recent.embedding, label, source, thumbnail)

    def teach_image(self, image: Image.Image, label: str, source: str = "upload") -> dict[str, Any]:
        """Label an uploaded image (its embedding from the engine, zero-shot)."""
        label = check_label(label)
        embedding = self.operations.embedding(image)
        return self._teach(embedding, label, source, thumbnail_jpeg(image))

    def _teach(
        self, embedding: np.ndarray, label: str, source: str, thumbnail: bytes | None
    ) -> dict[str, Any]:
        label = check_label(label)
        with self.queue.slot():
            example = Example(
                new_id(), label, source, utc_now(), np.asarray(embedding, np.float32), "", thumbnail
            )
            example = self._store(example, share=True) or example  # a fresh id: always stored
            change = self.queue.put(Change(added=example))
        self.queue.wait(change)
        if self.fleet is not None:
            self.fleet.publish_add(example)
        return self._answer(example, change)

    def _store(self, example: Example, share: bool = False) -> Example | None:
        """Store ``example``, its label as the class it names (``same_label``), and make that
        label a class if it is none; return the example as stored, or None when its id is held
        or was deleted (``share``: this device's own, for its fleet). Nothing is stored (Full)
        when the store or the class list is at its limit. One at a time: the limits and the
        class names hold under concurrent teaching, local and from the fleet."""
        with self._store_lock:
            if self.store.known(example.id):
                return None
            example = replace(example, label=same_label(example.label, self.lanes.bundle.classes))
            if self.store.count() >= self.max_examples:
                raise Full(
                    f"{self.max_examples} examples are stored, the most this service keeps "
                    "(--teach-max-examples): delete some first"
                )
            self.store.add(example, share)
            try:
                self._ensure_class(example.label)
            except BaseException:
                self.store.delete(example.id, tombstone=False)
                raise
            return example

    def add_remote(self, example: Example) -> bool:
        """A fleet peer's example (or this device's own, echoed): stored once, then learned
        without waiting; False when nothing changed. Refused (counted by the fleet link) when
        it reuses a held id for other content, when this device holds as many examples or
        classes as it keeps, or when its class cannot be added here."""
        try:
            stored = self._store(example)
        except UserError as exc:
            raise Refused("not stored here", shown(exc)) from None
        if stored is None:
            held = self.store.get(example.id)
            if held is None:
                self._repeat_delete(example.id)
            elif not _same_content(held, example):
                raise Refused("conflicts with a held example", f"id {example.id}")
            return False
        self.queue.put(Change(added=stored))
        return True

    def _repeat_delete(self, example_id: str) -> None:
        """An add of an id this device deleted came from the fleet (a peer published it again):
        publish the delete again, once a run, so the broker's retained word is the delete."""
        if self.fleet is None or example_id in self._repeated:
            return
        self._repeated.add(example_id)
        self.fleet.publish_delete(example_id)

    def forget_remote(self, example_id: str) -> bool:
        """A fleet peer's delete: False when the example was not held."""
        with self._store_lock:
            removed = self.store.delete(example_id)
            if removed is None:
                return False
            self._drop_untaught_class(removed.label)
        self.queue.put(Change(removed=example_id))
        return True

    def forget(self, example_id: str) -> dict[str, Any]:
        """Delete an example: the learner state becomes exactly the state without it (a class
        that exists only because it was taught goes with its last example)."""
        check_id(example_id)
        with self.queue.slot():
            with self._store_lock:
                removed = self.store.delete(example_id, share=True)
                if removed is None:  # nothing changed: no tombstone, nothing to tell the fleet
                    raise NotFound(f"no example {example_id}")
                self._drop_untaught_class(removed.label)
            change = self.queue.put(Change(removed=example_id))
        self.queue.wait(change)
        if self.fleet is not None:
            self.fleet.publish_delete(example_id)
        return {
            "id": example_id,
            "deleted": True,
            "label": removed.label,
            "class_examples": self.store.count(removed.label),
            "learned_ms": round(change.learned_ms, 3),
        }

    def _answer(self, example: Example, change: Change) -> dict[str, Any]:
        return {
            "id": example.id,
            "label": example.label,
            "source": example.source,
            "class_examples": self.store.count(example.label),
            "learned_ms": round(change.learned_ms, 3),
        }

    def _ensure_class(self, label: str) -> None:
        """A label that is not a class yet becomes one, in the domain ``taught`` (its text
        embedding from the text engine, as PUT /v1/classes makes them); ``unknown`` never does."""
        classes = list(self.lanes.bundle.classes)
        if label == UNKNOWN or label in classes:
            return
        if not self.lanes.bundle.manifest.get("text_encoder"):
            raise UserError(
                f"{shown(label)!r} is not a class and this bundle has no text engine to add it: "
                "teach one of its classes"
            )
        most = self.settings.limits.max_classes
        if len(classes) >= most:
            raise Full(
                f"{shown(label)!r} would be class {len(classes) + 1}, and this service keeps "
                f"at most {most}: teach one of its classes, or replace the classes"
            )
        self.operations.add_class(label, TAUGHT_DOMAIN)

    def _drop_untaught_class(self, label: str) -> None:
        """Remove ``label``'s class if teaching made it (domain ``taught``) and no stored
        example holds the label any more: the delete leaves the classes as they were."""
        if self.store.count(label) == 0 and (TAUGHT_DOMAIN, label) in self.lanes.bundle.labels:
            self.operations.remove_class(label, TAUGHT_DOMAIN)

    # ------------------------------------------------------------------ learning
    def _apply(self, added: list[Example], removed: list[str]) -> None:
        """One batch of changes (on the learning thread): learned, then in the decisions."""
        with self._learner_lock:
            self.learner.apply(added=added, removed=removed)
            self._install()

    def _install(self) -> None:
        """Offer the learner's predictor (and ``--min-score auto``, chosen again) to every lane:
        the next frame uses them. Nothing here waits for the engine."""
        learner = self.learner
        bundle = self.lanes.bundle
        fusion = None
        if learner.num_samples:
            fusion = TeachFusion(learner.predictor(), bundle.labels)
        min_score = self.settings.min_score
        if self.settings.min_score_auto:
            self.calibration = calibrate(
                learner, bundle.labels, bundle.text_embeddings, self.settings.min_score
            )
            min_score = self.calibration.threshold
            log.info("teaching: %s", self.calibration.describe())
        self.lanes.offer(fusion, min_score)

    # ------------------------------------------------------------------ reading
    def examples(
        self,
        *,
        label: str | None = None,
        source: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> dict[str, Any]:
        """A page of examples (newest first) with counts per label (``label`` as the class
        it names, as teaching takes it)."""
        if label is not None:
            label = same_label(label, self.lanes.bundle.classes)
        rows = self.store.page(label=label, source=source, offset=offset, limit=limit)
        return {
            "examples": [
                {
                    "id": e.id,
                    "label": e.label,
                    "source": e.source,
                    "time_utc": e.time_utc,
                    "origin": e.origin or self.device_id,
                    "thumbnail": f"/v1/examples/{e.id}/thumbnail.jpg" if e.thumbnail else None,
                }
                for e in rows
            ],
            "total": self.store.count(label=label, source=source),
            "offset": offset,
            "limit": limit,
            "counts": self.store.counts(),
            "learned": self.learner.num_samples,
            "min_score": self.settings.min_score
            if self.calibration is None
            else self.calibration.threshold,
            "calibration": None if self.calibration is None else self.calibration.describe(),
        }

    def thumbnail(self, example_id: str) -> bytes:
        """An example's thumbnail JPEG (NotFound without one)."""
        example = self.store.get(check_id(example_id))
        if example is None or not example.thumbnail:
            raise NotFound(f"no thumbnail for example {example_id}")
        return example.thumbnail


def _check_database_present(folder: Path) -> None:
    """StateError when the learner state records examples and the database is gone: the
    examples cannot be rebuilt from the learner, and starting would forget them."""
    state, database = folder / LEARNER_STATE, folder / DB_NAME
    if database.exists() or not state.is_file():
        return
    try:
        count = int(read_meta(state).get("num_samples", 0))
    except (StateError, TypeError, ValueError):
        return  # not a readable learner state: rebuilt from the (empty) database as before
    if count:
        raise StateError(
            f"{shown_path(state)} holds {count} taught examples and their database "
            f"{DB_NAME} is missing: put it back (the examples cannot be rebuilt from the "
            f"learner), or remove {LEARNER_STATE} to start with none"
        )


def _same_content(a: Example, b: Example) -> bool:
    """True when two examples of one id teach the same: labels that name one class (their
    prompts are the same), equal embeddings."""
    return same_prompt(a.label, b.label) and np.array_equal(a.embedding, b.embedding)


def _device_id(folder: Path | None) -> str:
    """This device's id in the fleet: kept in the state directory (a new one in memory)."""
    if folder is None:
        return new_id()
    path = folder / DEVICE_ID
    try:
        text = path.read_text(encoding="ascii").strip()
        return check_id(text)
    except (OSError, UnicodeDecodeError, UserError):
        pass
    identity = new_id()
    atomic_write_bytes(path, (identity + "\n").encode("ascii"))
    return identity
