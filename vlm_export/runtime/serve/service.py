"""The service behind ``vlm-edge serve``: one engine, many sources, adaptation per source.

Each source has a worker (``workers.SourceWorker``: a newest-frame capture thread, reopened with
backoff when it fails). One scheduler thread serves the sources in turn, one frame each per
round, on the one engine. Each source runs its own ``Pipeline`` (its TCA reservoir, RAIL fusion
as ``vlm-edge run`` builds it) unless the sources share one state, then one pipeline serves all.
The engine holds one set of anchors: when it turns to another source's reservoir the whole
anchor array is handed over (``TcaStage.rebind``: on ONNX Runtime's CPU provider the engine is
pointed at that reservoir's own buffers, nothing copied; TensorRT and OpenVINO copy it); while
it stays on one source only the classes that moved are pushed. With one source, or a shared
state, the engine never switches.

The engines here are batch 1, so sources are always served in turn (the service says so at
start). Everything public is thread-safe: the engine, reservoirs and classes change under one
lock (``_engine``); the HTTP app calls ``classify``, ``embed_*`` and ``set_classes`` from its
own threads.
"""

from __future__ import annotations

import collections
import copy
import io
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import ANCHORS_INPUT, EMBEDDING_OUTPUT, FATE_OUTPUT
from vlm_export.runtime.api import default_method, fusion_dropped
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.commands._annotated import FrameDrawer
from vlm_export.runtime.engines.base import EngineBackend
from vlm_export.runtime.engines.factory import open_backend
from vlm_export.runtime.engines.ladder import BudgetRun, open_budgeted, runs_ladder
from vlm_export.runtime.io.preprocess import image_from_array, load_image
from vlm_export.runtime.io.sources import Frame, Source, open_source
from vlm_export.runtime.pipeline import (
    METHOD_STAGES,
    FrameResult,
    Pipeline,
    process_frame,
    utc_now,
)
from vlm_export.runtime.rail.models import open_fusion
from vlm_export.runtime.serve.config import ServeSettings, shown
from vlm_export.runtime.serve.events import Events, open_sink
from vlm_export.runtime.serve.metrics import ServeMetrics
from vlm_export.runtime.serve.watch import SourceWatches
from vlm_export.runtime.serve.workers import Opener, SourceWorker
from vlm_export.runtime.tca.stage import build_reservoir, save_reservoir

log = logging.getLogger(__name__)

STATE_SUFFIX = ".npz"
RECENT_FRAMES = 256  # per source, for latency percentiles
FPS_WINDOW_S = 5.0
JPEG_QUALITY = 80
IDLE_WAIT_S = 0.2


class UnknownSource(UserError):
    """A source name the service does not have (HTTP 404)."""


def state_file(state_dir: str | Path, name: str) -> Path:
    """A source's reservoir state in ``--state-dir`` (source names are safe file names)."""
    return Path(state_dir) / f"{name}{STATE_SUFFIX}"


class Lane:
    """One pipeline on the shared engine, with the state file it checkpoints to."""

    def __init__(self, pipeline: Pipeline, state: Path | None) -> None:
        self.pipeline = pipeline
        self.state = state

    def bind(self, zeros: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Give the engine this lane's anchors (a full push: another lane used it)."""
        if self.pipeline.tca is not None:
            self.pipeline.tca.rebind()
        elif zeros is not None:
            self.pipeline.backend.set_anchors(*zeros)


@dataclass
class SourceStats:
    """What the scheduler recorded of one source's frames."""

    frames: int = 0
    errors: int = 0
    timings: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_FRAMES)
    )  # stage ms of the recent frames (percentiles)
    times: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=2 * RECENT_FRAMES)
    )  # time.monotonic() when each recent frame was decided (fps)
    last_record: dict[str, Any] | None = None
    last_at: float | None = None
    seq: int = 0
    view: tuple[Frame, FrameResult | None] | None = None
    jpeg: dict[bool, tuple[int, bytes]] = field(default_factory=dict)


class Service:
    """One engine serving several sources; see the module docstring and docs/serve.md."""

    def __init__(
        self,
        bundle: Bundle,
        backend: EngineBackend,
        settings: ServeSettings,
        *,
        opener: Opener | None = None,
    ) -> None:
        self.settings = settings
        self.bundle = bundle
        self.backend = backend
        self.metrics = ServeMetrics()
        self.registry = self.metrics.registry
        self.method = settings.method or default_method(bundle, bool(settings.rail_state))
        self.notes: list[str] = []  # start-up lines the command prints
        if fusion_dropped(bundle, bool(settings.rail_state)) and not settings.method:
            self.notes.append(f"without --rail-state, method {bundle.method} runs as {self.method}")
        self._check_method()
        self._engine = threading.RLock()
        self._classes_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._started_at = time.monotonic()
        self._text_encoder: Any = None
        self._fusion = open_fusion(settings.rail_state, bundle) if settings.rail_state else None
        self._zeros = self._zero_anchors()
        self._bound: Lane | None = None
        self._zeroshot: Lane | None = None
        self._lanes: dict[str, Lane] = {}
        self._stats: dict[str, SourceStats] = {}
        self._views = threading.Condition()
        self._build_lanes()
        self.events = Events(
            [open_sink(spec, self.metrics) for spec in settings.events], settings.event_every
        )
        self.workers: dict[str, SourceWorker] = {}
        for name, spec in settings.sources:  # opened here: one line now for one that fails
            self.metrics.add_source(name)
            self.workers[name] = self._worker(name, spec, opener or self._opener(name))
        self.metrics.watch_reservoirs(self._reservoir_fill)
        self.watches = SourceWatches(list(self.workers), self.metrics, self.events)
        self._threads: list[threading.Thread] = []
        self._running = False
        self._stopped = False

    #: the ladder's latency budget (--target-ms), None without one
    budget: BudgetRun | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def open(cls, settings: ServeSettings, *, opener: Opener | None = None) -> Service:
        """Open the bundle, the engine, the event sinks and the sources for ``settings``
        (nothing runs before ``start``)."""
        settings.check()
        if settings.bundle is None:
            raise UserError("give a BUNDLE (argument or bundle = ... in --config)")
        if not settings.sources:
            raise UserError("give at least one --source NAME=SPEC")
        bundle = Bundle.open(settings.bundle, verify=not settings.no_verify)
        backend, budget = _open_engine(bundle, settings)
        try:
            service = cls(bundle, backend, settings, opener=opener)
        except BaseException:
            backend.close()
            raise
        service.budget = budget
        if budget is not None:
            log.info("budget: %s", budget.reason)
        return service

    def _check_method(self) -> None:
        stages = METHOD_STAGES.get(self.method)
        if stages is None:
            raise UserError(f"unknown method {shown(self.method)!r}")
        s = self.settings
        if (s.state_dir or s.shared_state) and not stages.tca:
            raise UserError(
                f"--state-dir and --shared-state need method tca or tca+rail, not {self.method}"
            )
        if stages.fusion and not s.rail_state:
            raise UserError(f"method {self.method} needs --rail-state FILE (from vlm-edge learn)")
        if s.rail_state and not stages.fusion:
            raise UserError(f"--rail-state needs method rail or tca+rail (running {self.method})")

    def _zero_anchors(self) -> tuple[np.ndarray, np.ndarray] | None:
        inputs = self.bundle.engine_io("inputs")
        if ANCHORS_INPUT not in inputs:
            return None
        shape = [int(v) for v in inputs[ANCHORS_INPUT]["shape"]]
        return np.zeros(shape, np.float32), np.zeros(shape[0], np.float32)

    def _pipeline(self, reservoir: Any) -> Pipeline:
        s = self.settings
        return Pipeline(
            self.bundle,
            self.backend,
            self.method,
            reservoir,
            self._fusion,
            s.topk,
            s.min_score,
            s.crop,
        )

    def _lane(self, state: Path | None) -> Lane:
        tca = METHOD_STAGES[self.method].tca
        reservoir = build_reservoir(self.bundle, None, state) if tca else None
        if state is not None and state.exists() and reservoir is not None:
            self.notes.append(f"resumed {state} ({int(reservoir.counts().sum())} entries)")
        pipeline = self._pipeline(reservoir)
        pipeline.preprocessor.max_pixels = self.settings.max_pixels or None
        return Lane(pipeline, state)

    def _build_lanes(self) -> None:
        s = self.settings
        names = [name for name, _ in s.sources]
        if s.shared_state is not None or not METHOD_STAGES[self.method].tca:
            shared = self._lane(Path(s.shared_state) if s.shared_state else None)
            self._lanes = dict.fromkeys(names, shared)
        else:
            self._lanes = {
                name: self._lane(state_file(s.state_dir, name) if s.state_dir else None)
                for name in names
            }
        self._stats = {name: SourceStats() for name in names}
        self._bound = None

    def _opener(self, name: str) -> Opener:
        """``open_source`` with the source's reading options (stride, camera size and rate)."""
        options = self.settings.source_options(name)

        def opener(spec: str) -> Source:
            return open_source(spec, options)

        return opener

    def _worker(self, name: str, spec: str, opener: Opener) -> SourceWorker:
        opened = failed = None
        try:
            opened = opener(spec)
        except Exception as exc:  # noqa: BLE001 - one line; the others start, this one retries
            failed = f"cannot open: {exc}"
            log.warning("source %s: %s (retrying)", name, shown(failed))
        return SourceWorker(
            name,
            spec,
            loop=self.settings.loop,
            wake=self._wake.set,
            metrics=self.metrics,
            retry_initial_s=self.settings.retry_initial_s,
            retry_max_s=self.settings.retry_max_s,
            opener=opener,
            opened=opened,
            failed=failed,
        )

    def describe(self) -> str:
        """One line: method, engine, how sources are served."""
        lanes = len({id(lane) for lane in self._lanes.values()})
        count = len(self._lanes)
        if count == 1:
            how = "1 source"
        elif lanes == 1:
            how = f"{count} sources in turn, one shared state (batch-1 engine: no batching)"
        else:
            how = f"{count} sources in turn, one state each (batch-1 engine: no batching)"
        crop = next(iter(self._lanes.values())).pipeline.preprocessor.crop
        return f"{self.method} on {self.backend.description}; {how}; crop {crop}"

    # ------------------------------------------------------------------ running
    def start(self) -> None:
        """Start the source workers, the scheduler, checkpoints and events."""
        if self._running:
            return
        self._running = True
        self._started_at = time.monotonic()
        for worker in self.workers.values():
            worker.start()
        self.events.start(lambda: {n: w.state for n, w in self.workers.items()})
        for target, name in ((self._schedule, "vlm-scheduler"), (self._checkpoints, "vlm-ckpt")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop everything, save every state (the last checkpoint), close the engine."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(30.0)
        for worker in self.workers.values():
            worker.stop()
        try:
            self.checkpoint()
        finally:
            self.events.close()
            with self._engine:
                self.backend.close()
            with self._views:
                self._views.notify_all()

    def __enter__(self) -> Service:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _schedule(self) -> None:
        """Serve the sources in turn, one frame each per round, until stopped."""
        order = list(self.workers)
        due = dict.fromkeys(order, 0.0)
        period = 1.0 / self.settings.max_fps if self.settings.max_fps else 0.0
        while not self._stop.is_set():
            served = False
            now = time.monotonic()
            for name in order:
                if period and now < due[name]:
                    continue
                frame = self.workers[name].take()
                if frame is None:
                    continue
                due[name] = max(due[name] + period, now)
                self._serve(name, frame)
                served = True
                if self._stop.is_set():
                    return
            if not served:
                wait = IDLE_WAIT_S
                if period:
                    wait = min(wait, max(0.001, min(due.values()) - time.monotonic()))
                self._wake.wait(wait)
                self._wake.clear()

    def _serve(self, name: str, frame: Frame) -> None:
        stats = self._stats[name]
        index = stats.frames
        frame = Frame(index, frame.source, frame.data, frame.timestamp_ms)
        with self._engine:
            lane = self._lanes[name]
            if self._bound is not lane:
                lane.bind(self._zeros)
                self._bound = lane
            result, record = process_frame(lane.pipeline, frame)
            if self.budget is not None and result is not None:  # one budget for every source
                switched = self.budget.after_frame(result.timings["total"])
                if switched:
                    log.info("budget: %s", switched)
        record = {"time_utc": utc_now(), **record, "input": record["source"], "source": name}
        now = time.monotonic()
        stats.frames += 1
        stats.last_at = now
        stats.times.append(now)
        self.metrics.frames.labels(source=name).inc()
        if result is None:
            stats.errors += 1
            self.metrics.errors.labels(source=name).inc()
        else:
            stats.timings.append(result.timings)
            stats.last_record = record
            for stage, ms in result.timings.items():
                self.metrics.latency.labels(source=name, stage=stage).observe(ms / 1000.0)
            self.events.decision(name, record)
            self.watches.on_frame(name, stats.seq, frame, result)
        with self._views:
            stats.seq += 1
            stats.view = (frame, result)
            stats.jpeg = {}
            self._views.notify_all()

    def _checkpoints(self) -> None:
        while not self._stop.wait(self.settings.checkpoint_every):
            try:
                self.checkpoint()
            except UserError as exc:  # a full disk: said, tried again next time
                log.warning("checkpoint failed: %s", exc)

    def checkpoint_paths(self) -> list[Path]:
        """The state files this service checkpoints to."""
        lanes = {id(lane): lane for lane in self._lanes.values()}.values()
        return [lane.state for lane in lanes if lane.state is not None]

    def checkpoint(self) -> list[Path]:
        """Save every state file now (atomically); return the files written."""
        with self._engine:
            snapshots = []
            for lane in {id(lane): lane for lane in self._lanes.values()}.values():
                if lane.state is not None and lane.pipeline.reservoir is not None:
                    reservoir = copy.deepcopy(lane.pipeline.reservoir)
                    snapshots.append((reservoir, lane.state, lane.pipeline.bundle))
        for reservoir, path, bundle in snapshots:
            save_reservoir(reservoir, path, bundle)
        return [path for _, path, _ in snapshots]

    # ------------------------------------------------------------------ status
    def source_names(self) -> list[str]:
        """The sources, in the order given."""
        return list(self.workers)

    def _check_source(self, name: str) -> None:
        if name not in self.workers:
            raise UnknownSource(f"no source named {shown(name)!r}")

    def failing_sources(self, max_age_s: float) -> list[str]:
        """Sources that delivered no frame within the last ``max_age_s`` seconds."""
        now = time.monotonic()
        failing = []
        for name in self.workers:
            last = self._stats[name].last_at
            since = last if last is not None else self._started_at
            if now - since > max_age_s:
                failing.append(name)
        return failing

    def _reservoir_fill(self) -> dict[str, tuple[dict[str, int], int]]:
        fill = {}
        with self._engine:
            for name, lane in self._lanes.items():
                reservoir = lane.pipeline.reservoir
                if reservoir is not None:
                    counts = reservoir.counts()
                    classes = lane.pipeline.bundle.classes
                    per_class = dict(zip(classes, (int(c) for c in counts), strict=True))
                    fill[name] = (per_class, int(reservoir.config.capacity))
        return fill

    def source_status(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per source (see SERVE-CONTRACT / docs/serve.md)."""
        fill = self._reservoir_fill()
        out = []
        for name, worker in self.workers.items():
            stats = self._stats[name]
            recent = list(stats.timings)
            latency = {}
            for stage in dict.fromkeys(k for t in recent for k in t):
                values = np.array([t[stage] for t in recent if stage in t])
                latency[stage] = {
                    "p50": round(float(np.percentile(values, 50)), 3),
                    "p95": round(float(np.percentile(values, 95)), 3),
                }
            fps = self._fps(name)
            last = stats.last_record
            out.append(
                {
                    "name": name,
                    "description": shown(worker.description),
                    "state": worker.state,
                    "error": worker.last_error,
                    "fps": round(fps, 2),
                    "latency_ms": latency,
                    "frames": stats.frames,
                    "errors": stats.errors,
                    "dropped": worker.dropped,
                    "failures": worker.failures,
                    "reconnects": worker.reconnects,
                    "reservoir_fill": fill[name][0] if name in fill else None,
                    "collapsed": self.watches.reason(name),
                    "last": None
                    if last is None
                    else {
                        "label": last["label"],
                        "class": last["class"],
                        "domain": last["domain"],
                        "score": last["topk"][0]["score"],
                        "time_utc": last["time_utc"],
                    },
                }
            )
        return out

    def states(self) -> dict[str, str]:
        """Each source's state: running, retrying or stopped."""
        return {name: worker.state for name, worker in self.workers.items()}

    # ------------------------------------------------------------------ requests
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
            self._check_source(source)
        elif adapt:
            raise UserError("adapt needs a source: the state of which source should change?")
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise UserError(f"topk must be a whole number of at least 1, got {topk!r}")
        with self._engine:
            lane = self._lanes[source] if source is not None else self._zeroshot_lane()
            if self._bound is not lane:
                lane.bind(self._zeros)
                self._bound = lane
            pipeline = lane.pipeline
            kept = pipeline.topk
            pipeline.topk = min(topk, pipeline.bundle.num_classes)
            try:
                result = pipeline.process(image.convert("RGB"), 0, source or "", adapt=adapt)
            finally:
                pipeline.topk = kept
        return result.to_record()

    def _zeroshot_lane(self) -> Lane:
        """A lane whose reservoir stays empty (classify without a source never adapts it)."""
        bundle = self._lanes[next(iter(self._lanes))].pipeline.bundle
        if self._zeroshot is None or self._zeroshot.pipeline.bundle is not bundle:
            tca = METHOD_STAGES[self.method].tca
            pipeline = Pipeline(
                bundle,
                self.backend,
                self.method,
                build_reservoir(bundle) if tca else None,
                self._fusion,
                self.settings.topk,
                self.settings.min_score,
                self.settings.crop,
            )
            self._zeroshot = Lane(pipeline, None)
            self._bound = None  # the new pipeline pushed its (empty) anchors
        return self._zeroshot

    def embed_image(self, image: Image.Image) -> list[float]:
        """The engine's image embedding (zero-shot: no anchors), L2-normalised."""
        with self._engine:
            lane = next(iter(self._lanes.values()))
            tensor = lane.pipeline.preprocessor(image.convert("RGB"))[None]
            if self._zeros is not None:
                self.backend.set_anchors(*self._zeros)
                self._bound = None
            embedding = self.backend.infer(tensor)[EMBEDDING_OUTPUT][0].astype(np.float64)
        norm = np.linalg.norm(embedding)
        if not np.isfinite(norm) or norm == 0:
            raise UserError("the engine gave no usable embedding for this image")
        return [float(v) for v in embedding / norm]

    def _encoder(self) -> Any:
        if self._text_encoder is None:
            from vlm_export.runtime.text.encoder import TextEncoder

            self._text_encoder = TextEncoder.open(self.bundle)
        return self._text_encoder

    def embed_texts(self, texts: list[str]) -> list[list[float]]:
        """Text embeddings through the bundle's text engine, L2-normalised."""
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UserError("give a non-empty list of strings")
        with self._classes_lock:
            vectors = np.asarray(self._encoder().embed_prompts(list(texts)), np.float64)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors.tolist()

    def classes(self) -> dict[str, Any]:
        """The live label space: class names and the templates they were embedded with."""
        bundle = self.bundle
        return {
            "classes": list(bundle.classes),
            "templates": bundle.manifest["text"].get("templates"),
        }

    def set_classes(self, names: list[str], templates: str | None = None) -> dict[str, Any]:
        """Replace the label space, as ``vlm-edge classes`` does (bundle rewritten atomically,
        states follow their labels); the next frame uses the new classes."""
        from vlm_export.runtime.text.bundle_classes import write_label_space
        from vlm_export.runtime.text.label_space import (
            choose_templates,
            embed_label_space,
            new_labels,
        )

        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise UserError("give a non-empty list of class names (non-empty strings)")
        if len(set(names)) != len(names):
            raise UserError("a class name is given twice")
        with self._classes_lock:
            bundle = self.bundle
            encoder = self._encoder()
            chosen, spec = choose_templates(bundle, templates)
            labels, domains = new_labels(bundle, names, None)
            space = embed_label_space(bundle, labels, domains, chosen, spec, encoder)
            with self._engine:
                lanes = list({id(lane): lane for lane in self._lanes.values()}.values())
                before = sum(self._entries(lane) for lane in lanes)
                kept = [
                    (lane, lane.pipeline.bundle, lane.pipeline.tca, lane.pipeline.fusion)
                    for lane in lanes
                ]
                try:
                    for lane in lanes:
                        lane.pipeline.set_classes(
                            space.names, space.text_embeddings, [d for d, _ in space.labels]
                        )
                    write_label_space(bundle, space)
                    reopened = Bundle.open(bundle.path, verify=False)
                except BaseException:
                    for lane, old_bundle, tca, fusion in kept:
                        pipeline = lane.pipeline
                        pipeline.bundle, pipeline.tca, pipeline.fusion = old_bundle, tca, fusion
                        pipeline.topk = min(self.settings.topk, old_bundle.num_classes)
                        pipeline._text_t = np.ascontiguousarray(old_bundle.text_embeddings.T)
                    raise
                finally:
                    self._bound = None  # set_classes pushed the last lane's anchors
                self.bundle = reopened
                if self._fusion is not None:
                    self._fusion = lanes[0].pipeline.fusion
                after = sum(self._entries(lane) for lane in lanes)
        log.info("classes replaced: %d classes", len(space.labels))
        return {**self.classes(), "dropped_entries": before - after}

    @staticmethod
    def _entries(lane: Lane) -> int:
        reservoir = lane.pipeline.reservoir
        return int(reservoir.counts().sum()) if reservoir is not None else 0

    # ------------------------------------------------------------------ live view
    def frame(
        self, name: str, after: int, timeout_s: float, fate: bool = False
    ) -> tuple[int, bytes] | None:
        """The newest annotated frame of ``name`` as JPEG with a sequence number > ``after``
        (waits up to ``timeout_s``); None on timeout."""
        self._check_source(name)
        stats = self._stats[name]
        with self._views:
            if not self._views.wait_for(
                lambda: stats.seq > after or self._stopped, timeout=max(0.0, timeout_s)
            ):
                return None
            if stats.view is None or stats.seq <= after:  # stopped meanwhile
                return None
            seq, view = stats.seq, stats.view
            cached = stats.jpeg.get(fate)
        if cached is not None and cached[0] == seq:
            return cached
        data = self._draw(name, view, fate)
        with self._views:
            if stats.seq == seq:
                stats.jpeg[fate] = (seq, data)
        return seq, data

    def _draw(self, name: str, view: tuple[Frame, FrameResult | None], fate: bool) -> bytes:
        frame, result = view
        try:
            if isinstance(frame.data, np.ndarray):
                image = image_from_array(frame.data, "BGR")
            else:
                image = load_image(frame.data)
        except UserError:
            image = Image.new("RGB", (320, 240), "gray")
        with_fate = fate and FATE_OUTPUT in self.bundle.engine_io("outputs")
        fps = self._fps(name)
        drawer = FrameDrawer(self.bundle, with_fate, self.settings.crop)
        picture = drawer(image.convert("RGB"), result, fps)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()

    def _fps(self, name: str) -> float:
        now = time.monotonic()
        times = [t for t in list(self._stats[name].times) if now - t <= FPS_WINDOW_S]
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def _open_engine(bundle: Bundle, settings: ServeSettings) -> tuple[Any, BudgetRun | None]:
    """The engine, or a ladder bundle's rungs started for ``target_ms`` (as ``run`` opens them)."""
    s = settings
    providers = s.providers.split(",") if s.providers else None
    if not runs_ladder(bundle, s.backend, s.precision, s.target_ms, s.adapt_budget, s.measure):
        engine = open_backend(
            bundle, s.backend, providers, s.threads, precision=s.precision,
            fallback=s.precision_fallback, allow_drift=s.allow_drift,
        )  # fmt: skip
        return engine, None
    return open_budgeted(
        bundle,
        s.backend,
        providers,
        s.threads,
        s.precision,
        target_ms=s.target_ms,
        adapt=s.adapt_budget,
        measure_first=s.measure,
        allow_drift=s.allow_drift,
    )
