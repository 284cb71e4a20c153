"""Choose and open an engine backend for a bundle (ONNX Runtime or TensorRT)."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vlm_export.core.errors import UserError
from vlm_export.runtime.engines.base import EngineBackend
from vlm_export.runtime.engines.select import IMAGE_ROLE, engines_of_role

if TYPE_CHECKING:
    from vlm_export.runtime.bundle import Bundle

BACKENDS = ("auto", "onnxruntime", "tensorrt")
TENSORRT_MODULE = "vlm_export.runtime.engines.tensorrt_backend"


class TensorRTNotUsedWarning(UserWarning):
    """``auto``: the bundle lists TensorRT engines, but none could be used here."""


def _open_tensorrt(bundle: Bundle) -> EngineBackend:
    try:
        module = importlib.import_module(TENSORRT_MODULE)
    except ImportError as exc:
        raise UserError(
            f"the TensorRT backend is not available ({exc}); install vlm-export[tensorrt] on a "
            "device with TensorRT, or use --backend onnxruntime"
        ) from None
    return module.TensorRTBackend(bundle)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def open_backend(
    bundle: Bundle,
    backend: str = "auto",
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> EngineBackend:
    """Open the engine of ``bundle`` with the chosen backend.

    ``auto`` uses TensorRT when the bundle lists engines and TensorRT loads one for this device
    (the backend's ``notes`` say why the other engines were not chosen), otherwise ONNX Runtime,
    with one TensorRTNotUsedWarning saying why the engines were not used (TensorRT or CUDA
    missing, no GPU, no engine for this TensorRT and GPU). Naming ``providers`` or ``threads``
    selects ONNX Runtime directly. ONNX Runtime is imported only when it is used; without it the
    UserError says which extra to install.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "tensorrt":
        if providers or threads is not None:
            raise UserError("--providers and --threads apply to the onnxruntime backend only")
        return _open_tensorrt(bundle)
    tensorrt_problem = None
    image_engines = engines_of_role(bundle.manifest["engines"], IMAGE_ROLE)
    if backend == "auto" and not providers and threads is None and image_engines:
        try:
            return _open_tensorrt(bundle)
        except (UserError, RuntimeError) as exc:  # RuntimeError: a CUDA call failed
            tensorrt_problem = exc
    # imports onnxruntime only now, inside the backend: OnnxRuntimeMissing when not installed
    from vlm_export.runtime.engines.onnxruntime_backend import (
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
        warnings.warn(
            TensorRTNotUsedWarning(
                f"TensorRT engine not used: {_one_line(tensorrt_problem)}; running ONNX Runtime "
                f"({', '.join(opened.providers)})"
            ),
            stacklevel=2,
        )
    return opened
