"""OpenVINO backend (CPU): the bundle's ONNX graph in fp32, bf16 with the condensation kept fp32,
or a quantized INT8 (QDQ) graph of the bundle; anchors shared with OpenVINO, not copied per frame.

``openvino`` is imported when a backend is opened, not when this module is; without it the
UserError names the extra to install. bf16 runs only where the CPU has it (OpenVINO lists BF16 in
``OPTIMIZATION_CAPABILITIES``: AVX512-BF16 or AMX); elsewhere the request is refused in one line,
or falls back to fp32 when the caller allows it. Under bf16 the nodes that rank, merge and pick
anchors (``CONDENSATION_NODE_PREFIXES``, as the TensorRT fp16 build pins them) run in models of
their own compiled in fp32, between the transformer's stages compiled in bf16
(``openvino_split``); the normalisations and softmaxes of the bf16 stages carry OpenVINO's typed
``DisablePrecisionConversion`` attribute (``openvino_precise``). A condensation node the compiled
model still runs in bf16 is logged as a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm_export.core.errors import BundleError, UserError, first_line
from vlm_export.core.manifest import (
    ANCHORS_INPUT,
    ANCHORS_VALID_INPUT,
    IMAGE_INPUT,
)
from vlm_export.core.option_names import option
from vlm_export.core.optional_import import import_optional
from vlm_export.runtime.engines.backends.openvino_precise import (
    bf16_condensation_nodes,
    pinned_model,
)
from vlm_export.runtime.engines.backends.openvino_split import SplitCompiled, SplitRequest
from vlm_export.runtime.engines.base import EngineBackend, HostAnchorRows, check_anchor_shapes

if TYPE_CHECKING:
    from vlm_export.runtime.bundle import Bundle

PRECISIONS = ("fp32", "bf16", "int8")
#: the inputs that change only when a class's anchor moves: what reads only them runs then
ANCHOR_INPUTS = frozenset({ANCHORS_INPUT, ANCHORS_VALID_INPUT})
INSTALL_HINT = 'OpenVINO is not installed: pip install ".[openvino]"'

log = logging.getLogger(__name__)


class OpenVinoMissing(UserError):
    """The ``openvino`` package is not installed (or cannot be imported)."""


class PrecisionUnavailable(UserError):
    """The CPU cannot run the requested precision."""


def import_openvino() -> ModuleType:
    """The ``openvino`` module; OpenVinoMissing (a UserError) when it is not installed."""
    return import_optional("openvino", "OpenVINO", INSTALL_HINT, OpenVinoMissing)


def cpu_capabilities(core: Any) -> list[str]:
    """What OpenVINO's CPU plugin reports it can compute in (e.g. FP32, BF16, INT8)."""
    return [str(value).upper() for value in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def resolve_precision(precision: str, capabilities: list[str], fallback: bool) -> str:
    """The precision to run: ``precision`` if the CPU has it, else fp32 with ``fallback``."""
    if precision not in PRECISIONS:
        raise UserError(
            f"unknown OpenVINO precision {precision!r} (choose from {', '.join(PRECISIONS)})"
        )
    if precision != "bf16" or "BF16" in capabilities:
        return precision
    message = (
        f"this CPU has no bf16 support (OpenVINO reports {', '.join(capabilities)}; bf16 needs "
        "AVX512-BF16 or AMX)"
    )
    if not fallback:
        raise PrecisionUnavailable(
            f"{message}: use --precision fp32 (or int8 with a quantized bundle), or allow "
            "--precision-fallback"
        )
    log.warning("%s; running fp32", message)
    return "fp32"


def compile_config(precision: str, threads: int | None) -> dict[str, Any]:
    """The CPU plugin's settings: lowest latency, one stream, ``threads`` threads (default: all)."""
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
    }
    if threads is not None:
        if threads < 1:
            raise UserError(f"{option('threads')} must be at least 1, got {threads}")
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


#: lines of an OpenVINO error that say where it passed, not what went wrong
WHERE_LINES = ("Exception from ", "Check '", "While validating", "FrontEnd API failed", "-- ")


def openvino_reason(exc: BaseException) -> str:
    """The line of an OpenVINO error that says what went wrong: the last one before its
    summary, after the lines that only name where the error passed."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    ends = [i for i, line in enumerate(lines) if line.startswith("Summary:")]
    reasons = [
        line for line in lines[: ends[0] if ends else None] if not line.startswith(WHERE_LINES)
    ]
    return reasons[-1] if reasons else first_line(exc)


def check_ports(
    model: Any,
    inputs: dict[str, Any],
    outputs: dict[str, Any],
    extra_inputs: Collection[str] = (),
) -> None:
    """A model's (read or compiled) inputs, but ``extra_inputs``, and outputs must be the
    manifest's ``inputs`` and ``outputs``, with the manifest's shapes where the model fixes
    them."""
    for kind, ports, records in (
        ("input", model.inputs, inputs),
        ("output", model.outputs, outputs),
    ):
        found = {
            port.get_any_name(): port
            for port in ports
            if kind == "output" or port.get_any_name() not in extra_inputs
        }
        if set(found) != set(records):
            raise BundleError(
                f"model {kind}s {sorted(found)} differ from the manifest's {sorted(records)}"
            )
        for name, record in records.items():
            shape = [int(v) for v in found[name].get_partial_shape().get_min_shape()]
            if found[name].get_partial_shape().is_static and shape != list(record["shape"]):
                raise BundleError(
                    f"model {kind} {name!r} has shape {shape}, the manifest says {record['shape']}"
                )


def closed_shapes(model: Any, inputs: dict[str, Any]) -> dict[str, list[int]]:
    """The inputs of ``model`` that leave a dimension open, with the manifest's size in each open
    dimension (the engine runs one shape; a fixed dimension stays as the graph has it)."""
    shapes = {}
    for port in model.inputs:
        record, partial = inputs.get(port.get_any_name()), port.get_partial_shape()
        if record is None or partial.is_static:
            continue
        wanted = [int(v) for v in record["shape"]]
        if partial.rank.is_dynamic:
            shapes[port.get_any_name()] = wanted
        elif partial.rank.get_length() == len(wanted):
            shapes[port.get_any_name()] = [
                dim.get_length() if dim.is_static else size
                for dim, size in zip(partial, wanted, strict=True)
            ]
    return shapes


class OpenVinoBackend(HostAnchorRows, EngineBackend):
    """Runs the bundle's image encoder with OpenVINO's CPU plugin through one infer request.

    ``graph`` is the ONNX file to run (default: the bundle's; an INT8 QDQ graph for ``int8``).
    The anchors live in an array owned by the backend and shared with OpenVINO
    (``ov.Tensor(..., shared_memory=True)``), bound once: ``update_anchor_rows`` writes only the
    moved classes into it, and nothing is copied per frame. ``compiled`` runs a model compiled
    elsewhere in ``precision`` (a ladder's rungs as one model, ``openvino_rungs``), with
    ``fixed_inputs`` (more than the manifest's, such as the rung) bound once to this request.
    """

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "fp32",
        threads: int | None = None,
        fallback: bool = False,
        graph: str | Path | None = None,
        compiled: Any = None,
        fixed_inputs: dict[str, np.ndarray] | None = None,
    ) -> None:
        self._ov = ov = import_openvino()
        self.pinned: list[str] = []
        self._fixed = dict(fixed_inputs or {})
        if compiled is not None:
            self.precision, self.compiled = precision, compiled
        else:
            compiled = self._compile(bundle, precision, threads, fallback, graph)
            self.precision, self.compiled = compiled
        self.description = f"openvino:CPU:{self.precision}"
        self._inputs = bundle.engine_io("inputs")
        self._outputs = bundle.engine_io("outputs")
        check_ports(self.compiled, self._inputs, self._outputs, extra_inputs=set(self._fixed))
        self.image_shape = tuple(int(v) for v in self._inputs[IMAGE_INPUT]["shape"])
        self.condensing = ANCHORS_INPUT in self._inputs
        self.request = self.compiled.create_infer_request()
        ports = {port.get_any_name(): port for port in self.compiled.inputs}
        for name, value in self._fixed.items():
            if name not in ports or ports[name].get_element_type() != ov.Type(value.dtype):
                raise BundleError(f"the compiled model takes no {value.dtype} input {name!r}")
            self.request.set_tensor(name, ov.Tensor(value, shared_memory=True))
        self._anchors: np.ndarray | None = None
        self._valid: np.ndarray | None = None
        if self.condensing:
            shape = tuple(int(v) for v in self._inputs[ANCHORS_INPUT]["shape"])
            self.set_anchors(np.zeros(shape, np.float32), np.zeros(shape[0], np.float32))

    def _compile(
        self,
        bundle: Bundle,
        precision: str,
        threads: int | None,
        fallback: bool,
        graph: str | Path | None,
    ) -> tuple[str, Any]:
        """(the precision it runs, the compiled model) of one graph."""
        core = self._ov.Core()
        precision = resolve_precision(precision, cpu_capabilities(core), fallback)
        if precision == "int8" and graph is None:
            raise UserError("int8 runs a quantized graph: pass the bundle's INT8 ONNX file")
        path = Path(graph) if graph is not None else bundle.onnx_path
        try:
            model = core.read_model(str(path))
        except RuntimeError as exc:
            raise BundleError(f"OpenVINO cannot read {path.name}: {openvino_reason(exc)}") from None
        config = compile_config(precision, threads)
        try:
            if precision == "bf16":  # the cut needs every shape known, hence checked first
                inputs, outputs = bundle.engine_io("inputs"), bundle.engine_io("outputs")
                check_ports(model, inputs, outputs)
                if shapes := closed_shapes(model, inputs):
                    model.reshape(shapes)
                model, self.pinned = pinned_model(self._ov, core, model)
                compiled = SplitCompiled(self._ov, core, model, config, ANCHOR_INPUTS)
            else:
                compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:
            raise BundleError(
                f"OpenVINO cannot compile {path.name}: {openvino_reason(exc)}"
            ) from None
        if precision == "bf16" and (unpinned := bf16_condensation_nodes(compiled)):
            log.warning(
                "OpenVINO runs %d condensation node(s) in bf16 despite the fp32 pin (%s ...); "
                "token fates may differ from fp32",
                len(unpinned),
                unpinned[0],
            )
        return precision, compiled

    def bound_anchors(self) -> tuple[np.ndarray, np.ndarray]:
        """The arrays OpenVINO reads as anchors and anchors_valid (shared, not copies)."""
        if self._anchors is None or self._valid is None:
            raise BundleError("this engine does not condense tokens: it takes no anchors")
        return self._anchors, self._valid

    def set_anchors(self, anchors: np.ndarray, valid: np.ndarray) -> None:
        """Copy anchors [C, R, D] and valid [C] into the backend's arrays and bind them once."""
        record = self._inputs.get(ANCHORS_INPUT) or {"shape": ()}
        check_anchor_shapes(self.condensing, tuple(int(v) for v in record["shape"]), anchors, valid)
        self._anchors = np.array(anchors, dtype=np.float32, order="C")
        self._valid = np.array(valid, dtype=np.float32, order="C")
        for name, array in ((ANCHORS_INPUT, self._anchors), (ANCHORS_VALID_INPUT, self._valid)):
            self.request.set_tensor(name, self._ov.Tensor(array, shared_memory=True))

    def update_anchor_rows(self, anchors: np.ndarray, valid: np.ndarray, rows: np.ndarray) -> None:
        """Write the moved classes into the bound arrays; a split model reruns what reads only
        the anchors on the next frame."""
        try:
            super().update_anchor_rows(anchors, valid, rows)
        finally:  # rows may be written before a failure: read them again in any case
            if isinstance(self.request, SplitRequest):
                self.request.inputs_changed()

    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch [B, 3, H, W] float32; outputs by manifest name (copies)."""
        if image.shape != self.image_shape:
            raise ValueError(
                f"image batch {image.shape} does not fit the engine's {self.image_shape}"
            )
        image = np.ascontiguousarray(image, dtype=np.float32)
        self.request.set_tensor(IMAGE_INPUT, self._ov.Tensor(image, shared_memory=True))
        try:
            self.request.infer()
        except RuntimeError as exc:
            raise RuntimeError(f"OpenVINO inference failed: {openvino_reason(exc)}") from exc
        return {name: np.array(self.request.get_tensor(name).data) for name in self._outputs}

    def close(self) -> None:
        """Drop the infer request and the compiled model."""
        self.request = None
        self.compiled = None
