"""ONNX Runtime backend: provider choice, fallback detection, anchors bound once, not per frame.

``onnxruntime`` is imported when a backend is opened, not when this module is: the runtime works
without it (TensorRT), and a device without it gets a one-line UserError naming the extra to
install. ONNX Runtime comes as ``onnxruntime`` (CPU) or ``onnxruntime-gpu``; both install the same
``onnxruntime`` package, so having both distributions installed leaves whichever was installed
last (often without the CUDA providers): that conflict is warned about once per process.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Sequence
from importlib import metadata
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm_export.core.errors import BundleError, UserError, first_line
from vlm_export.core.interrupts import ctrl_c_noticed, interrupted
from vlm_export.core.manifest import ANCHORS_INPUT, ANCHORS_VALID_INPUT, IMAGE_INPUT
from vlm_export.core.option_names import option
from vlm_export.runtime.engines.base import EngineBackend, check_anchor_shapes

if TYPE_CHECKING:
    from vlm_export.runtime.bundle import Bundle

log = logging.getLogger(__name__)

#: preference order when the user names no providers
PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
SHORT_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
ORT_ERROR_NAMES = (
    "Fail",
    "InvalidGraph",
    "InvalidProtobuf",
    "NoSuchFile",
    "NotImplemented",
    "RuntimeException",
    "EPFail",
)
#: ONNX type strings of the manifest's dtypes
ONNX_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "int32": "tensor(int32)",
    "int64": "tensor(int64)",
    "bool": "tensor(bool)",
}
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
MISSING_MESSAGE = 'ONNX Runtime is not installed: pip install ".[cpu]" (or [gpu] on NVIDIA GPUs)'
_conflict_checked = False


class OnnxRuntimeMissing(UserError):
    """The ``onnxruntime`` package is not installed (or cannot be imported)."""


def installed_distribution(name: str) -> bool:
    """True when the distribution ``name`` is installed (importlib.metadata)."""
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def warn_if_conflicting() -> None:
    """Warn (once per process) when both onnxruntime distributions are installed."""
    global _conflict_checked
    if _conflict_checked:
        return
    _conflict_checked = True
    if all(installed_distribution(name) for name in ORT_DISTRIBUTIONS):
        log.warning(
            "both onnxruntime and onnxruntime-gpu are installed; they share the import name "
            "and overwrite each other (GPU providers may be missing): pip uninstall -y "
            'onnxruntime onnxruntime-gpu, then pip install ".[gpu]" (or [cpu])'
        )


def import_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module; OnnxRuntimeMissing (a UserError) when it is not installed.

    Ctrl-C during the import is a KeyboardInterrupt, never the hint to reinstall.
    """
    with ctrl_c_noticed() as pressed:
        try:
            return _import_onnxruntime()
        except OnnxRuntimeMissing as exc:
            if pressed or interrupted(exc):
                raise KeyboardInterrupt from None
            raise


def _import_onnxruntime() -> ModuleType:
    try:
        ort = importlib.import_module("onnxruntime")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "onnxruntime":
            raise OnnxRuntimeMissing(MISSING_MESSAGE) from None
        raise OnnxRuntimeMissing(f"ONNX Runtime cannot be imported ({exc})") from None
    except ImportError as exc:
        raise OnnxRuntimeMissing(
            f"ONNX Runtime is installed but cannot be imported ({first_line(exc)}); "
            'reinstall it: pip install --force-reinstall ".[cpu]" (or [gpu])'
        ) from None
    warn_if_conflicting()
    return ort


def ort_errors(ort: ModuleType) -> tuple[type[BaseException], ...]:
    """ONNX Runtime's own exception classes (they derive from Exception only)."""
    state = importlib.import_module(f"{ort.__name__}.capi.onnxruntime_pybind11_state")
    return tuple(getattr(state, name) for name in ORT_ERROR_NAMES if hasattr(state, name))


def choose_providers(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """The providers to ask for: the user's (short names allowed) or the best available ones."""
    if not requested:
        return [name for name in PREFERRED_PROVIDERS if name in available]
    chosen = [SHORT_NAMES.get(name.strip().lower(), name.strip()) for name in requested]
    missing = [name for name in chosen if name not in available]
    if missing:
        raise UserError(
            f"ONNX Runtime provider(s) not available: {', '.join(missing)} "
            f"(this onnxruntime has: {', '.join(available)})"
        )
    return chosen


def check_tensor(
    kind: str, name: str, shape: Sequence[Any], onnx_type: str, record: dict[str, Any]
) -> None:
    """One ONNX graph tensor against its manifest record; BundleError naming both shapes.

    Dimensions the graph leaves symbolic (a name or None) match any manifest size.
    """
    expected = [int(v) for v in record["shape"]]
    graph = [v if isinstance(v, int) else None for v in shape]
    fits = len(graph) == len(expected) and all(
        g is None or g == e for g, e in zip(graph, expected, strict=True)
    )
    if not fits:
        shown = [v if v is not None else "?" for v in graph]
        raise BundleError(f"ONNX {kind} {name!r} has shape {shown}, the manifest says {expected}")
    wanted = ONNX_TYPES.get(str(record["dtype"]))
    if wanted is not None and onnx_type != wanted:
        raise BundleError(
            f"ONNX {kind} {name!r} is {onnx_type}, the manifest says {record['dtype']}"
        )


class OnnxRuntimeBackend(EngineBackend):
    """Runs the bundle's ONNX image encoder with ONNX Runtime through an IOBinding.

    ``initializers`` (name -> OrtValue) replace the graph's initializers of those names, so that
    sessions of a ladder's rungs read one copy of the weights (names a graph lacks are ignored);
    weight pre-packing is then off, since it would copy the weights into each session again.
    ``providers`` reports what actually runs (``session.get_providers()``), which can differ from
    ``requested_providers``: onnxruntime-gpu silently falls back to CPU when CUDA/cuDNN libraries
    are missing; that logs a warning.
    """

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        initializers: dict[str, Any] | None = None,
    ) -> None:
        self._ort = ort = import_onnxruntime()
        self._errors = ort_errors(ort)
        self.requested_providers = choose_providers(providers, ort.get_available_providers())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            if threads < 1:
                raise UserError(f"{option('threads')} must be at least 1, got {threads}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        for name, value in (initializers or {}).items():  # shared with other sessions (ladder)
            options.add_initializer(name, value)
        if initializers:  # pre-packing would give every session its own copy of the weights again
            options.add_session_config_entry("session.disable_prepacking", "1")
        try:
            with warnings.catch_warnings():  # ORT's own note on a missing provider: reported below
                warnings.filterwarnings("ignore", "Specified provider", UserWarning)
                self.session = ort.InferenceSession(
                    str(bundle.onnx_path), sess_options=options, providers=self.requested_providers
                )
        except self._errors as exc:
            raise BundleError(
                f"ONNX Runtime cannot load {bundle.onnx_path.name}: {first_line(exc)}"
            ) from None
        self.providers = list(self.session.get_providers())
        self.description = "onnxruntime:" + "+".join(self.providers)
        dropped = [name for name in self.requested_providers if name not in self.providers]
        if dropped:
            log.warning(
                "ONNX Runtime could not start %s and runs on %s (missing CUDA/cuDNN/TensorRT "
                "libraries?)",
                ", ".join(dropped),
                ", ".join(self.providers),
            )
        self._device = "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"
        self._inputs = bundle.engine_io("inputs")
        self._outputs = bundle.engine_io("outputs")
        self._check_session()
        self.image_shape = tuple(int(v) for v in self._inputs[IMAGE_INPUT]["shape"])
        self.condensing = ANCHORS_INPUT in self._inputs
        self._binding = self.session.io_binding()
        for name in self._outputs:
            self._binding.bind_output(name, "cpu")
        self._bound: dict[str, tuple[np.ndarray, Any]] = {}
        if self.condensing:
            anchors_shape = tuple(int(v) for v in self._inputs[ANCHORS_INPUT]["shape"])
            self.set_anchors(
                np.zeros(anchors_shape, dtype=np.float32),
                np.zeros(anchors_shape[0], dtype=np.float32),
            )

    def _check_session(self) -> None:
        """The ONNX graph's inputs and outputs must be the manifest's: names, shapes, dtypes."""
        if IMAGE_INPUT not in self._inputs:
            raise BundleError(f"manifest engine has no {IMAGE_INPUT!r} input")
        if (ANCHORS_INPUT in self._inputs) != (ANCHORS_VALID_INPUT in self._inputs):
            raise BundleError(
                f"manifest engine needs both {ANCHORS_INPUT!r} and {ANCHORS_VALID_INPUT!r} or "
                "neither"
            )
        for kind, nodes, records in (
            ("input", self.session.get_inputs(), self._inputs),
            ("output", self.session.get_outputs(), self._outputs),
        ):
            found = {node.name: node for node in nodes}
            if set(found) != set(records):
                raise BundleError(
                    f"ONNX {kind}s {sorted(found)} differ from the manifest's {sorted(records)}"
                )
            for name, record in records.items():
                check_tensor(kind, name, found[name].shape, found[name].type, record)

    @property
    def output_names(self) -> list[str]:
        """Output names in manifest order."""
        return list(self._outputs)

    def bound_anchors(self) -> tuple[np.ndarray, np.ndarray]:
        """The host arrays currently bound as anchors and anchors_valid."""
        return self._bound[ANCHORS_INPUT][0], self._bound[ANCHORS_VALID_INPUT][0]

    def set_anchors(self, anchors: np.ndarray, valid: np.ndarray) -> None:
        """Bind anchors [C, R, D] and valid [C] for every following ``infer``.

        On CPU the engine reads the given arrays themselves (kept, not copied, when already
        C-contiguous float32), so nothing is copied per frame; CUDA/TensorRT sessions copy them to
        the GPU here, once. Call again whenever their content changes.
        """
        record = self._inputs.get(ANCHORS_INPUT) or {"shape": ()}
        check_anchor_shapes(self.condensing, tuple(int(v) for v in record["shape"]), anchors, valid)
        for name, array in ((ANCHORS_INPUT, anchors), (ANCHORS_VALID_INPUT, valid)):
            array = np.ascontiguousarray(array, dtype=np.float32)
            value = self._ort.OrtValue.ortvalue_from_numpy(array, self._device, 0)
            self._bound[name] = (array, value)  # the bound value reads this memory: keep it alive
            self._binding.bind_ortvalue_input(name, value)

    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch [B, 3, H, W] float32; outputs by manifest name."""
        if image.shape != self.image_shape:
            raise ValueError(
                f"image batch {image.shape} does not fit the engine's {self.image_shape}"
            )
        image = np.ascontiguousarray(image, dtype=np.float32)
        self._binding.bind_cpu_input(IMAGE_INPUT, image)
        try:
            self.session.run_with_iobinding(self._binding)
        except self._errors as exc:
            raise RuntimeError(f"ONNX Runtime inference failed: {first_line(exc)}") from exc
        values = self._binding.copy_outputs_to_cpu()
        return dict(zip(self._outputs, values, strict=True))

    def close(self) -> None:
        """Drop the session and bound buffers."""
        self._binding.clear_binding_inputs()
        self._bound.clear()
