"""A ladder bundle on the device: one engine per token budget (rung), one set of anchors, switched.

Every rung takes the same anchors [K, R, D], so one TCA reservoir serves all of them: the ladder
keeps the latest anchors and hands them to a rung when it becomes active. With ONNX Runtime on
CPU the rungs share their weights in memory too, pre-packed: the weights file is mapped once,
every session reads it, and the packed copies the MatMul kernels run on live once in a shared
container (``prepacked_rungs``, through ONNX Runtime's C API, which the Python API lacks). On
other providers, or without the C API library, the sessions share the mapped weights
(``SessionOptions.add_initializer``) and run without pre-packing. ``share_memory=False`` opens
every rung as a one-engine session. OpenVINO compiles the rungs as the branches of one model, so
they share one packed copy of the weights too (``openvino_rungs``; bf16 rungs, each pinned
through its own IR, compile one by one). TensorRT runs one engine per rung, each built for this
GPU by ``vlm-export build-engine`` from its rung's graph (``rung`` in the engine's record).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm_export.core.errors import BundleError, UserError
from vlm_export.core.manifest import IMAGE_INPUT
from vlm_export.core.option_names import option
from vlm_export.runtime.engines.base import EngineBackend
from vlm_export.runtime.engines.checks.bench_record import recorded_rungs
from vlm_export.runtime.engines.checks.reference import check_engine
from vlm_export.runtime.engines.ladder.budget import BudgetController, choose_rung
from vlm_export.runtime.engines.ladder.mapped_weights import MappedWeights

if TYPE_CHECKING:
    from vlm_export.runtime.bundle import Bundle

#: backends that run ladder rungs (TensorRT: once build-engine has built every rung)
LADDER_BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt")
#: what a ladder asks for when TensorRT engines exist for rung 0 only
NO_TENSORRT_RUNGS = (
    "this ladder's TensorRT engines cover rung 0 only: build every rung with "
    "`vlm-export build-engine BUNDLE` (it builds one engine per rung)"
)
#: what a ladder asks for when it has no INT8 rungs
NO_INT8_LADDER = (
    "this ladder has no INT8 rungs: add them with `vlm-export quantize BUNDLE --calibration DIR`"
)


@dataclass(frozen=True)
class Rung:
    """One token budget of a ladder: drop rate, graph, GFLOPs, tokens after the last reduction."""

    index: int
    drop_rate: float
    onnx: str
    gflops: float
    tokens: int
    #: this rung's INT8 graph (vlm-export quantize), None when the ladder has none
    int8: str | None = None

    @property
    def label(self) -> str:
        """How messages name it: ``rung 1 (drop rate 0.035, 53 tokens)``."""
        return f"rung {self.index} (drop rate {self.drop_rate:g}, {self.tokens} tokens)"


def ladder_rungs(manifest: dict[str, Any]) -> list[Rung]:
    """The rungs of a ladder bundle, largest budget first; empty for a one-engine bundle.

    BundleError when a rung's graph or the weights file is not a listed (hashed) bundle file.
    """
    ladder = manifest.get("ladder")
    if not isinstance(ladder, dict):
        return []
    listed = manifest["files"]
    int8 = ladder.get("int8") if isinstance(ladder.get("int8"), dict) else None
    int8_files = [str(record["onnx"]) for record in int8["rungs"]] if int8 else []
    if int8 and len(int8_files) != len(ladder["rungs"]):
        raise BundleError("manifest ladder.int8 lists another number of rungs than the ladder")
    names = [record["onnx"] for record in ladder["rungs"]] + [ladder["weights"]["file"]]
    names += int8_files + ([int8["weights"]["file"]] if int8 else [])
    unlisted = [name for name in names if name not in listed]
    if unlisted:
        raise BundleError(f"manifest ladder names unlisted files: {', '.join(unlisted[:3])}")
    return [
        Rung(
            index=index,
            drop_rate=float(record["drop_rate"]),
            onnx=str(record["onnx"]),
            gflops=float(record["gflops"]),
            tokens=int(record["schedule"][-1]["tokens_out"]),
            int8=int8_files[index] if int8_files else None,
        )
        for index, record in enumerate(ladder["rungs"])
    ]


class SharedWeights:
    """The ladder's weights file mapped once, as one ONNX Runtime value per shared tensor."""

    def __init__(self, bundle: Bundle, ort: Any, weights: dict[str, Any] | None = None) -> None:
        #: the mapping the values read (kept alive with them)
        self.mapped = MappedWeights(bundle, weights or bundle.manifest["ladder"]["weights"])
        self.values: dict[str, Any] = {
            name: ort.OrtValue.ortvalue_from_numpy(array)
            for name, array in self.mapped.arrays.items()
        }


class LadderBackend(EngineBackend):
    """The rungs' engines behind one backend: ``select`` switches the one that runs.

    Anchors are state of the ladder: set on the active rung, and handed whole to a rung when it
    becomes active, so the reservoir never needs to know which rung runs.
    """

    def __init__(
        self,
        rungs: Sequence[Rung],
        engines: Sequence[EngineBackend],
        start: int = 0,
        shared: Any = None,
    ):
        if len(rungs) != len(engines) or not rungs:
            raise ValueError("one engine per rung")
        self.rungs = list(rungs)
        self.engines = list(engines)
        #: what the rungs share (closed after them): a pre-packed weights group, or None
        self.shared = shared
        #: how the rungs hold their weights: "prepacked" (one packed copy for all rungs),
        #: "mapped" (one copy, not pre-packed), "per-rung"
        self.sharing = "per-rung"
        #: the precision every rung runs (fp32, int8, bf16)
        self.precision = "fp32"
        self.active = start
        self._anchors: tuple[np.ndarray, np.ndarray] | None = None
        self._current = {start}  # rungs that hold the latest anchors
        self.notes: list[str] = []
        #: the backend the rungs run on, as bench records name it (onnxruntime, openvino)
        self.backend_name = engines[0].description.split(":")[0]

    @property
    def rung(self) -> Rung:
        """The rung that runs now."""
        return self.rungs[self.active]

    @property
    def drop_rate(self) -> float:  # type: ignore[override]
        return self.rung.drop_rate

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"{self.engines[self.active].description} ladder {self.rung.label}"

    def select(self, index: int) -> None:
        """Run rung ``index`` from the next frame on (it gets the current anchors)."""
        if not 0 <= index < len(self.rungs):
            raise UserError(f"the ladder has rungs 0..{len(self.rungs) - 1}, not {index}")
        if index not in self._current and self._anchors is not None:
            self.engines[index].set_anchors(*self._anchors)
        self._current.add(index)
        self.active = index

    def set_anchors(self, anchors: np.ndarray, valid: np.ndarray) -> None:
        self._anchors = (anchors, valid)
        self._current = {self.active}
        self.engines[self.active].set_anchors(anchors, valid)

    def update_anchor_rows(self, anchors: np.ndarray, valid: np.ndarray, rows: np.ndarray) -> None:
        self._anchors = (anchors, valid)
        self._current = {self.active}
        self.engines[self.active].update_anchor_rows(anchors, valid, rows)

    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        return self.engines[self.active].infer(image)

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
        if self.shared is not None:
            self.shared.close()
            self.shared = None


def open_ladder(
    bundle: Bundle,
    backend: str = "auto",
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    precision: str | None = None,
    start: int = 0,
    share_memory: bool = True,
    allow_drift: bool = False,
    prepack: bool = True,
) -> LadderBackend:
    """Open every rung of a ladder bundle with one backend (``auto``: ONNX Runtime).

    ``share_memory`` gives ONNX Runtime sessions one copy of the weights: on the CPU provider
    with ``prepack``, one pre-packed copy (:mod:`prepacked_rungs`); otherwise the one mapping of
    the weights file, not pre-packed. Each rung runs the reference images against its own
    record (``engines.checks.reference.check_engine``).
    """
    rungs = ladder_rungs(bundle.manifest)
    if not rungs:
        raise UserError("this bundle has one engine, not a ladder (export with --drop-rates)")
    if backend not in LADDER_BACKENDS:
        raise UserError(
            f"ladder rungs run on {', '.join(LADDER_BACKENDS[1:])}; the {backend} engine is "
            "built for rung 0 only"
        )
    if backend == "tensorrt":
        if not tensorrt_rungs_built(bundle.manifest, len(rungs)):
            raise UserError(NO_TENSORRT_RUNGS)
    elif precision not in (None, "fp32", "int8") and not (
        backend == "openvino" and precision == "bf16"
    ):
        raise UserError(f"ladder rungs run fp32 and int8 (openvino also bf16), not {precision}")
    int8 = precision == "int8"
    if int8 and not all(rung.int8 for rung in rungs):
        raise UserError(NO_INT8_LADDER)
    engines: list[EngineBackend] = []
    shared: Any = None
    sharing = "per-rung"
    try:
        if backend == "openvino":
            engines, shared, sharing = _open_openvino_rungs(
                bundle, rungs, precision or "fp32", threads, share_memory
            )
        elif backend == "tensorrt":
            engines = _open_tensorrt_rungs(bundle, rungs, precision)
        else:
            engines, shared, sharing = _open_onnxruntime_rungs(
                bundle, rungs, providers, threads, share_memory and prepack, share_memory, int8
            )
        notes = []
        for rung, engine in zip(rungs, engines, strict=True):
            check_engine(bundle, engine, allow_drift, graph=rung.onnx)
            notes += [n for n in getattr(engine, "notes", []) if n not in notes]
    except BaseException:
        for engine in engines:
            engine.close()
        if shared is not None:
            shared.close()
        raise
    ladder = LadderBackend(rungs, engines, start, shared=shared)
    ladder.sharing = sharing
    ladder.precision = precision or "fp32"
    ladder.notes = notes
    return ladder


def tensorrt_rungs_built(manifest: dict[str, Any], count: int) -> bool:
    """Whether the manifest records a TensorRT image engine for each of ``count`` rungs."""
    from vlm_export.core.manifest import tensorrt_engines
    from vlm_export.runtime.engines.select import IMAGE_ROLE, engines_of_role

    engines = tensorrt_engines(manifest)
    return all(engines_of_role(engines, IMAGE_ROLE, index) for index in range(count))


def _open_tensorrt_rungs(
    bundle: Bundle, rungs: Sequence[Rung], precision: str | None
) -> list[EngineBackend]:
    """One TensorRT engine per rung: the rung's engine for this GPU, bound to its graph's view."""
    from vlm_export.runtime.engines.factory import graph_view, tensorrt_module

    module = tensorrt_module()
    engines: list[EngineBackend] = []
    try:
        for rung in rungs:
            view = graph_view(bundle, rung.onnx)
            engines.append(module.TensorRTBackend(view, precision, rung=rung.index))
    except BaseException:
        for engine in engines:
            engine.close()
        raise
    return engines


def _open_openvino_rungs(
    bundle: Bundle, rungs: Sequence[Rung], precision: str, threads: int | None, share: bool
) -> tuple[list[EngineBackend], Any, str]:
    """The rungs' OpenVINO engines, what they share (to close after them) and how: fp32 and
    int8 rungs compiled as one model with one packed copy of the weights (``openvino_rungs``);
    bf16 rungs (each pinned through its own IR) and ``share=False`` compiled one by one."""
    from vlm_export.runtime.engines.backends.openvino_backend import OpenVinoBackend

    int8 = precision == "int8"
    graphs = [str(rung.int8 if int8 else rung.onnx) for rung in rungs]
    if share and precision in ("fp32", "int8"):
        from vlm_export.runtime.engines.ladder.openvino_rungs import open_openvino_rungs

        ladder = bundle.manifest["ladder"]
        weights = ladder["int8"]["weights"] if int8 else ladder["weights"]
        engines, group = open_openvino_rungs(bundle, graphs, precision, threads, weights)
        return list(engines), group, "prepacked"
    engines: list[EngineBackend] = []
    try:
        for graph in graphs:
            engines.append(OpenVinoBackend(bundle, precision, threads, graph=bundle.path / graph))
    except BaseException:
        for engine in engines:
            engine.close()
        raise
    return engines, None, "per-rung"


def _open_onnxruntime_rungs(
    bundle: Bundle,
    rungs: Sequence[Rung],
    providers: Sequence[str] | None,
    threads: int | None,
    prepack: bool,
    share: bool,
    int8: bool = False,
) -> tuple[list[EngineBackend], Any, str]:
    """The rungs' ONNX Runtime engines (their INT8 graphs with ``int8``), what they share (to
    close after them) and how."""
    from vlm_export.runtime.engines.backends.onnxruntime_backend import (
        OnnxRuntimeBackend,
        choose_providers,
        import_onnxruntime,
    )
    from vlm_export.runtime.engines.factory import graph_view

    ort = import_onnxruntime()
    chosen = choose_providers(providers, ort.get_available_providers())
    ladder = bundle.manifest["ladder"]
    weights = ladder["int8"]["weights"] if int8 else ladder["weights"]
    graphs = [str(rung.int8 if int8 else rung.onnx) for rung in rungs]
    suffix = ":int8" if int8 else ""
    if prepack and chosen == ["CPUExecutionProvider"]:
        from vlm_export.runtime.engines.backends import ort_capi
        from vlm_export.runtime.engines.ladder.prepacked_rungs import open_prepacked_rungs

        if threads is not None and threads < 1:
            raise UserError(f"{option('threads')} must be at least 1, got {threads}")
        try:
            prepacked, group = open_prepacked_rungs(bundle, ort, graphs, threads, weights)
        except ort_capi.CApiMissing:
            pass  # sessions sharing the mapped weights, not pre-packed, below
        else:
            for engine in prepacked:
                engine.description += suffix
            return list(prepacked), group, "prepacked"
    shared = SharedWeights(bundle, ort, weights) if share else None
    engines: list[EngineBackend] = []
    for graph in graphs:
        engine = OnnxRuntimeBackend(
            graph_view(bundle, graph),  # type: ignore[arg-type]
            providers=providers,
            threads=threads,
            initializers=shared.values if shared else None,
        )
        engine.description += suffix
        engine.shared = shared  # type: ignore[attr-defined]  # keeps the mapping alive
        engines.append(engine)
    return engines, None, "mapped" if shared else "per-rung"


#: rounds per rung when --measure times the rungs before running
MEASURE_ROUNDS = 10
#: the largest --target-ms taken (as serve's): beyond, every rung meets it (three hours a frame)
MAX_TARGET_MS = 1e7


def measure_rungs(ladder: LadderBackend, image_shape: Sequence[int], rounds: int) -> list[float]:
    """p90 milliseconds of every rung on this device now (interleaved, synthetic image)."""
    from vlm_export.runtime.engines.checks import measure

    image = measure.synthetic_images(image_shape, 1)[0]
    runners = {i: (lambda e=engine: e.infer(image)) for i, engine in enumerate(ladder.engines)}
    timings = measure.interleaved_latency(runners, rounds, warmup=2)
    return [timings[i]["p90_ms"] for i in range(len(ladder.engines))]


class BudgetRun:
    """A ladder started for a latency target, optionally switched while running.

    ``reason`` says which rung it started on and why; ``after_frame`` feeds the adaptive
    controller one frame time and returns a line when it switched rungs.
    """

    def __init__(self, ladder: LadderBackend, controller: BudgetController | None, reason: str):
        self.ladder = ladder
        self.controller = controller
        self.reason = reason

    def after_frame(self, frame_ms: float) -> str | None:
        """Feed one frame time; the line to show when the rung changed, else None."""
        if self.controller is None:
            return None
        before = self.ladder.rung
        rung = self.controller.observe(frame_ms)
        if rung is None:
            return None
        self.ladder.select(rung)
        way = "down" if rung > before.index else "up"
        return (
            f"budget {way}: {before.label} -> {self.ladder.rung.label} (moving p90 against "
            f"{option('target_ms')} {self.controller.target:g})"
        )


def start_budget(
    ladder: LadderBackend,
    bundle: Bundle,
    target_ms: float,
    adapt: bool = False,
    measure_first: bool = False,
) -> BudgetRun:
    """Select the largest rung whose p90 (recorded by ``vlm-edge bench`` for this device and
    backend, or measured now with ``measure_first``) meets ``target_ms``, else the smallest.

    UserError in one line when nothing is recorded and ``measure_first`` is off.
    """
    if not 0 < target_ms < MAX_TARGET_MS:  # NaN and infinity too: no frame rate
        raise UserError(
            f"{option('target_ms')} must be a positive number of milliseconds below "
            f"{MAX_TARGET_MS:g}, got {target_ms}"
        )
    rows = recorded_rungs(bundle, ladder.backend_name, ladder.precision)
    if rows is not None and len(rows) != len(ladder.rungs):
        rows = None
    if rows is not None:
        p90 = [float(row["p90_ms"]) for row in rows]
        where = f"recorded by vlm-edge bench ({ladder.backend_name})"
    elif measure_first:
        shape = [int(v) for v in bundle.engine_io("inputs")[IMAGE_INPUT]["shape"]]
        p90 = measure_rungs(ladder, shape, MEASURE_ROUNDS)
        where = f"measured now over {MEASURE_ROUNDS} rounds (not recorded: vlm-edge bench keeps it)"
    else:
        raise UserError(
            f"{option('target_ms')} needs this device's rung latencies ({ladder.backend_name} "
            f"{ladder.precision}): "
            f"run `vlm-edge bench BUNDLE` first, or add {option('measure')} to time the rungs "
            "before running"
        )
    choice = choose_rung(p90, [rung.drop_rate for rung in ladder.rungs], target_ms)
    ladder.select(choice.index)
    controller = BudgetController(p90, target_ms, start=choice.index) if adapt else None
    return BudgetRun(ladder, controller, f"{choice.reason}; p90 {where}")


def runs_ladder(
    bundle: Bundle,
    backend: str,
    precision: str | None,
    target_ms: float | None,
    adapt: bool | None,
    measure: bool | None,
) -> bool:
    """Whether ``run`` and ``serve`` open the ladder's rungs (:func:`open_budgeted`) rather than
    one engine: when a budget option is given, or for a ladder bundle on a backend and precision
    its rungs run in (fp32 ONNX Runtime or OpenVINO, and INT8 when the ladder has INT8 rungs;
    TensorRT when build-engine built every rung)."""
    if target_ms is not None or adapt or measure:
        return True
    rungs = ladder_rungs(bundle.manifest)
    int8 = precision == "int8" and bool(rungs) and all(rung.int8 for rung in rungs)
    if backend == "tensorrt":
        return bool(rungs) and tensorrt_rungs_built(bundle.manifest, len(rungs))
    plain = precision not in (None, "fp32") and not int8
    return not plain and bool(rungs)


def open_budgeted(
    bundle: Bundle,
    backend: str = "auto",
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    precision: str | None = None,
    *,
    target_ms: float | None = None,
    adapt: bool = False,
    measure_first: bool = False,
    allow_drift: bool = False,
) -> tuple[LadderBackend, BudgetRun | None]:
    """A ladder bundle's rungs, started for ``target_ms`` when given (``run`` / ``serve`` / API).

    Without a target the ladder runs rung 0 (the largest budget). ``adapt`` and
    ``measure_first`` need a target; a one-engine bundle cannot take any of them.
    """
    if (adapt or measure_first) and target_ms is None:
        raise UserError(
            f"{option('adapt_budget')} and {option('measure')} need {option('target_ms', 'MS')}"
        )
    if not ladder_rungs(bundle.manifest):
        raise UserError(
            f"{option('target_ms')} needs a ladder bundle (vlm-export --drop-rates "
            "0,0.035,0.06,0.1); "
            "this bundle has one engine"
        )
    ladder = open_ladder(bundle, backend, providers, threads, precision, allow_drift=allow_drift)
    if target_ms is None:
        return ladder, None
    try:
        return ladder, start_budget(ladder, bundle, target_ms, adapt, measure_first)
    except BaseException:
        ladder.close()
        raise
