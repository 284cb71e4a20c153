"""LiteRT (TensorFlow Lite) backend: the bundle's ``.tflite`` graph of the image tower on the CPU.

``vlm-export build-litert BUNDLE`` converts the bundle's ONNX graph into a ``.tflite`` file and
records it in ``engines`` (``format`` "tflite", with the layout of its image input and its parity
against ONNX Runtime). This backend runs that file with the ``ai-edge-litert`` interpreter
(XNNPACK on the CPU), imported when a backend is opened; without it the UserError names the
extra to install. The graph's ``serving_default`` signature carries the manifest's tensor names:
inputs image (NCHW as every backend takes it, or NHWC when the record says so: transposed here),
anchors and anchors_valid, outputs embedding, cls_per_layer and token_fate. The anchors are set
once per change (``set_tensor``), not per frame: the interpreter keeps its input tensors between
invocations.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.errors import BundleError, UserError, first_line
from vlm_export.core.manifest import (
    ANCHORS_INPUT,
    ANCHORS_VALID_INPUT,
    IMAGE_INPUT,
    tflite_engines,
)
from vlm_export.core.option_names import option
from vlm_export.core.optional_import import import_optional
from vlm_export.runtime.engines.base import EngineBackend, check_anchor_shapes

INSTALL_HINT = 'LiteRT is not installed: pip install ".[litert]" (the ai-edge-litert package)'
SIGNATURE = "serving_default"
#: layouts of the image input a .tflite graph may record (NCHW: the manifest's own)
LAYOUTS = ("nchw", "nhwc")
DTYPES = {"float32": np.float32, "int32": np.int32}


class LiteRtMissing(UserError):
    """The ``ai-edge-litert`` package is not installed (or cannot be imported)."""


def import_interpreter() -> Any:
    """LiteRT's ``Interpreter`` class; LiteRtMissing (a UserError) when it is not installed."""
    return import_optional(
        "ai_edge_litert.interpreter", "LiteRT", INSTALL_HINT, LiteRtMissing
    ).Interpreter


def litert_version() -> str:
    """The installed ai-edge-litert version ("unknown" when it does not say)."""
    from importlib import metadata

    try:
        return metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        return "unknown"


def tflite_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """The bundle's (last) ``.tflite`` record; UserError naming the command that adds one."""
    records = tflite_engines(manifest)
    if not records:
        raise UserError(
            "this bundle has no LiteRT (.tflite) graph: add one on the workstation with "
            "`vlm-export build-litert BUNDLE`"
        )
    return records[-1]


class LiteRtBackend(EngineBackend):
    """Runs a bundle's ``.tflite`` image tower with the LiteRT interpreter (fp32, CPU).

    ``graph`` overrides the file to run (default: the bundle's recorded ``.tflite``); ``layout``
    is its image input's layout ("nchw" or "nhwc", default: the record's).
    """

    precision = "fp32"

    def __init__(
        self,
        bundle: Any,
        threads: int | None = None,
        graph: str | Path | None = None,
        layout: str | None = None,
    ) -> None:
        interpreter_class = import_interpreter()
        record = tflite_record(bundle.manifest) if graph is None else {}
        path = Path(graph) if graph is not None else Path(bundle.path) / str(record["file"])
        self.layout = str(layout or record.get("layout", "nchw"))
        if self.layout not in LAYOUTS:
            raise BundleError(f"{path.name}: unknown image layout {self.layout!r}")
        if threads is not None and threads < 1:
            raise UserError(f"{option('threads')} must be at least 1, got {threads}")
        if not path.is_file():
            raise BundleError(f"LiteRT graph not found: {path.name}")
        try:
            self.interpreter = interpreter_class(
                model_path=str(path), num_threads=threads or usable_cpus()
            )
            self.interpreter.allocate_tensors()
            signature = self.interpreter.get_signature_runner(SIGNATURE)
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"LiteRT cannot load {path.name}: {first_line(exc)}") from None
        self.description = f"litert:CPU:{self.precision}"
        self._inputs = bundle.engine_io("inputs")
        self._outputs = bundle.engine_io("outputs")
        self._in = self._indices("input", signature.get_input_details(), self._inputs, True)
        self._out = self._indices("output", signature.get_output_details(), self._outputs, False)
        self.image_shape = tuple(int(v) for v in self._inputs[IMAGE_INPUT]["shape"])
        self.condensing = ANCHORS_INPUT in self._inputs
        if self.condensing:
            shape = tuple(int(v) for v in self._inputs[ANCHORS_INPUT]["shape"])
            self.set_anchors(np.zeros(shape, np.float32), np.zeros(shape[0], np.float32))

    def _indices(
        self,
        kind: str,
        details: dict[str, dict[str, Any]],
        records: dict[str, dict[str, Any]],
        inputs: bool,
    ) -> dict[str, int]:
        """Tensor index by manifest name; BundleError when names, shapes or dtypes differ."""
        if set(details) != set(records):
            raise BundleError(
                f"LiteRT {kind}s {sorted(details)} differ from the manifest's {sorted(records)}"
            )
        primary = {
            int(d["index"])
            for d in (
                self.interpreter.get_input_details()
                if inputs
                else self.interpreter.get_output_details()
            )
        }
        for name, record in records.items():
            expected = [int(v) for v in record["shape"]]
            if inputs and name == IMAGE_INPUT and self.layout == "nhwc":
                expected = [expected[0], expected[2], expected[3], expected[1]]
            shape = [int(v) for v in details[name]["shape"]]
            if shape != expected:
                raise BundleError(
                    f"LiteRT {kind} {name!r} has shape {shape}, the manifest says {expected}"
                )
            dtype = DTYPES.get(str(record["dtype"]))
            if dtype is not None and np.dtype(details[name]["dtype"]) != np.dtype(dtype):
                raise BundleError(
                    f"LiteRT {kind} {name!r} is {np.dtype(details[name]['dtype'])}, the manifest "
                    f"says {record['dtype']}"
                )
            if int(details[name]["index"]) not in primary:
                raise BundleError(f"LiteRT {kind} {name!r} is not a tensor of the main graph")
        return {name: int(details[name]["index"]) for name in records}

    def set_anchors(self, anchors: np.ndarray, valid: np.ndarray) -> None:
        """Copy anchors [C, R, D] and valid [C] into the interpreter's input tensors (once)."""
        record = self._inputs.get(ANCHORS_INPUT) or {"shape": ()}
        check_anchor_shapes(self.condensing, tuple(int(v) for v in record["shape"]), anchors, valid)
        for name, array in ((ANCHORS_INPUT, anchors), (ANCHORS_VALID_INPUT, valid)):
            self.interpreter.set_tensor(
                self._in[name], np.ascontiguousarray(array, dtype=np.float32)
            )

    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch [B, 3, H, W] float32; outputs by manifest name (copies)."""
        if image.shape != self.image_shape:
            raise ValueError(
                f"image batch {image.shape} does not fit the engine's {self.image_shape}"
            )
        if self.layout == "nhwc":
            image = image.transpose(0, 2, 3, 1)
        self.interpreter.set_tensor(self._in[IMAGE_INPUT], np.ascontiguousarray(image, np.float32))
        try:
            self.interpreter.invoke()
        except RuntimeError as exc:
            raise RuntimeError(f"LiteRT inference failed: {first_line(exc)}") from exc
        return {name: self.interpreter.get_tensor(index) for name, index in self._out.items()}

    def close(self) -> None:
        """Drop the interpreter."""
        self.interpreter = None


def usable_cpus() -> int:
    """The CPUs this process may run on: LiteRT's default is one thread, ONNX Runtime's and
    OpenVINO's every core, so ``--threads`` left out means the same on every backend."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on macOS
        return os.cpu_count() or 1
