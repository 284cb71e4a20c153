"""ONNX Runtime's C API through ctypes: CPU sessions that share one pre-packed weights container.

ONNX Runtime pre-packs MatMul/Gemm weights into the layout its kernels read fastest. Sessions
that share initializers (``AddInitializer``) would each pack their own copy, so sharing them
through the Python API means running without pre-packing. The C API has
``CreateSessionWithPrepackedWeightsContainer``: sessions given the same container pack each
shared weight once and share the packed copy. The Python binding does not expose it (1.32), so
this module calls the ``libonnxruntime.so`` that the
onnxruntime wheel ships beside its Python extension. Only what a ladder's CPU rungs need is
bound: sessions from a file with shared initializers, a run into pre-allocated outputs.

``OrtApi`` is a table of function pointers that only ever grows at its end: the indices below are
those of the C API's first versions and hold for every later release.
"""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

#: the C API version asked for (ONNX Runtime 1.10, the first with every function used here)
API_VERSION = 10
#: OrtApi function indices (onnxruntime_c_api.h, in order of declaration)
INDEX = {
    "GetErrorMessage": 2,
    "CreateEnv": 3,
    "Run": 9,
    "CreateSessionOptions": 10,
    "SetSessionGraphOptimizationLevel": 23,
    "SetIntraOpNumThreads": 24,
    "SetInterOpNumThreads": 25,
    "SessionGetInputCount": 30,
    "SessionGetOutputCount": 31,
    "SessionGetInputName": 36,
    "SessionGetOutputName": 37,
    "CreateTensorWithDataAsOrtValue": 49,
    "CreateCpuMemoryInfo": 69,
    "AllocatorFree": 76,
    "GetAllocatorWithDefaultOptions": 78,
    "ReleaseStatus": 93,
    "ReleaseMemoryInfo": 94,
    "ReleaseSession": 95,
    "ReleaseValue": 96,
    "ReleaseSessionOptions": 100,
    "AddSessionConfigEntry": 130,
    "AddInitializer": 150,
    "CreatePrepackedWeightsContainer": 166,
    "ReleasePrepackedWeightsContainer": 167,
    "CreateSessionWithPrepackedWeightsContainer": 168,
}
P = ctypes.c_void_p
PP = ctypes.POINTER(ctypes.c_void_p)
#: argument types of each bound function (every one but the Release* returns OrtStatus*)
SIGNATURES: dict[str, list[Any]] = {
    "GetErrorMessage": [P],
    "CreateEnv": [ctypes.c_int, ctypes.c_char_p, PP],
    "Run": [P, P, P, P, ctypes.c_size_t, P, ctypes.c_size_t, P],
    "CreateSessionOptions": [PP],
    "SetSessionGraphOptimizationLevel": [P, ctypes.c_int],
    "SetIntraOpNumThreads": [P, ctypes.c_int],
    "SetInterOpNumThreads": [P, ctypes.c_int],
    "SessionGetInputCount": [P, ctypes.POINTER(ctypes.c_size_t)],
    "SessionGetOutputCount": [P, ctypes.POINTER(ctypes.c_size_t)],
    "SessionGetInputName": [P, ctypes.c_size_t, P, PP],
    "SessionGetOutputName": [P, ctypes.c_size_t, P, PP],
    "CreateTensorWithDataAsOrtValue": [
        P,
        P,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_int64),
        ctypes.c_size_t,
        ctypes.c_int,
        PP,
    ],
    "CreateCpuMemoryInfo": [ctypes.c_int, ctypes.c_int, PP],
    "AllocatorFree": [P, P],
    "GetAllocatorWithDefaultOptions": [PP],
    "ReleaseStatus": [P],
    "ReleaseMemoryInfo": [P],
    "ReleaseSession": [P],
    "ReleaseValue": [P],
    "ReleaseSessionOptions": [P],
    "AddSessionConfigEntry": [P, ctypes.c_char_p, ctypes.c_char_p],
    "AddInitializer": [P, ctypes.c_char_p, P],
    "CreatePrepackedWeightsContainer": [PP],
    "ReleasePrepackedWeightsContainer": [P],
    "CreateSessionWithPrepackedWeightsContainer": [P, ctypes.c_char_p, P, P, PP],
}
#: ONNXTensorElementDataType of the numpy dtypes bound here
ELEMENT_TYPES = {
    np.dtype(np.float32): 1,
    np.dtype(np.uint8): 2,
    np.dtype(np.int8): 3,
    np.dtype(np.int32): 6,
    np.dtype(np.int64): 7,
    np.dtype(np.bool_): 9,
    np.dtype(np.float16): 10,
}
ORT_ENABLE_ALL = 99
ORT_LOGGING_LEVEL_ERROR = 3
ORT_ARENA_ALLOCATOR = 1
ORT_MEM_TYPE_DEFAULT = 0


class CApiError(RuntimeError):
    """An OrtStatus that was not OK, with ONNX Runtime's message."""


class CApiMissing(RuntimeError):
    """No ``libonnxruntime.so`` beside the onnxruntime module (or it has no usable C API)."""


def library_path(ort: Any) -> str:
    """The shared library the onnxruntime wheel ships; CApiMissing if there is none."""
    folder = os.path.join(os.path.dirname(ort.__file__), "capi")
    found = sorted(glob.glob(os.path.join(folder, "libonnxruntime.so*")))
    if not found:
        raise CApiMissing(f"no libonnxruntime.so in the onnxruntime package ({ort.__version__})")
    return found[-1]


class Api:
    """The bound C API functions of one loaded library, and the process's one OrtEnv there."""

    def __init__(self, path: str) -> None:
        self.library = ctypes.CDLL(path)
        get_base = self.library.OrtGetApiBase
        get_base.restype = ctypes.POINTER(ctypes.c_void_p * 2)
        base = get_base().contents
        get_api = ctypes.CFUNCTYPE(P, ctypes.c_uint32)(base[0])
        table = get_api(API_VERSION)
        if not table:
            raise CApiMissing(f"{os.path.basename(path)} has no C API version {API_VERSION}")
        pointers = ctypes.cast(table, ctypes.POINTER(ctypes.c_void_p * (max(INDEX.values()) + 1)))
        for name, index in INDEX.items():
            returns = None if name.startswith("Release") or name == "GetErrorMessage" else P
            if name == "GetErrorMessage":
                returns = ctypes.c_char_p
            prototype = ctypes.CFUNCTYPE(returns, *SIGNATURES[name])
            setattr(self, name, prototype(pointers.contents[index]))
        self.env = self.out("CreateEnv", ORT_LOGGING_LEVEL_ERROR, b"vlm-ladder")
        self.memory_info = self.out(
            "CreateCpuMemoryInfo", ORT_ARENA_ALLOCATOR, ORT_MEM_TYPE_DEFAULT
        )
        self.allocator = self.out("GetAllocatorWithDefaultOptions")

    def check(self, status: int | None) -> None:
        """Raise CApiError for a non-null OrtStatus (and release it)."""
        if status:
            message = self.GetErrorMessage(status).decode(errors="replace")  # type: ignore[attr-defined]
            self.ReleaseStatus(status)  # type: ignore[attr-defined]
            raise CApiError(message)

    def call(self, name: str, *args: Any) -> None:
        """Call a function that returns an OrtStatus."""
        self.check(getattr(self, name)(*args))

    def out(self, name: str, *args: Any) -> int:
        """Call a function whose last argument is an out-pointer; return what it wrote."""
        result = ctypes.c_void_p()
        self.call(name, *args, ctypes.byref(result))
        return int(result.value or 0)

    def tensor(self, array: np.ndarray) -> int:
        """An OrtValue reading ``array``'s memory (the caller keeps the array alive)."""
        if not array.flags.c_contiguous:
            raise ValueError("tensors must be C-contiguous")
        shape = (ctypes.c_int64 * max(array.ndim, 1))(*array.shape)
        return self.out(
            "CreateTensorWithDataAsOrtValue",
            self.memory_info,
            array.ctypes.data,
            array.nbytes,
            shape,
            array.ndim,
            ELEMENT_TYPES[array.dtype],
        )

    def names(self, session: int, kind: str) -> list[str]:
        """The session's input (``kind="Input"``) or output names, in graph order."""
        count = ctypes.c_size_t()
        self.call(f"SessionGet{kind}Count", session, ctypes.byref(count))
        names = []
        for index in range(count.value):
            pointer = self.out(f"SessionGet{kind}Name", session, index, self.allocator)
            names.append(ctypes.string_at(pointer).decode())
            self.call("AllocatorFree", self.allocator, pointer)
        return names


_api: Api | None = None


def load(ort: Any) -> Api:
    """The C API of the onnxruntime package ``ort`` (loaded once per process)."""
    global _api
    if _api is None:
        _api = Api(library_path(ort))
    return _api


class SharedWeightsGroup:
    """Sessions that read the same initializers and share one pre-packed copy of them.

    ``initializers`` maps names to C-contiguous arrays (a mapped weights file): each session that
    uses a name reads that memory, and weights its kernels pre-pack are packed once, into the
    group's container, for all sessions.
    """

    def __init__(self, api: Api, initializers: dict[str, np.ndarray]) -> None:
        self.api = api
        self.arrays = initializers
        self.values = {name: api.tensor(array) for name, array in initializers.items()}
        self.container = api.out("CreatePrepackedWeightsContainer")
        self.sessions: list[CpuSession] = []

    def session(self, onnx_path: str, threads: int | None) -> CpuSession:
        """A CPU session of ``onnx_path`` in this group."""
        opened = CpuSession(self, onnx_path, threads)
        self.sessions.append(opened)
        return opened

    def close(self) -> None:
        """Release every session, then the container and the initializer values."""
        for opened in self.sessions:
            opened.close()
        self.sessions.clear()
        if self.container:
            self.api.ReleasePrepackedWeightsContainer(self.container)  # type: ignore[attr-defined]
            self.container = 0
        for value in self.values.values():
            self.api.ReleaseValue(value)  # type: ignore[attr-defined]
        self.values.clear()


class CpuSession:
    """One ONNX Runtime CPU session (graph optimizations on, pre-packing into the group's
    container), run with inputs and outputs in caller-owned numpy arrays."""

    def __init__(self, group: SharedWeightsGroup, onnx_path: str, threads: int | None) -> None:
        api = self.api = group.api
        options = api.out("CreateSessionOptions")
        try:
            api.call("SetSessionGraphOptimizationLevel", options, ORT_ENABLE_ALL)
            if threads is not None:
                api.call("SetIntraOpNumThreads", options, threads)
                api.call("SetInterOpNumThreads", options, 1)
            for name, value in group.values.items():
                api.call("AddInitializer", options, name.encode(), value)
            self.handle = api.out(
                "CreateSessionWithPrepackedWeightsContainer",
                api.env,
                os.fsencode(onnx_path),
                options,
                group.container,
            )
        finally:
            api.ReleaseSessionOptions(options)  # type: ignore[attr-defined]
        self.inputs = api.names(self.handle, "Input")
        self.outputs = api.names(self.handle, "Output")
        self._bound: dict[str, tuple[np.ndarray, int]] = {}

    def bind(self, name: str, array: np.ndarray) -> None:
        """Read input ``name`` from ``array`` in every following run (kept alive here)."""
        old = self._bound.pop(name, None)
        self._bound[name] = (array, self.api.tensor(array))
        if old is not None:
            self.api.ReleaseValue(old[1])  # type: ignore[attr-defined]

    def run(self, outputs: dict[str, np.ndarray]) -> None:
        """Run once on the bound inputs, writing into ``outputs`` (arrays of the outputs' shapes
        and dtypes, by name: every graph output)."""
        api = self.api
        names = list(self._bound)
        values = [self._bound[name][1] for name in names]
        out_values = [api.tensor(outputs[name]) for name in self.outputs]
        try:
            api.call(
                "Run",
                self.handle,
                None,
                _strings(names),
                (ctypes.c_void_p * len(values))(*values),
                len(values),
                _strings(self.outputs),
                len(self.outputs),
                (ctypes.c_void_p * len(out_values))(*out_values),
            )
        finally:
            for value in out_values:
                api.ReleaseValue(value)  # type: ignore[attr-defined]

    def close(self) -> None:
        """Release the session and its bound input values."""
        for _, value in self._bound.values():
            self.api.ReleaseValue(value)  # type: ignore[attr-defined]
        self._bound.clear()
        if self.handle:
            self.api.ReleaseSession(self.handle)  # type: ignore[attr-defined]
            self.handle = 0


def _strings(names: Sequence[str]) -> Any:
    return (ctypes.c_char_p * len(names))(*(name.encode() for name in names))
