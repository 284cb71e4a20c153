"""The TCA paper's test-time protocol: one labelled stream, batch 1, several methods side by side.

Every method sees the same images in the same seeded random order, one at a time; TCA adapts as it
goes. A stream can be saved part-way (the position, each method's decisions so far and the TCA
reservoir, in one state file written atomically) and resumed from there: the resumed run decides
exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlm_export.core.errors import StateError
from vlm_export.core.state_file import load_state, save_state
from vlm_export.runtime.io.preprocess import ImageError, load_image
from vlm_export.runtime.pipeline import Pipeline

STATE_KIND = "tta-evaluation"
STATE_SCHEMA_VERSION = 1
#: prediction recorded for a frame that could not be read
UNREADABLE = -1


def stream_order(count: int, seed: int) -> np.ndarray:
    """The seeded random order of ``count`` test images (the same for every method)."""
    return np.random.default_rng(seed).permutation(count).astype(np.int64)


@dataclass
class MethodStream:
    """One method's pipeline and its decisions so far (per stream position)."""

    name: str
    pipeline: Pipeline
    predictions: np.ndarray
    confidences: np.ndarray
    seconds: float = 0.0

    @classmethod
    def start(cls, name: str, pipeline: Pipeline, count: int) -> MethodStream:
        """A method that has seen nothing yet."""
        return cls(name, pipeline, np.full(count, UNREADABLE, np.int64), np.zeros(count))


class EvalStream:
    """Streams ``paths`` in ``order`` through every method; ``position`` frames are done."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: np.ndarray,
        order: np.ndarray,
        methods: Sequence[MethodStream],
    ) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.order = order
        self.methods = list(methods)
        self.position = 0
        self.errors: list[tuple[int, str]] = []

    def digest(self) -> str:
        """sha256 of the test set (file names and labels) and the order: a resumed state must
        belong to the same stream."""
        hasher = hashlib.sha256()
        for index in self.order:
            hasher.update(f"{self.paths[index].name}\t{self.labels[index]}\n".encode())
        return hasher.hexdigest()

    def step(self) -> None:
        """Classify the image at the current position with every method."""
        index = int(self.order[self.position])
        try:
            image: Image.Image = load_image(self.paths[index])
        except ImageError as exc:
            self.errors.append((self.position, str(exc)))
        else:
            for method in self.methods:
                result = method.pipeline.process(image, self.position, str(self.paths[index]))
                method.predictions[self.position] = result.label
                method.confidences[self.position] = float(result.scores[result.label])
                method.seconds += result.timings["total"] / 1000.0
        self.position += 1

    def run(
        self,
        until: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Step to position ``until`` (default: the end), or until ``should_stop()``."""
        end = len(self.order) if until is None else min(until, len(self.order))
        while self.position < end and not should_stop():
            self.step()
            if progress is not None:
                progress(self.position, len(self.order))

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, fingerprint: str) -> None:
        """Write the position, the decisions so far and the TCA reservoir atomically."""
        arrays: dict[str, np.ndarray] = {"order": self.order}
        for method in self.methods:
            arrays[f"{method.name}.predictions"] = method.predictions
            arrays[f"{method.name}.confidences"] = method.confidences
            reservoir = method.pipeline.reservoir
            if reservoir is not None:
                for key, value in reservoir.state_arrays().items():
                    arrays[f"{method.name}.reservoir.{key}"] = value
        meta = {
            "position": self.position,
            "digest": self.digest(),
            "methods": [m.name for m in self.methods],
            "seconds": {m.name: m.seconds for m in self.methods},
            "errors": [[position, message] for position, message in self.errors],
        }
        save_state(path, STATE_KIND, STATE_SCHEMA_VERSION, fingerprint, arrays, meta)

    def resume(self, path: str | Path, fingerprint: str) -> None:
        """Continue from a state saved by ``save`` for this very stream (StateError if not, or
        if any of it is damaged: checked whole before anything changes)."""
        arrays, meta = load_state(path, STATE_KIND, STATE_SCHEMA_VERSION, fingerprint)
        names = [m.name for m in self.methods]
        if meta.get("methods") != names or meta.get("digest") != self.digest():
            raise StateError(
                f"{path} was saved for another evaluation (other images, seed or methods "
                f"{meta.get('methods')}); use a new --state file"
            )
        position = meta.get("position")
        if type(position) is not int or not 0 <= position <= len(self.order):
            raise StateError(f"{path} has an invalid position {position!r}")
        seconds = _saved_seconds(path, meta, names)
        errors = _saved_errors(path, meta, position)
        decisions = {
            method.name: _saved_decisions(path, arrays, method, len(self.order))
            for method in self.methods
        }
        for method in self.methods:
            method.predictions, method.confidences = decisions[method.name]
            method.seconds = seconds[method.name]
            reservoir = method.pipeline.reservoir
            if reservoir is not None:
                prefix = f"{method.name}.reservoir."
                reservoir.load_state_arrays(
                    {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
                )
                method.pipeline.tca.sync_anchors()
        self.errors = errors
        self.position = position


def _is_duration(value: object) -> bool:
    """A number of seconds from a JSON header: an int or float (not a bool), finite, >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return 0 <= float(value) < math.inf
    except OverflowError:  # an int beyond any float
        return False


def _saved_seconds(path: str | Path, meta: dict[str, Any], names: list[str]) -> dict[str, float]:
    """Each method's seconds so far from a state header (0 when not recorded)."""
    saved = meta.get("seconds", {})
    if isinstance(saved, dict):
        seconds = {name: saved.get(name, 0.0) for name in names}
        if all(_is_duration(value) for value in seconds.values()):
            return {name: float(value) for name, value in seconds.items()}
    raise StateError(f"{path} has a corrupt header (field 'seconds')")


def _saved_errors(path: str | Path, meta: dict[str, Any], position: int) -> list[tuple[int, str]]:
    """The unreadable images (stream position, message) before ``position`` from a header."""
    saved = meta.get("errors", [])
    if isinstance(saved, list) and all(
        isinstance(entry, list)
        and len(entry) == 2
        and type(entry[0]) is int
        and 0 <= entry[0] < position
        and isinstance(entry[1], str)
        for entry in saved
    ):
        return [(at, message) for at, message in saved]
    raise StateError(f"{path} has a corrupt header (field 'errors')")


def _saved_decisions(
    path: str | Path, arrays: dict[str, np.ndarray], method: MethodStream, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """A method's predictions and confidences from a state: ``count`` each, the predictions
    classes of its bundle (or UNREADABLE), the confidences finite."""
    predictions = arrays.get(f"{method.name}.predictions")
    confidences = arrays.get(f"{method.name}.confidences")
    for key, value in (("predictions", predictions), ("confidences", confidences)):
        if value is None or value.shape != (count,):
            raise StateError(f"{path} has no {method.name} {key} for {count} images")
    classes = method.pipeline.bundle.num_classes
    if (
        predictions.dtype.kind not in "iu"
        or not ((predictions >= UNREADABLE) & (predictions < classes)).all()
    ):
        raise StateError(f"{path}: the {method.name} predictions are not classes (corrupt state)")
    if confidences.dtype.kind != "f" or not np.isfinite(confidences).all():
        raise StateError(
            f"{path}: the {method.name} confidences are not finite numbers (corrupt state)"
        )
    return predictions.astype(np.int64), confidences.astype(np.float64)
