"""TensorRT engine backend: device buffers allocated once, anchors resident on the GPU.

Three parts, so that the bookkeeping is testable without a GPU:
- ``EngineRunner``: what the backend needs from an engine (its I/O tensors, binding addresses,
  execution on a stream). ``TrtEngineRunner`` implements it with TensorRT 10's tensor-address API.
- ``DeviceMemory``: allocation, host<->device copies and synchronisation on one stream.
  ``CudaDeviceMemory`` implements it with cuda-python's runtime API.
- ``TensorRTBackend``: plans one device buffer per I/O tensor from the manifest, binds them once,
  copies the anchors in only in ``set_anchors`` and the image in on every ``infer``.

On GPUs without a TensorRT engine for this device, ONNX Runtime runs the ONNX model instead:
``vlm_export.runtime.engines.backends.onnxruntime_backend.OnnxRuntimeBackend`` with providers
["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"] (onnxruntime-gpu).
"""

from __future__ import annotations

import ctypes
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.errors import BundleError
from vlm_export.core.manifest import (
    ANCHORS_INPUT as ANCHORS,
)
from vlm_export.core.manifest import (
    ANCHORS_VALID_INPUT as ANCHORS_VALID,
)
from vlm_export.core.manifest import (
    IMAGE_INPUT as IMAGE,
)
from vlm_export.core.manifest import (
    read_manifest,
    tensorrt_engines,
)
from vlm_export.runtime.engines.base import EngineBackend
from vlm_export.runtime.engines.select import (
    DeviceInfo,
    TensorRTUnavailableError,
    cuda_check,
    import_cudart,
    import_tensorrt,
    no_engine_error,
    query_device,
    select_engine,
)


@dataclass(frozen=True)
class TensorSpec:
    """One engine I/O tensor as the engine reports it (-1 marks a dynamic axis)."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: np.dtype


class EngineRunner(ABC):
    """The part of an engine the backend drives."""

    @abstractmethod
    def io_tensors(self) -> list[TensorSpec]:
        """Every input and output tensor of the engine."""

    @abstractmethod
    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Fix the runtime shape of an input that has dynamic axes."""

    @abstractmethod
    def set_tensor_address(self, name: str, address: int) -> None:
        """Bind a device buffer to a tensor."""

    @abstractmethod
    def execute(self, stream: int) -> None:
        """Enqueue one inference on ``stream``; raise RuntimeError if it cannot be enqueued."""

    @abstractmethod
    def close(self) -> None:
        """Release the engine."""


class DeviceMemory(ABC):
    """Device buffers and copies on one stream (addresses are plain ints)."""

    stream: int = 0

    @abstractmethod
    def allocate(self, nbytes: int) -> int:
        """A device buffer of ``nbytes``; freed by ``close``."""

    @abstractmethod
    def host_buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A host array for device->host copies (page-locked where the implementation can)."""

    @abstractmethod
    def zero(self, address: int, nbytes: int) -> None:
        """Fill a device buffer with zero bytes."""

    @abstractmethod
    def copy_to_device(self, address: int, host: np.ndarray, offset: int = 0) -> None:
        """Enqueue a copy of the C-contiguous ``host`` array to ``address + offset`` bytes."""

    @abstractmethod
    def copy_to_host(self, host: np.ndarray, address: int) -> None:
        """Enqueue a copy from ``address`` into the C-contiguous ``host`` array."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait until everything enqueued on the stream has finished."""

    @abstractmethod
    def close(self) -> None:
        """Free every buffer and the stream."""


@dataclass(frozen=True)
class BufferPlan:
    """One bound tensor: its manifest shape and dtype and its device buffer size."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def plan_buffers(tensors: list[TensorSpec], engine_section: dict[str, Any]) -> list[BufferPlan]:
    """Match the engine's I/O tensors with the manifest's; raise BundleError on any difference."""
    declared = {entry["name"]: (True, entry) for entry in engine_section["inputs"]} | {
        entry["name"]: (False, entry) for entry in engine_section["outputs"]
    }
    found = {tensor.name for tensor in tensors}
    if found != set(declared):
        raise BundleError(
            f"engine tensors {sorted(found)} differ from the manifest's {sorted(declared)}; "
            "the engine was built from another ONNX model"
        )
    plans = []
    for tensor in tensors:
        is_input, entry = declared[tensor.name]
        shape, dtype = tuple(int(dim) for dim in entry["shape"]), np.dtype(entry["dtype"])
        fits = len(shape) == len(tensor.shape) and all(
            dim < 0 or dim == want for dim, want in zip(tensor.shape, shape, strict=True)
        )
        if tensor.is_input != is_input or not fits or tensor.dtype != dtype:
            kind = "input" if is_input else "output"
            raise BundleError(
                f"engine tensor {tensor.name!r} is {list(tensor.shape)} {tensor.dtype}; the "
                f"manifest's {kind} is {list(shape)} {dtype}"
            )
        plans.append(BufferPlan(tensor.name, is_input, shape, dtype))
    return plans


class TensorRTBackend(EngineBackend):
    """Runs a TensorRT engine; see the module docstring for what is copied when.

    ``bundle`` is a ``runtime.bundle.Bundle`` (or a bundle folder). The engine is the manifest's
    engine for this device (``engine_select.select_engine``, fp16 first unless ``precision``), or
    ``engine_file`` (e.g. one built with trtexec). ``runner`` and ``memory`` replace TensorRT and
    CUDA (tests drive the backend with fakes through them). ``rung`` picks among the engines of
    that ladder rung (``vlm-export build-engine`` builds one per rung). ``notes`` says why each
    other engine of the manifest was not chosen (``vlm-edge run`` prints it).
    """

    def __init__(
        self,
        bundle: Any,
        precision: str | None = None,
        engine_file: str | Path | None = None,
        *,
        runner: EngineRunner | None = None,
        memory: DeviceMemory | None = None,
        rung: int = 0,
    ):
        if (runner is None) != (memory is None):
            raise ValueError("pass both runner and memory, or neither")
        folder, manifest = _bundle_parts(bundle)
        self.description = "tensorrt"
        self.notes: list[str] = []
        if runner is None:
            path, self.notes = engine_path(folder, manifest, precision, engine_file, rung=rung)
            self.description = f"tensorrt:{path.name}"
            runner, memory = open_on_gpu(path)
        self.runner, self.memory = runner, memory
        try:
            self._bind(manifest)
        except BaseException:
            self.close()
            raise

    def _bind(self, manifest: dict[str, Any]) -> None:
        """Allocate one device buffer per tensor, bind it, zero the anchors, make host outputs."""
        runner, memory = self.runner, self.memory
        tensors = runner.io_tensors()
        self.plans = {plan.name: plan for plan in plan_buffers(tensors, manifest["engine"])}
        if IMAGE not in self.plans or not self.plans[IMAGE].is_input:
            raise BundleError("the engine has no 'image' input")
        dynamic = {t.name for t in tensors if t.is_input and any(dim < 0 for dim in t.shape)}
        self.addresses: dict[str, int] = {}
        self.outputs: dict[str, np.ndarray] = {}
        for plan in self.plans.values():
            self.addresses[plan.name] = memory.allocate(plan.nbytes)
            runner.set_tensor_address(plan.name, self.addresses[plan.name])
            if plan.name in dynamic:
                runner.set_input_shape(plan.name, plan.shape)
            if plan.is_input and plan.name != IMAGE:
                memory.zero(self.addresses[plan.name], plan.nbytes)  # no anchor valid yet
            if not plan.is_input:
                self.outputs[plan.name] = memory.host_buffer(plan.shape, plan.dtype)

    def set_anchors(self, anchors: np.ndarray, valid: np.ndarray) -> None:
        """Copy new anchors [C, R, D] and flags [C] to the GPU (only here, not per frame)."""
        if ANCHORS not in self.plans or ANCHORS_VALID not in self.plans:
            raise ValueError("this engine takes no anchors (not a condensing engine)")
        staged = [self._staged(ANCHORS, anchors), self._staged(ANCHORS_VALID, valid)]
        for name, array in zip((ANCHORS, ANCHORS_VALID), staged, strict=True):
            self.memory.copy_to_device(self.addresses[name], array)
        self.memory.synchronize()  # the staged arrays may be freed after this returns

    def update_anchor_rows(self, anchors: np.ndarray, valid: np.ndarray, rows: np.ndarray) -> None:
        """Copy only the anchors of classes ``rows`` (and the small valid vector) to the GPU."""
        if ANCHORS not in self.plans or ANCHORS_VALID not in self.plans:
            raise ValueError("this engine takes no anchors (not a condensing engine)")
        staged = self._staged(ANCHORS, anchors)
        row_bytes = staged[0].nbytes
        for row in rows:
            self.memory.copy_to_device(self.addresses[ANCHORS], staged[row], int(row) * row_bytes)
        self.memory.copy_to_device(
            self.addresses[ANCHORS_VALID], self._staged(ANCHORS_VALID, valid)
        )
        self.memory.synchronize()  # the staged arrays may be freed after this returns

    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Copy the image in, run, copy every output out; outputs by manifest name."""
        staged = self._staged(IMAGE, image)
        self.memory.copy_to_device(self.addresses[IMAGE], staged)
        self.runner.execute(self.memory.stream)
        for name, host in self.outputs.items():
            self.memory.copy_to_host(host, self.addresses[name])
        self.memory.synchronize()
        return {name: host.copy() for name, host in self.outputs.items()}

    def close(self) -> None:
        """Free the engine, then the device buffers and the stream (idempotent)."""
        self.runner.close()
        self.memory.close()

    def _staged(self, name: str, array: np.ndarray) -> np.ndarray:
        plan = self.plans[name]
        array = np.ascontiguousarray(array, dtype=plan.dtype)
        if array.shape != plan.shape:
            raise ValueError(f"{name} must have shape {list(plan.shape)}, got {list(array.shape)}")
        return array


def open_on_gpu(path: Path) -> tuple[TrtEngineRunner, CudaDeviceMemory]:
    """The serialized engine at ``path`` deserialized, with the CUDA memory to run it
    (TensorRTUnavailableError when CUDA is not usable; nothing left open on failure)."""
    try:
        memory = CudaDeviceMemory()
    except RuntimeError as exc:
        raise TensorRTUnavailableError(f"CUDA is not usable here: {exc}") from None
    try:
        return TrtEngineRunner(path.read_bytes()), memory
    except BaseException:
        memory.close()
        raise


def _bundle_parts(bundle: Any) -> tuple[Path, dict[str, Any]]:
    """(folder, manifest) of a Bundle object or a bundle folder."""
    if hasattr(bundle, "manifest") and hasattr(bundle, "path"):
        return Path(bundle.path), bundle.manifest
    return Path(bundle), read_manifest(bundle)


def engine_path(
    folder: Path,
    manifest: dict[str, Any],
    precision: str | None,
    engine_file: str | Path | None,
    device: DeviceInfo | None = None,
    rung: int = 0,
) -> tuple[Path, list[str]]:
    """The engine file to load and why the manifest's other engines were not chosen.

    ``engine_file`` if given, else the manifest's engine for ``device`` (this GPU by default);
    NoMatchingEngineError (with every refusal) when none fits.
    """
    if engine_file is not None:
        path = Path(engine_file)
        if not path.is_file():
            raise BundleError(f"engine file not found: {path}")
        return path, []
    device = device or query_device()
    choice = select_engine(tensorrt_engines(manifest), device, precision, rung=rung)
    if choice.engine is None:
        raise no_engine_error(choice, device)
    record = choice.engine
    notes = [f"engine {name} not used: {reason}" for name, reason in choice.refused]
    path = folder / record["file"]
    if not path.is_file():
        raise BundleError(f"engine file missing from the bundle: {record['file']}")
    if "bytes" in record and path.stat().st_size != record["bytes"]:
        raise BundleError(f"engine {record['file']} is not the size the manifest records")
    return path, notes


class TrtEngineRunner(EngineRunner):
    """A deserialized TensorRT 10 engine and its execution context."""

    def __init__(self, plan: bytes):
        trt = import_tensorrt()
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise BundleError(
                f"TensorRT {trt.__version__} could not load the engine (built with another "
                "TensorRT release or for another GPU?); rebuild it on this device"
            )
        self._context = self._engine.create_execution_context()

    def io_tensors(self) -> list[TensorSpec]:
        trt, engine = self._trt, self._engine
        tensors = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            tensors.append(
                TensorSpec(
                    name=name,
                    is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                    shape=tuple(engine.get_tensor_shape(name)),
                    dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(name))),
                )
            )
        return tensors

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self._context.set_input_shape(name, shape):
            raise BundleError(f"the engine does not accept shape {list(shape)} for {name!r}")

    def set_tensor_address(self, name: str, address: int) -> None:
        if not self._context.set_tensor_address(name, address):
            raise RuntimeError(f"TensorRT refused the buffer for {name!r}")

    def execute(self, stream: int) -> None:
        if not self._context.execute_async_v3(stream_handle=stream):
            raise RuntimeError("TensorRT could not enqueue the inference (execute_async_v3)")

    def close(self) -> None:
        self._context = self._engine = self._runtime = None


class CudaDeviceMemory(DeviceMemory):
    """``DeviceMemory`` with cuda-python: cudaMalloc, page-locked host outputs, one stream."""

    def __init__(self, device: int = 0):
        self._cudart = cudart = import_cudart()
        cuda_check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self._stream = cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.stream = int(self._stream)
        self._device_buffers: list[int] = []
        self._host_buffers: list[int] = []

    def allocate(self, nbytes: int) -> int:
        address = int(cuda_check(self._cudart.cudaMalloc(nbytes), "cudaMalloc"))
        self._device_buffers.append(address)
        return address

    def host_buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        address = int(cuda_check(self._cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
        self._host_buffers.append(address)
        raw = (ctypes.c_uint8 * nbytes).from_address(address)
        return np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape)

    def zero(self, address: int, nbytes: int) -> None:
        cuda_check(
            self._cudart.cudaMemsetAsync(address, 0, nbytes, self._stream), "cudaMemsetAsync"
        )

    def copy_to_device(self, address: int, host: np.ndarray, offset: int = 0) -> None:
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        result = self._cudart.cudaMemcpyAsync(
            address + offset, host.ctypes.data, host.nbytes, kind, self._stream
        )
        cuda_check(result, "cudaMemcpyAsync (host to device)")

    def copy_to_host(self, host: np.ndarray, address: int) -> None:
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        result = self._cudart.cudaMemcpyAsync(
            host.ctypes.data, address, host.nbytes, kind, self._stream
        )
        cuda_check(result, "cudaMemcpyAsync (device to host)")

    def synchronize(self) -> None:
        cuda_check(self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self._stream is None:
            return
        self.synchronize()
        for address in self._device_buffers:
            cuda_check(self._cudart.cudaFree(address), "cudaFree")
        for address in self._host_buffers:
            cuda_check(self._cudart.cudaFreeHost(address), "cudaFreeHost")
        cuda_check(self._cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
        self._device_buffers, self._host_buffers, self._stream = [], [], None
