"""ONNX Runtime backend: provider choice, fallback detection, anchors bound once, not per frame."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from vlm_export.runtime.backends.base import EngineBackend
from vlm_export.runtime.errors import BundleError, UserError

if TYPE_CHECKING:
    from vlm_export.runtime.bundle import Bundle

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
ORT_ERRORS = (
    ort_state.Fail,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NoSuchFile,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
    ort_state.EPFail,
)
ANCHORS, ANCHORS_VALID, IMAGE = "anchors", "anchors_valid", "image"


class ProviderFallbackWarning(UserWarning):
    """ONNX Runtime did not start a requested execution provider and runs on another one."""


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class OnnxRuntimeBackend(EngineBackend):
    """Runs the bundle's ONNX image encoder with ONNX Runtime through an IOBinding.

    ``providers`` reports what actually runs (``session.get_providers()``), which can differ from
    ``requested_providers``: onnxruntime-gpu silently falls back to CPU when CUDA/cuDNN libraries
    are missing; that raises a ProviderFallbackWarning.
    """

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        self.requested_providers = choose_providers(providers, ort.get_available_providers())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            if threads < 1:
                raise UserError(f"--threads must be at least 1, got {threads}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            with warnings.catch_warnings():  # ORT's own note on a missing provider: reported below
                warnings.filterwarnings("ignore", "Specified provider", UserWarning)
                self.session = ort.InferenceSession(
                    str(bundle.onnx_path), sess_options=options, providers=self.requested_providers
                )
        except ORT_ERRORS as exc:
            raise BundleError(
                f"ONNX Runtime cannot load {bundle.onnx_path.name}: {_first_line(exc)}"
            ) from None
        self.providers = list(self.session.get_providers())
        self.description = "onnxruntime:" + "+".join(self.providers)
        dropped = [name for name in self.requested_providers if name not in self.providers]
        if dropped:
            warnings.warn(
                ProviderFallbackWarning(
                    f"ONNX Runtime could not start {', '.join(dropped)} and runs on "
                    f"{', '.join(self.providers)} (missing CUDA/cuDNN/TensorRT libraries?)"
                ),
                stacklevel=2,
            )
        self._device = "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"
        self._inputs = bundle.engine_io("inputs")
        self._outputs = bundle.engine_io("outputs")
        self._check_names()
        self.image_shape = tuple(int(v) for v in self._inputs[IMAGE]["shape"])
        self.condensing = ANCHORS in self._inputs
        self._binding = self.session.io_binding()
        for name in self._outputs:
            self._binding.bind_output(name, "cpu")
        self._bound: dict[str, tuple[np.ndarray, ort.OrtValue]] = {}
        if self.condensing:
            anchors_shape = tuple(int(v) for v in self._inputs[ANCHORS]["shape"])
            self.set_anchors(
                np.zeros(anchors_shape, dtype=np.float32),
                np.zeros(anchors_shape[0], dtype=np.float32),
            )

    def _check_names(self) -> None:
        session_inputs = {node.name for node in self.session.get_inputs()}
        session_outputs = {node.name for node in self.session.get_outputs()}
        if IMAGE not in self._inputs:
            raise BundleError("manifest engine has no 'image' input")
        if session_inputs != set(self._inputs):
            raise BundleError(
                f"ONNX inputs {sorted(session_inputs)} differ from the manifest's "
                f"{sorted(self._inputs)}"
            )
        if (ANCHORS in self._inputs) != (ANCHORS_VALID in self._inputs):
            raise BundleError("manifest engine needs both 'anchors' and 'anchors_valid' or neither")
        missing = sorted(set(self._outputs) - session_outputs)
        if missing:
            raise BundleError(f"ONNX model lacks the manifest's outputs: {', '.join(missing)}")

    @property
    def output_names(self) -> list[str]:
        """Output names in manifest order."""
        return list(self._outputs)

    def bound_anchors(self) -> tuple[np.ndarray, np.ndarray]:
        """The host arrays currently bound as anchors and anchors_valid."""
        return self._bound[ANCHORS][0], self._bound[ANCHORS_VALID][0]

    def set_anchors(self, anchors: np.ndarray, valid: np.ndarray) -> None:
        """Bind anchors [C, R, D] and valid [C] for every following ``infer``.

        On CPU the engine reads the given arrays themselves (kept, not copied, when already
        C-contiguous float32), so nothing is copied per frame; CUDA/TensorRT sessions copy them to
        the GPU here, once. Call again whenever their content changes.
        """
        if not self.condensing:
            raise BundleError("this engine does not condense tokens: it takes no anchors")
        expected = tuple(int(v) for v in self._inputs[ANCHORS]["shape"])
        if anchors.shape != expected or valid.shape != expected[:1]:
            raise ValueError(
                f"anchors {anchors.shape} / valid {valid.shape} do not fit the engine's "
                f"{expected} / {expected[:1]}"
            )
        for name, array in ((ANCHORS, anchors), (ANCHORS_VALID, valid)):
            array = np.ascontiguousarray(array, dtype=np.float32)
            value = ort.OrtValue.ortvalue_from_numpy(array, self._device, 0)
            self._bound[name] = (array, value)  # the bound value reads this memory: keep it alive
            self._binding.bind_ortvalue_input(name, value)

    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch [B, 3, H, W] float32; outputs by manifest name."""
        if image.shape != self.image_shape:
            raise ValueError(
                f"image batch {image.shape} does not fit the engine's {self.image_shape}"
            )
        image = np.ascontiguousarray(image, dtype=np.float32)
        self._binding.bind_cpu_input(IMAGE, image)
        try:
            self.session.run_with_iobinding(self._binding)
        except ORT_ERRORS as exc:
            raise RuntimeError(f"ONNX Runtime inference failed: {_first_line(exc)}") from exc
        values = self._binding.copy_outputs_to_cpu()
        return dict(zip(self._outputs, values, strict=True))

    def close(self) -> None:
        """Drop the session and bound buffers."""
        self._binding.clear_binding_inputs()
        self._bound.clear()
