"""Add a statically quantized INT8 graph (QDQ) to a bundle: calibrate, quantize, gate, record.

ONNX Runtime's ``quantize_static`` writes QuantizeLinear/DequantizeLinear pairs around the
matrix products (QDQ form: what ONNX Runtime, OpenVINO and TensorRT's explicit quantization all
read), with per-channel int8 weights and uint8 activations whose ranges come from the user's own
images, preprocessed exactly as the device will (the bundle's preprocessing; anchors zero and
invalid). Only products with weights (MatMul, Gemm, Conv) within the chosen scope are quantized
(default: the MLPs; see SCOPES), and none under the condensing tower's
``CONDENSATION_NODE_PREFIXES``: ranking, merging, anchor selection, attention scores, LayerNorm
and softmax stay float.

The gate: the INT8 graph and the bundle's fp32 graph (both in ONNX Runtime CPU) on the
calibration images and on held-out images (``--held-out DIR``, else every 5th calibration image
is held out of calibration). Every embedding cosine must reach ``MIN_COSINE``; the mean, top-1
agreement on the bundle's classes and token-fate agreement are recorded. A failing graph is not
written; a passing one is moved into the bundle and recorded in ``engines`` (``format`` "onnx",
``precision`` "int8", sha256, parity) with the manifest written atomically.

A ladder bundle gets one INT8 graph per rung, their int8 weights stored once (see
``quantize_bundle``). ``method="nncf"`` makes an OpenVINO INT8 IR of rung 0 instead
(``int8.nncf``: NNCF's transformer preset, the condensation in its ignored scope), gated the same
way in OpenVINO's CPU plugin and recorded with ``format`` "openvino" and its ``.bin`` as
``weights``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlm_export.core.atomic import atomic_write_bytes
from vlm_export.core.errors import UserError
from vlm_export.core.json_text import dumps
from vlm_export.core.manifest import (
    MANIFEST_NAME,
    ONNX_ENGINE_FORMAT,
    OPENVINO_ENGINE_FORMAT,
    file_record,
    read_manifest,
)
from vlm_export.export.bundle.staging import (
    _refuse_listed,
    _staging,
    move_into_bundle,
    record_engine,
)
from vlm_export.export.int8.calibration import image_paths, preprocess_all, split_held_out
from vlm_export.export.int8.gate import QuantizationGateError, describe_gate, gate_report
from vlm_export.export.int8.graph import (
    DEFAULT_SCOPE,
    int8_file_name,
    quantize_graph,
    quantized_node_names,
)
from vlm_export.export.int8.nncf import int8_ir_name, quantize_ir, require_nncf
from vlm_export.export.int8.nncf import settings as nncf_settings
from vlm_export.export.progress import Progress
from vlm_export.runtime.io.preprocess import Preprocessor

#: the file a ladder's INT8 rung graphs read their int8 weights from (stored once)
INT8_WEIGHTS = "image_encoder.int8.weights"
#: what quantization needs besides the device runtime: no torch (pyproject's [quantize] extra)
QUANTIZE_INSTALL_HINT = 'pip install ".[quantize]" (onnx; no torch), with [cpu] or [gpu] installed'
#: how the INT8 graph is made: ONNX Runtime's QDQ ONNX graph, or NNCF's OpenVINO IR
METHODS = ("qdq", "nncf")


@dataclass(frozen=True)
class GraphRecord:
    """A quantized ONNX graph of the bundle, as its ``engines`` record (see core.manifest)."""

    file: str
    sha256: str
    nbytes: int
    quantization: dict[str, Any]
    parity: dict[str, Any]
    precision: str = "int8"
    format: str = ONNX_ENGINE_FORMAT
    weights: dict[str, Any] | None = None  # an IR's .bin: {"file", "sha256", "bytes"}

    def to_manifest(self) -> dict[str, Any]:
        extra = {} if self.weights is None else {"weights": self.weights}
        return {
            "file": self.file,
            "format": self.format,
            **extra,
            "precision": self.precision,
            "quantization": self.quantization,
            "built_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sha256": self.sha256,
            "bytes": self.nbytes,
            "parity": self.parity,
        }


def require_quantization_tools() -> None:
    """UserError, one line saying what to install, when onnx or ONNX Runtime is missing."""
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"vlm-export quantize needs {' and '.join(missing)}: {QUANTIZE_INSTALL_HINT}"
        )


def quantize_bundle(
    bundle_dir: str | Path,
    calibration: str | Path,
    held_out: str | Path | None = None,
    overwrite: bool = False,
    scope: str = DEFAULT_SCOPE,
    progress: Progress | None = None,
    method: str = "qdq",
) -> GraphRecord:
    """Calibrate, quantize and gate; add the passing INT8 graph to the bundle (else raise).

    ``method`` "qdq" (ONNX Runtime's QDQ ONNX graph, ``scope`` applies) or "nncf" (NNCF's
    OpenVINO IR of the bundle's engine, rung 0 of a ladder). With "qdq" a ladder bundle gets one
    INT8 graph per rung, each calibrated on the same images and gated against its own fp32 rung,
    their int8 weights in one shared file (``INT8_WEIGHTS``): every rung quantizes the same
    weights to the same int8 tensors, so they are stored once. The manifest's ``ladder.int8``
    lists them; rung 0's INT8 graph is the bundle's INT8 engine. Returns rung 0's record.
    ``progress`` (two steps per graph: quantize, compare) reports the work once the inputs are
    checked.
    """
    progress = progress or Progress(2, quiet=True)
    if method not in METHODS:
        raise UserError(
            f"unknown quantization method {method!r} (choose from {', '.join(METHODS)})"
        )
    require_quantization_tools()
    if method == "nncf":
        require_nncf()
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if method == "nncf":
        return _quantize_ir(bundle_dir, manifest, calibration, held_out, overwrite, progress)
    ladder = manifest.get("ladder") if isinstance(manifest.get("ladder"), dict) else None
    graphs = [r["onnx"] for r in ladder["rungs"]] if ladder else [manifest["engine"]["onnx"]]
    names = [int8_file_name(graph) for graph in graphs]
    for name in names:
        _refuse_listed(bundle_dir, manifest, name, overwrite, "replace")
    if ladder and not (overwrite and INT8_WEIGHTS in manifest["files"]):
        _refuse_listed(bundle_dir, manifest, INT8_WEIGHTS, overwrite, "replace")
    for graph in graphs:  # bad or empty scope: now
        quantized_node_names(bundle_dir / graph, scope)
    images, held = _calibration_images(manifest, calibration, held_out)
    progress.total_steps = 2 * len(graphs)
    with _staging(bundle_dir) as staging:
        reports = []
        for index, (graph, name) in enumerate(zip(graphs, names, strict=True)):
            which = f"rung {index} " if ladder else ""
            view = {**manifest, "engine": {**manifest["engine"], "onnx": graph}}
            progress.step(
                f"calibrating and quantizing the {which}image encoder ({len(images)} images)"
            )
            quantize_graph(bundle_dir / graph, staging / name, view, images, scope, progress.bar)
            for leftover in staging.glob("*-inferred.onnx"):  # onnxruntime's scratch files
                leftover.unlink()
            progress.done(f"scope {scope}")
            progress.step(
                f"comparing {which}with the fp32 graph ({len(images)} calibration, {len(held)} "
                "held-out images)"
            )
            report = gate_report(bundle_dir, view, staging / name, images, held)
            progress.done("passed" if report["passed"] else "failed")
            if not report["passed"]:
                where = f" of {which.strip()} ({graph})" if ladder else ""
                raise QuantizationGateError(
                    f"the INT8 graph{where} was not added to the bundle: {describe_gate(report)}"
                )
            reports.append(report)
        shared = None
        if ladder:
            from vlm_export.export.graph.ladder import share_weights  # onnx: quantizing only

            shared = share_weights([staging / n for n in names], INT8_WEIGHTS)
        records = [
            _graph_record(staging / name, name, scope, len(images), len(held), report)
            for name, report in zip(names, reports, strict=True)
        ]
        manifest = _manifest_now(bundle_dir, names, overwrite)
        if shared is not None:
            weights = file_record(staging / INT8_WEIGHTS)
            move_into_bundle(staging / INT8_WEIGHTS, bundle_dir, INT8_WEIGHTS, weights["sha256"])
            manifest["files"][INT8_WEIGHTS] = weights
            manifest["ladder"]["int8"] = {
                "weights": shared,
                "rungs": [
                    {"onnx": r.file, "sha256": r.sha256, "parity": r.parity} for r in records
                ],
            }
        for record in records[1:]:
            move_into_bundle(staging / record.file, bundle_dir, record.file, record.sha256)
            manifest["files"][record.file] = {"sha256": record.sha256, "bytes": record.nbytes}
        move_into_bundle(staging / records[0].file, bundle_dir, records[0].file, records[0].sha256)
        manifest = record_engine(manifest, records[0])
        _write_manifest(bundle_dir, manifest)
    return records[0]


def _calibration_images(
    manifest: dict[str, Any], calibration: str | Path, held_out: str | Path | None
) -> tuple[Any, Any]:
    """(calibration, held-out) images preprocessed as the device will."""
    preprocess = Preprocessor.from_manifest(manifest)
    images = preprocess_all(image_paths(calibration), preprocess)
    if held_out is not None:
        return images, preprocess_all(image_paths(held_out, "held-out"), preprocess)
    return split_held_out(images)


def _manifest_now(bundle_dir: Path, names: list[str], overwrite: bool) -> dict[str, Any]:
    """The manifest read again just before the graphs move in (what another run added since the
    start is kept); without ``overwrite``, a graph another run added meanwhile is refused."""
    manifest = read_manifest(bundle_dir)
    added = [name for name in names if name in manifest["files"]]
    if added and not overwrite:
        raise UserError(
            f"{added[0]} was added to {bundle_dir} by another run while this one worked; "
            "nothing was replaced (pass --overwrite to replace it)"
        )
    return manifest


def _write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(
        bundle_dir / MANIFEST_NAME, (dumps(manifest, indent=2) + "\n").encode("utf-8")
    )


def _quantize_ir(
    bundle_dir: Path,
    manifest: dict[str, Any],
    calibration: str | Path,
    held_out: str | Path | None,
    overwrite: bool,
    progress: Progress,
) -> GraphRecord:
    """NNCF's OpenVINO INT8 IR of the bundle's engine, gated in OpenVINO and recorded."""
    onnx_name = manifest["engine"]["onnx"]
    name = int8_ir_name(onnx_name)
    _refuse_listed(bundle_dir, manifest, name, overwrite, "replace")
    _refuse_unlisted(bundle_dir, manifest, Path(name).with_suffix(".bin").name)
    images, held = _calibration_images(manifest, calibration, held_out)
    with _staging(bundle_dir) as staging:
        staged = staging / name
        progress.step(f"calibrating and quantizing the image encoder ({len(images)} images)")
        quantize_ir(bundle_dir / onnx_name, staged, manifest, images, progress.bar)
        progress.done("NNCF, transformer preset")
        progress.step(
            f"comparing with the fp32 graph ({len(images)} calibration, {len(held)} held-out "
            "images)"
        )
        report = gate_report(bundle_dir, manifest, staged, images, held)
        progress.done("passed" if report["passed"] else "failed")
        if not report["passed"]:
            raise QuantizationGateError(
                f"the INT8 graph was not added to the bundle: {describe_gate(report)}"
            )
        record = _ir_record(name, staged, file_record(staged), len(images), len(held), report)
        manifest = _manifest_now(bundle_dir, [name], overwrite)
        weights = record.weights or {}
        move_into_bundle(staged.with_suffix(".bin"), bundle_dir, weights["file"], weights["sha256"])
        move_into_bundle(staged, bundle_dir, name, record.sha256)
        manifest = record_engine(manifest, record)
        manifest["files"][weights["file"]] = {
            "sha256": weights["sha256"],
            "bytes": weights["bytes"],
        }
        _write_manifest(bundle_dir, manifest)
    return record


def _refuse_unlisted(bundle_dir: Path, manifest: dict[str, Any], name: str) -> None:
    """An IR's weights file of that name that the manifest does not list is never replaced."""
    if (bundle_dir / name).exists() and name not in manifest["files"]:
        raise UserError(
            f"{bundle_dir / name} exists but the bundle's manifest does not list it; move it "
            "away first (it is not replaced)"
        )


def _graph_record(
    staged: Path, name: str, scope: str, calibration: int, held: int, report: dict[str, Any]
) -> GraphRecord:
    copied = file_record(staged)
    return GraphRecord(
        file=name,
        sha256=copied["sha256"],
        nbytes=copied["bytes"],
        quantization={
            "tool": "onnxruntime.quantization.quantize_static",
            "format": "QDQ",
            "scope": scope,
            "weights": "int8 per-channel",
            "activations": "uint8 per-tensor",
            "calibration": "minmax",
            "calibration_images": calibration,
            "held_out_images": held,
            "float": "condensation, anchor selection, LayerNorm, softmax, elementwise ops, "
            "products outside the scope" + ("" if scope == "attention" else ", attention scores"),
        },
        parity=report,
    )


def _ir_record(
    name: str,
    staged: Path,
    copied: dict[str, Any],
    calibration: int,
    held_out: int,
    report: dict[str, Any],
) -> GraphRecord:
    """The manifest record of a gated NNCF IR (``staged`` its .xml, the .bin beside it)."""
    weights = file_record(staged.with_suffix(".bin"))
    return GraphRecord(
        file=name,
        sha256=copied["sha256"],
        nbytes=copied["bytes"],
        quantization={
            **nncf_settings(),
            "calibration_images": calibration,
            "held_out_images": held_out,
        },
        parity=report,
        format=OPENVINO_ENGINE_FORMAT,
        weights={"file": Path(name).with_suffix(".bin").name, **weights},
    )
