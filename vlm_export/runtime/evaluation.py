"""The TCA paper's test-time protocol: one labelled stream, batch 1, several methods side by side.

Every method sees the same images in the same seeded random order, one at a time; TCA adapts as it
goes. A stream can be saved part-way (the position, each method's decisions so far and the TCA
reservoir, in one state file written atomically) and resumed from there: the resumed run decides
exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
        """Continue from a state saved by ``save`` for this very stream (StateError if not)."""
        arrays, meta = load_state(path, STATE_KIND, STATE_SCHEMA_VERSION, fingerprint)
        names = [m.name for m in self.methods]
        if meta.get("methods") != names or meta.get("digest") != self.digest():
            raise StateError(
                f"{path} was saved for another evaluation (other images, seed or methods "
                f"{meta.get('methods')}); use a new --state file"
            )
        position = meta.get("position")
        if not isinstance(position, int) or not 0 <= position <= len(self.order):
            raise StateError(f"{path} has an invalid position {position!r}")
        count = len(self.order)
        for method in self.methods:
            for key in ("predictions", "confidences"):
                value = arrays.get(f"{method.name}.{key}")
                if value is None or value.shape != (count,):
                    raise StateError(f"{path} has no {method.name} {key} for {count} images")
            method.predictions = arrays[f"{method.name}.predictions"].astype(np.int64)
            method.confidences = arrays[f"{method.name}.confidences"].astype(np.float64)
            method.seconds = float(meta.get("seconds", {}).get(method.name, 0.0))
            reservoir = method.pipeline.reservoir
            if reservoir is not None:
                prefix = f"{method.name}.reservoir."
                reservoir.load_state_arrays(
                    {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
                )
                method.pipeline.tca.sync_anchors()
        self.errors = [(int(p), str(m)) for p, m in meta.get("errors", [])]
        self.position = position
