"""Choose and open an engine backend for a bundle (ONNX Runtime, OpenVINO, TensorRT, ncnn, ...)."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import onnx_engines, openvino_engines, tensorrt_engines
from vlm_export.core.option_names import option, option_value
from vlm_export.runtime.engines.base import BundleGraph, EngineBackend
from vlm_export.runtime.engines.checks.bench_record import best_recorded
from vlm_export.runtime.engines.checks.reference import check_engine
from vlm_export.runtime.engines.select import IMAGE_ROLE, engines_of_role

if TYPE_CHECKING:
    from vlm_export.runtime.bundle import Bundle

BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt", "ncnn", "rknn", "litert")
#: precisions by backend (the first is the default); int8 runs the bundle's quantized ONNX graph
BACKEND_PRECISIONS = {
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
    "tensorrt": ("fp16", "fp32"),
    "ncnn": ("fp32",),
    "rknn": ("fp16",),
    "litert": ("fp32",),
}
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
TENSORRT_MODULE = "vlm_export.runtime.engines.backends.tensorrt_backend"


log = logging.getLogger(__name__)


def capped_threads(threads: object) -> int | None:
    """The inference threads to ask for: None (the backend's default), or a whole number from
    1 up, capped at this machine's cores with a warning (more threads than cores only wait on
    each other); UserError for anything else. 0 is the default, as None."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not hasattr(threads, "__index__"):
        raise UserError(f"{option('threads')} must be a whole number, got {type(threads).__name__}")
    count = threads.__index__()
    if count < 0:
        raise UserError(f"{option('threads')} must be 0 (the default) or more, got {count}")
    if count == 0:
        return None
    cores = os.cpu_count() or 1
    if count > cores:
        log.warning(
            "%s %d is more than the %d cores here; using %d", option("threads"), count, cores, cores
        )
        return cores
    return count


def tensorrt_module() -> Any:
    """The TensorRT backend's module; UserError (one line) where it cannot be imported."""
    try:
        return importlib.import_module(TENSORRT_MODULE)
    except ImportError as exc:
        raise UserError(
            f'the TensorRT backend is not available ({exc}); pip install ".[tensorrt]" on a '
            f"device with TensorRT, or use {option_value('backend', 'onnxruntime')}"
        ) from None


def _open_tensorrt(bundle: Bundle) -> EngineBackend:
    return tensorrt_module().TensorRTBackend(bundle)


def int8_graph(bundle: Bundle) -> str:
    """The file name of the bundle's INT8 ONNX graph; UserError when it has none."""
    records = onnx_engines(bundle.manifest, "int8")
    if not records:
        raise UserError(
            "this bundle has no INT8 graph: add one with `vlm-export quantize BUNDLE "
            "--calibration DIR`"
        )
    return str(records[-1]["file"])


def graph_view(bundle: Bundle, onnx_file: str) -> BundleGraph:
    """The bundle as a backend reads it, with ``onnx_file`` as its image encoder."""
    manifest = dict(bundle.manifest)
    manifest["engine"] = {**manifest["engine"], "onnx": onnx_file}
    return BundleGraph(bundle.path, manifest)


def _check_precision(backend: str, precision: str | None) -> str:
    allowed = BACKEND_PRECISIONS[backend]
    if precision is None:
        return allowed[0]
    if precision not in allowed:
        raise UserError(f"the {backend} backend runs {', '.join(allowed)}, not {precision!r}")
    return precision


def _open_openvino(
    bundle: Bundle, precision: str | None, threads: int | None, fallback: bool
) -> EngineBackend:
    precision = _check_precision("openvino", precision)
    from vlm_export.runtime.engines.backends.openvino_backend import OpenVinoBackend

    graph = None
    if precision == "int8":  # the bundle's NNCF IR where it has one, else its QDQ ONNX graph
        irs = openvino_engines(bundle.manifest, "int8")
        graph = bundle.path / (str(irs[-1]["file"]) if irs else int8_graph(bundle))
    return OpenVinoBackend(bundle, precision, threads=threads, fallback=fallback, graph=graph)


def _open_ncnn(bundle: Bundle, precision: str | None, threads: int | None) -> EngineBackend:
    _check_precision("ncnn", precision)
    from vlm_export.runtime.engines.backends.ncnn_backend import NcnnBackend

    return NcnnBackend(bundle, threads=threads)


def _open_rknn(
    bundle: Bundle, providers: Sequence[str] | None, threads: int | None, precision: str | None
) -> EngineBackend:
    """The bundle's RKNN graph on a Rockchip NPU (rknn-toolkit-lite2, imported only now)."""
    if providers or threads is not None:
        raise UserError(
            f"{option('providers')} and {option('threads')} apply to the onnxruntime backend only"
        )
    _check_precision("rknn", precision)
    from vlm_export.runtime.engines.backends.rknn_backend import open_rknn

    return open_rknn(bundle)  # type: ignore[arg-type]


def _open_litert(bundle: Bundle, precision: str | None, threads: int | None) -> EngineBackend:
    _check_precision("litert", precision)
    from vlm_export.runtime.engines.backends.litert_backend import LiteRtBackend

    return LiteRtBackend(bundle, threads=threads)


def _open_onnxruntime_int8(
    bundle: Bundle, providers: Sequence[str] | None, threads: int | None
) -> EngineBackend:
    from vlm_export.runtime.engines.backends.onnxruntime_backend import OnnxRuntimeBackend

    graph = graph_view(bundle, int8_graph(bundle))
    opened = OnnxRuntimeBackend(graph, providers=providers, threads=threads)  # type: ignore[arg-type]
    opened.description += ":int8"
    return opened


def _open_recorded(bundle: Bundle, threads: int | None) -> EngineBackend | None:
    """``auto`` with a bench record of this device: the fastest passing engine, with a note."""
    choice = best_recorded(bundle, BACKENDS[1:], PRECISIONS)  # names this tool can open
    if choice is None:
        return None
    precision = None if choice.backend == "tensorrt" else choice.precision
    try:
        opened = _open(bundle, choice.backend, threads=threads, precision=precision)
    except (UserError, RuntimeError) as exc:
        log.warning(
            "bench recorded %s %s as fastest, but it cannot be opened now (%s); choosing as "
            "without a record",
            choice.backend,
            choice.precision,
            _one_line(exc),
        )
        return None
    note = f"auto chose {choice.backend} {choice.precision}: {choice.reason}"
    opened.notes = [note, *getattr(opened, "notes", [])]  # type: ignore[attr-defined]
    return opened


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def open_backend(
    bundle: Bundle,
    backend: str = "auto",
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    precision: str | None = None,
    fallback: bool = False,
    allow_drift: bool = False,
) -> EngineBackend:
    """Open the engine of ``bundle`` with the chosen backend.

    ``auto`` uses TensorRT when the bundle lists engines and TensorRT loads one for this device
    (the backend's ``notes`` say why the other engines were not chosen), otherwise ONNX Runtime,
    with one logged warning saying why the engines were not used (TensorRT or CUDA
    missing, no GPU, no engine for this TensorRT and GPU). Naming ``providers`` or ``threads``
    selects ONNX Runtime directly. When ``vlm-edge bench`` recorded results for this device and
    bundle, ``auto`` (without providers or precision) opens the fastest engine that passed parity
    there and notes why. ``precision`` picks fp32/bf16/int8 (see BACKEND_PRECISIONS; ``fallback``
    lets an unavailable bf16 run fp32). Backends are imported only when used; a missing one is a
    UserError naming the extra to install.

    The opened engine runs the bundle's reference images and is refused (EngineDriftError) when
    its embeddings drifted from the bundle's record beyond its precision's bound, unless
    ``allow_drift`` (then a warning), or collapsed (always); see ``engines.checks.reference``.
    """
    opened = _open(bundle, backend, providers, threads, precision, fallback)
    try:
        check_engine(bundle, opened, allow_drift)
    except BaseException:
        opened.close()
        raise
    return opened


def _open(
    bundle: Bundle,
    backend: str,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    precision: str | None = None,
    fallback: bool = False,
) -> EngineBackend:
    """``open_backend`` without the reference check."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if backend == "openvino":
        if providers:
            raise UserError(f"{option('providers')} applies to the onnxruntime backend only")
        return _open_openvino(bundle, precision, threads, fallback)
    if backend == "ncnn":
        if providers:
            raise UserError(f"{option('providers')} applies to the onnxruntime backend only")
        return _open_ncnn(bundle, precision, threads)
    if backend == "rknn":
        return _open_rknn(bundle, providers, threads, precision)
    if backend == "litert":
        if providers:
            raise UserError(f"{option('providers')} applies to the onnxruntime backend only")
        return _open_litert(bundle, precision, threads)
    if backend == "tensorrt":
        if providers or threads is not None:
            raise UserError(
                f"{option('providers')} and {option('threads')} apply to the onnxruntime backend "
                "only"
            )
        if precision is not None:
            raise UserError("the tensorrt backend runs the engine the bundle lists for this GPU")
        return _open_tensorrt(bundle)
    if backend == "auto" and not providers and precision is None:
        recorded = _open_recorded(bundle, threads)
        if recorded is not None:
            return recorded
    if precision is not None and _check_precision("onnxruntime", precision) == "int8":
        return _open_onnxruntime_int8(bundle, providers, threads)
    tensorrt_problem = None
    image_engines = engines_of_role(tensorrt_engines(bundle.manifest), IMAGE_ROLE)
    plain_auto = backend == "auto" and not providers and threads is None and precision is None
    if plain_auto and image_engines:
        try:
            return _open_tensorrt(bundle)
        except (UserError, RuntimeError) as exc:  # RuntimeError: a CUDA call failed
            tensorrt_problem = exc
    # imports onnxruntime only now, inside the backend: OnnxRuntimeMissing when not installed
    from vlm_export.runtime.engines.backends.onnxruntime_backend import (
        OnnxRuntimeBackend,
        OnnxRuntimeMissing,
    )

    try:
        opened = OnnxRuntimeBackend(bundle, providers=providers, threads=threads)
    except OnnxRuntimeMissing as exc:
        if tensorrt_problem is None:
            raise
        raise OnnxRuntimeMissing(
            f"{exc}; the bundle's TensorRT engine could not be used either ({tensorrt_problem})"
        ) from None
    if tensorrt_problem is not None:
        log.warning(
            "TensorRT engine not used: %s; running ONNX Runtime (%s)",
            _one_line(tensorrt_problem),
            ", ".join(opened.providers),
        )
    return opened
