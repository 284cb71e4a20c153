"""The service behind ``vlm-edge serve``: one engine, many sources, adaptation per source.

The service composes its rooms and holds their lifetimes: the sources' workers (``workers``: a
newest-frame capture thread each, reopened with backoff), their lanes on the one engine
(``lanes``: a pipeline and state file per source, or one shared), the scheduler thread that serves
them in turn (``scheduler``), what is remembered of their frames (``views``) and the operations the
HTTP routes call (``operations``), with the events and metrics. Everything public is thread-safe:
the engine, reservoirs, classes and fusion change under one lock (``lanes.lock``); the HTTP app
calls into the service from its own threads.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from PIL import Image

from vlm_export.core.errors import UserError, shown
from vlm_export.core.manifest import FATE_OUTPUT
from vlm_export.runtime.api import default_method, fusion_dropped
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.draw.frame import FrameDrawer
from vlm_export.runtime.engines.base import EngineBackend
from vlm_export.runtime.engines.factory import open_backend
from vlm_export.runtime.engines.ladder.ladder import BudgetRun, open_budgeted, runs_ladder
from vlm_export.runtime.io.sources import Source, open_source
from vlm_export.runtime.pipeline import METHOD_STAGES
from vlm_export.runtime.rail.models import open_fusion
from vlm_export.runtime.serve.config import ServeSettings
from vlm_export.runtime.serve.frames.lanes import Lanes, state_file
from vlm_export.runtime.serve.frames.scheduler import Scheduler
from vlm_export.runtime.serve.frames.views import LiveFrame, LiveViews
from vlm_export.runtime.serve.frames.watch import SourceWatches
from vlm_export.runtime.serve.frames.workers import Opener, SourceWorker
from vlm_export.runtime.serve.operations import Operations, UnknownSource
from vlm_export.runtime.serve.outputs.events import Events, open_sink
from vlm_export.runtime.serve.outputs.metrics import ServeMetrics
from vlm_export.runtime.serve.teaching.teacher import Teaching

__all__ = ["Service", "UnknownSource", "state_file"]

log = logging.getLogger(__name__)


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
        self.backend = backend
        self.metrics = ServeMetrics()
        self.registry = self.metrics.registry
        self.method = settings.method or default_method(bundle, bool(settings.rail_state))
        self._check_method()
        fusion = open_fusion(settings.rail_state, bundle) if settings.rail_state else None
        self.lanes = Lanes(bundle, backend, self.method, fusion, settings)
        self.notes = self.lanes.notes  # start-up lines the command prints
        if fusion_dropped(bundle, bool(settings.rail_state)) and not settings.method:
            dropped = f"without --rail-state, method {bundle.method} runs as {self.method}"
            self.notes.insert(0, dropped)
        names = [name for name, _ in settings.sources]
        self.views = LiveViews(names, self._drawer)
        self.operations = Operations(self.lanes, names, settings.topk)
        self.events = Events(
            [open_sink(spec, self.metrics) for spec in settings.events], settings.event_every
        )
        self.teaching = self._teaching()
        self._started_at = time.monotonic()
        self.workers: dict[str, SourceWorker] = {}
        self.scheduler = Scheduler(
            self.workers, self.lanes, self.views, self.metrics, self.events, settings.max_fps
        )
        if self.teaching is not None:
            self.scheduler.listeners.append(self.teaching.recent.on_frame)
        for name, spec in settings.sources:  # opened here: one line now for one that fails
            self.metrics.add_source(name)
            self.workers[name] = self._worker(name, spec, opener or self._opener(name))
        self.metrics.watch_reservoirs(self.lanes.fill)
        if self.teaching is not None and self.teaching.fleet is not None:
            self.metrics.watch_fleet(self.teaching.fleet.counts)
        self.watches = SourceWatches(list(self.workers), self.metrics, self.events)
        self.scheduler.listeners.append(self.watches.on_frame)
        self._threads: list[threading.Thread] = []
        self._running = False
        self._stopped = False

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
        if s.shared_state and not stages.tca:
            raise UserError(f"--shared-state needs method tca or tca+rail, not {self.method}")
        if stages.fusion and not s.rail_state:
            raise UserError(f"method {self.method} needs --rail-state FILE (from vlm-edge learn)")
        if s.rail_state and not stages.fusion:
            raise UserError(f"--rail-state needs method rail or tca+rail (running {self.method})")

    def _teaching(self) -> Teaching | None:
        """Teaching by example, unless a fixed RAIL state is fused (--rail-state)."""
        if self.settings.rail_state:
            self.notes.append("teaching is off: this service fuses the fixed --rail-state")
            return None
        teaching = Teaching(self.lanes, self.operations, self.settings)
        self.notes.extend(teaching.notes)
        return teaching

    def _opener(self, name: str) -> Opener:
        """``open_source`` with the source's reading options (stride, camera size and rate)."""
        options = self.settings.source_options(name)

        def opener(spec: str) -> Source:
            return open_source(spec, options)

        return opener

    def _worker(self, name: str, spec: str, opener: Opener) -> SourceWorker:
        opened = failed = None
        if name in self.lanes.failed:  # its state cannot be used: it stays down, visibly
            worker = SourceWorker(name, spec, loop=False, wake=lambda: None, metrics=self.metrics)
            worker.state, worker.last_error = "failed", self.lanes.failed[name]
            return worker
        try:
            opened = opener(spec)
        except Exception as exc:  # noqa: BLE001 - one line; the others start, this one retries
            failed = f"cannot open: {exc}"
            log.warning("source %s: %s (retrying)", name, shown(failed))
        return SourceWorker(
            name,
            spec,
            loop=self.settings.loop,
            wake=self.scheduler.wake.set,
            metrics=self.metrics,
            retry_initial_s=self.settings.retry_initial_s,
            retry_max_s=self.settings.retry_max_s,
            opener=opener,
            opened=opened,
            failed=failed,
        )

    def _drawer(self, fate: bool) -> FrameDrawer:
        bundle = self.bundle
        with_fate = fate and FATE_OUTPUT in bundle.engine_io("outputs")
        return FrameDrawer(bundle, with_fate, self.settings.crop)

    @property
    def bundle(self) -> Bundle:
        """The live bundle (replaced when the classes change)."""
        return self.lanes.bundle

    @property
    def budget(self) -> BudgetRun | None:
        """The ladder's latency budget (--target-ms), None without one."""
        return self.scheduler.budget

    @budget.setter
    def budget(self, value: BudgetRun | None) -> None:
        self.scheduler.budget = value

    def describe(self) -> str:
        """One line: method, engine, how sources are served."""
        lanes = len(self.lanes.unique())
        count = len(self.workers)
        if count == 1:
            how = "1 source"
        elif lanes == 1:
            how = f"{count} sources in turn, one shared state (batch-1 engine: no batching)"
        else:
            how = f"{count} sources in turn, one state each (batch-1 engine: no batching)"
        crop = self.lanes.unique()[0].pipeline.preprocessor.crop
        return f"{self.method} on {self.backend.description}; {how}; crop {crop}"

    # ------------------------------------------------------------------ running
    def start(self) -> None:
        """Start the source workers, the scheduler, checkpoints and events."""
        if self._running:
            return
        self._running = True
        one_blas_thread()
        self._started_at = time.monotonic()
        for name, worker in self.workers.items():
            if name not in self.lanes.failed:
                worker.start()
        self.events.start(self.states)
        if self.teaching is not None:
            self.teaching.start()
        threads = ((self.scheduler.run, "vlm-scheduler"), (self._checkpoints, "vlm-ckpt"))
        for target, name in threads:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop everything, save every state (the last checkpoint), close the engine."""
        if self._stopped:
            return
        self._stopped = True
        self.scheduler.stopping.set()
        self.scheduler.wake.set()
        for thread in self._threads:
            thread.join(30.0)
        for name, worker in self.workers.items():
            if name not in self.lanes.failed:
                worker.stop()
        try:
            if self.teaching is not None:
                self.teaching.finish()  # what was taught last is in the last checkpoint
            self.checkpoint()
        finally:
            if self.teaching is not None:
                self.teaching.close()
            self.events.close()
            with self.lanes.lock:
                self.backend.close()
            self.views.close()

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

    def _checkpoints(self) -> None:
        while not self.scheduler.stopping.wait(self.settings.checkpoint_every):
            try:
                self.checkpoint()
            except UserError as exc:  # a full disk: said, tried again next time
                log.warning("checkpoint failed: %s", exc)

    def checkpoint_paths(self) -> list[Path]:
        """The state files this service checkpoints to."""
        return self.lanes.state_paths()

    def checkpoint(self) -> list[Path]:
        """Save every state file now (atomically); return the files written."""
        written = self.lanes.checkpoint()
        taught = self.teaching.checkpoint() if self.teaching is not None else None
        return written if taught is None else [*written, taught]

    # ------------------------------------------------------------------ status
    def source_names(self) -> list[str]:
        """The sources, in the order given."""
        return list(self.workers)

    def failing_sources(self, max_age_s: float) -> list[str]:
        """Sources that delivered no frame within the last ``max_age_s`` seconds."""
        now = time.monotonic()
        failing = []
        for name in self.workers:
            last = self.views.stats[name].last_at
            since = last if last is not None else self._started_at
            if name in self.lanes.failed or now - since > max_age_s:
                failing.append(name)
        return failing

    def source_status(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per source (see docs/serve-http.md)."""
        fill = self.lanes.fill()
        out = []
        for name, worker in self.workers.items():
            stats = self.views.stats[name]
            last = stats.last_record
            out.append(
                {
                    "name": name,
                    "description": shown(worker.description),
                    "state": worker.state,
                    "error": worker.last_error,
                    "fps": round(stats.fps(), 2),
                    "latency_ms": stats.latency(),
                    "frames": stats.frames,
                    "errors": stats.errors,
                    "dropped": worker.dropped,
                    "failures": worker.failures,
                    "reconnects": worker.reconnects,
                    "reservoir_fill": fill[name][0] if name in fill else None,
                    "seq": stats.seq,
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
        """Each source's state: running, retrying, failed or stopped."""
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
        """The record ``vlm-edge run`` gives ``image`` (see ``Operations.classify``)."""
        return self.operations.classify(image, source=source, adapt=adapt, topk=topk)

    def embed_image(self, image: Image.Image) -> list[float]:
        """The engine's image embedding (zero-shot: no anchors), L2-normalised."""
        return self.operations.embed_image(image)

    def embed_texts(self, texts: list[str]) -> list[list[float]]:
        """Text embeddings through the bundle's text engine, L2-normalised."""
        return self.operations.embed_texts(texts)

    def classes(self) -> dict[str, Any]:
        """The live label space: class names and the templates they were embedded with."""
        return self.operations.classes()

    def set_classes(self, names: list[str], templates: str | None = None) -> dict[str, Any]:
        """Replace the label space (see ``Operations.set_classes``)."""
        return self.operations.set_classes(names, templates)

    def frame(
        self, name: str, after: int, timeout_s: float, fate: bool = False
    ) -> tuple[int, bytes] | None:
        """The newest annotated frame of ``name`` as JPEG with a sequence number > ``after``
        (waits up to ``timeout_s``); None on timeout."""
        self.operations.check_source(name)
        return self.views.frame(name, after, timeout_s, fate)

    def live_frame(
        self, name: str, after: int, timeout_s: float, fate: bool = False
    ) -> LiveFrame | None:
        """As ``frame``, with the frame's decision."""
        self.operations.check_source(name)
        return self.views.live(name, after, timeout_s, fate)


def one_blas_thread() -> None:
    """Run NumPy's BLAS on one thread in this process: the engine's own threads keep the cores.
    Two BLAS threads beside a 2-thread engine on 2 cores cost 14% of the frame rate while
    teaching (benchmarks/bench_teach.py: 0.856 of quiet; 0.982 with one)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an install from before [serve] brought it: BLAS keeps its threads
        log.info("threadpoolctl is not installed: NumPy's BLAS keeps its threads")
        return
    threadpool_limits(limits=1, user_api="blas")


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
