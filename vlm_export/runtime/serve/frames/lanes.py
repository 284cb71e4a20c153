"""The sources' lanes on the one engine: a lane is a source's pipeline and its state file.

Each source runs its own ``Pipeline`` (its TCA reservoir, RAIL fusion as ``vlm-edge run`` builds
it) unless the sources share one state, then one lane serves all. The engine holds one set of
anchors: when it turns to another lane the whole anchor array is handed over (``TcaStage.rebind``:
on ONNX Runtime's CPU provider the engine is pointed at that reservoir's own buffers, nothing
copied; TensorRT and OpenVINO copy it); while it stays on one lane only the classes that moved are
pushed. A source whose state file cannot be loaded fails alone: it gets no lane, the service says
why, and the other sources run.
"""

from __future__ import annotations

import copy
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.errors import UserError, shown
from vlm_export.core.manifest import ANCHORS_INPUT
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.base import EngineBackend
from vlm_export.runtime.pipeline import METHOD_STAGES, Fusion, Pipeline
from vlm_export.runtime.serve.config import ServeSettings
from vlm_export.runtime.tca.stage import build_reservoir, save_reservoir

log = logging.getLogger(__name__)

STATE_SUFFIX = ".npz"


def state_file(state_dir: str | Path, name: str) -> Path:
    """A source's reservoir state in ``--state-dir`` (source names are safe file names)."""
    return Path(state_dir) / f"{name}{STATE_SUFFIX}"


class Lane:
    """One pipeline on the shared engine, with the state file it checkpoints to."""

    def __init__(self, pipeline: Pipeline, state: Path | None, owner: str | None = None) -> None:
        self.pipeline = pipeline
        self.state = state
        self.owner = owner  # the source a per-source state belongs to (recorded in the file)

    def bind(self, zeros: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Give the engine this lane's anchors (a full push: another lane used it)."""
        if self.pipeline.tca is not None:
            self.pipeline.tca.rebind()
        elif zeros is not None:
            self.pipeline.backend.set_anchors(*zeros)

    @property
    def entries(self) -> int:
        """Reservoir entries held (0 without a reservoir)."""
        reservoir = self.pipeline.reservoir
        return int(reservoir.counts().sum()) if reservoir is not None else 0


class Lanes:
    """Every source's lane on one engine, the lock that guards them, and the live bundle.

    The engine, the reservoirs and the fusion stage change under ``lock`` only; ``use`` (under
    the lock) hands the engine the anchors of the lane about to run.
    """

    def __init__(
        self,
        bundle: Bundle,
        backend: EngineBackend,
        method: str,
        fusion: Fusion | None,
        settings: ServeSettings,
    ) -> None:
        self.lock = threading.RLock()
        self.backend = backend
        self.method = method
        self.fusion = fusion
        self.settings = settings
        self.min_score = settings.min_score  # what the lanes run with (teaching may choose it)
        self.notes: list[str] = []  # start-up lines the command prints
        self.failed: dict[str, str] = {}  # sources without a lane: why
        self._bundle = bundle
        self._zeros = self._zero_anchors()
        self._bound: Lane | None = None
        self._zeroshot: Lane | None = None
        self._offer_lock = threading.Lock()  # guards the offer only: never held for a frame
        self._offered: tuple[Fusion | None, float | None] | None = None
        self.offered_version = 0  # offers made
        self.installed_version = 0  # offers the lanes run with (the next frame uses them)
        self.by_source = self._build([name for name, _ in settings.sources])

    # ------------------------------------------------------------------ building
    def _zero_anchors(self) -> tuple[np.ndarray, np.ndarray] | None:
        inputs = self._bundle.engine_io("inputs")
        if ANCHORS_INPUT not in inputs:
            return None
        shape = [int(v) for v in inputs[ANCHORS_INPUT]["shape"]]
        return np.zeros(shape, np.float32), np.zeros(shape[0], np.float32)

    def pipeline(self, bundle: Bundle, reservoir: Any) -> Pipeline:
        """A pipeline on the shared engine with the service's options."""
        s = self.settings
        return Pipeline(
            bundle,
            self.backend,
            self.method,
            reservoir,
            self.fusion,
            s.topk,
            self.min_score,
            s.crop,
        )

    def _lane(self, state: Path | None, owner: str | None = None) -> Lane:
        tca = METHOD_STAGES[self.method].tca
        reservoir = build_reservoir(self._bundle, None, state, owner) if tca else None
        if state is not None and state.exists() and reservoir is not None:
            self.notes.append(f"resumed {state} ({int(reservoir.counts().sum())} entries)")
        pipeline = self.pipeline(self._bundle, reservoir)
        pipeline.preprocessor.max_pixels = self.settings.max_pixels or None
        return Lane(pipeline, state, owner)

    def _build(self, names: list[str]) -> dict[str, Lane]:
        s = self.settings
        if s.shared_state is not None or not METHOD_STAGES[self.method].tca:
            shared = self._lane(Path(s.shared_state) if s.shared_state else None)
            return dict.fromkeys(names, shared)
        lanes = {}
        for name in names:
            state = state_file(s.state_dir, name) if s.state_dir else None
            try:
                lanes[name] = self._lane(state, name)
            except UserError as exc:  # this source's state: it fails alone, the others run
                self.failed[name] = f"its state cannot be used: {exc}"
                log.error("source %s: %s", name, shown(self.failed[name]))
        if not lanes:
            raise UserError(
                "no source can start: "
                + "; ".join(f"{name}: {why}" for name, why in self.failed.items())
            )
        return lanes

    # ------------------------------------------------------------------ the engine
    @property
    def bundle(self) -> Bundle:
        """The live bundle (replaced when the classes change)."""
        return self._bundle

    def unique(self) -> list[Lane]:
        """Each lane once (a shared lane serves several sources)."""
        return list({id(lane): lane for lane in self.by_source.values()}.values())

    def use(self, lane: Lane) -> Pipeline:
        """Bind ``lane`` to the engine (call under ``lock``) and return its pipeline."""
        if self._bound is not lane:
            lane.bind(self._zeros)
            self._bound = lane
        return lane.pipeline

    def unbind(self) -> None:
        """Forget which lane the engine holds (something else pushed anchors)."""
        self._bound = None

    def set_zero_anchors(self) -> None:
        """Give the engine all-zero anchors (ordinary attention; call under ``lock``)."""
        if self._zeros is not None:
            self.backend.set_anchors(*self._zeros)
        self._bound = None

    def zeroshot(self) -> Lane:
        """A lane whose reservoir stays empty (a request without a source never adapts it)."""
        bundle = self._bundle
        if self._zeroshot is None or self._zeroshot.pipeline.bundle is not bundle:
            tca = METHOD_STAGES[self.method].tca
            pipeline = self.pipeline(bundle, build_reservoir(bundle) if tca else None)
            self._zeroshot = Lane(pipeline, None)
            self._bound = None  # the new pipeline pushed its (empty) anchors
        return self._zeroshot

    def replace_bundle(self, bundle: Bundle) -> None:
        """The bundle after a class change (the pipelines already follow it)."""
        self._bundle = bundle
        lanes = self.unique()
        if lanes:
            self.fusion = lanes[0].pipeline.fusion

    def set_fusion(self, fusion: Fusion | None) -> None:
        """Put ``fusion`` on every pipeline (call under ``lock``): the next frame uses it."""
        self.fusion = fusion
        lanes = self.unique() + ([self._zeroshot] if self._zeroshot is not None else [])
        for lane in lanes:
            lane.pipeline.fusion = fusion

    def offer(self, fusion: Fusion | None, min_score: float | None) -> int:
        """Hand the lanes a new fusion stage and ``min_score`` without waiting for the engine:
        the next frame (or request) installs them (``install_offer``). Returns the offer's
        version; a newer offer replaces one not installed yet."""
        with self._offer_lock:
            self._offered = (fusion, min_score)
            self.offered_version += 1
            return self.offered_version

    def install_offer(self) -> None:
        """Install the newest offer, if any (call under ``lock``, before a frame): its fusion
        follows the live classes by label (the classes may have changed since it was made)."""
        with self._offer_lock:
            offered, version = self._offered, self.offered_version
            self._offered = None
        if offered is None:
            return
        fusion, min_score = offered
        labels = self._bundle.labels
        if fusion is not None and getattr(fusion, "labels", labels) != labels:
            fusion = fusion.for_labels(fusion.labels, labels)
        self.set_fusion(fusion)
        self.set_min_score(min_score)
        self.installed_version = version

    def set_min_score(self, min_score: float | None) -> None:
        """Report decisions below ``min_score`` as unknown on every lane (call under ``lock``)."""
        self.min_score = min_score
        lanes = self.unique() + ([self._zeroshot] if self._zeroshot is not None else [])
        for lane in lanes:
            lane.pipeline.min_score = min_score

    # ------------------------------------------------------------------ states
    def state_paths(self) -> list[Path]:
        """The state files the lanes checkpoint to."""
        return [lane.state for lane in self.unique() if lane.state is not None]

    def checkpoint(self) -> list[Path]:
        """Save every state file now (atomically; copied under the lock, written outside it)."""
        with self.lock:
            snapshots = [
                (copy.deepcopy(lane.pipeline.reservoir), lane)
                for lane in self.unique()
                if lane.state is not None and lane.pipeline.reservoir is not None
            ]
        for reservoir, lane in snapshots:
            save_reservoir(reservoir, lane.state, lane.pipeline.bundle, lane.owner)
        return [lane.state for _, lane in snapshots]

    def fill(self) -> dict[str, tuple[dict[str, int], int]]:
        """Reservoir entries per source and class, with the capacity per class."""
        fill = {}
        with self.lock:
            for name, lane in self.by_source.items():
                reservoir = lane.pipeline.reservoir
                if reservoir is not None:
                    counts = reservoir.counts()
                    classes = lane.pipeline.bundle.classes
                    per_class = dict(zip(classes, (int(c) for c in counts), strict=True))
                    fill[name] = (per_class, int(reservoir.config.capacity))
        return fill
