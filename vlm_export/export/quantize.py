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
from vlm_export.core.manifest import MANIFEST_NAME, ONNX_ENGINE_FORMAT, file_record, read_manifest
from vlm_export.export.bundle_staging import (
    _refuse_listed,
    _staging,
    move_into_bundle,
    record_engine,
)
from vlm_export.export.int8_calibration import image_paths, preprocess_all, split_held_out
from vlm_export.export.int8_gate import QuantizationGateError, describe_gate, gate_report
from vlm_export.export.int8_graph import (
    DEFAULT_SCOPE,
    int8_file_name,
    quantize_graph,
    quantized_node_names,
)
from vlm_export.export.progress import Progress
from vlm_export.runtime.io.preprocess import Preprocessor

#: what quantization needs besides the device runtime: no torch (pyproject's [quantize] extra)
QUANTIZE_INSTALL_HINT = 'pip install ".[quantize]" (onnx; no torch), with [cpu] or [gpu] installed'


@dataclass(frozen=True)
class GraphRecord:
    """A quantized ONNX graph of the bundle, as its ``engines`` record (see core.manifest)."""

    file: str
    sha256: str
    nbytes: int
    quantization: dict[str, Any]
    parity: dict[str, Any]
    precision: str = "int8"

    def to_manifest(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "format": ONNX_ENGINE_FORMAT,
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
) -> GraphRecord:
    """Calibrate, quantize and gate; add the passing INT8 graph to the bundle (else raise).

    ``progress`` (two steps: quantize, compare) reports the work once the inputs are checked.
    """
    progress = progress or Progress(2, quiet=True)
    require_quantization_tools()
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    name = int8_file_name(manifest["engine"]["onnx"])
    _refuse_listed(bundle_dir, manifest, name, overwrite, "replace")
    quantized_node_names(bundle_dir / manifest["engine"]["onnx"], scope)  # bad or empty scope: now
    preprocess = Preprocessor.from_manifest(manifest)
    images = preprocess_all(image_paths(calibration), preprocess)
    if held_out is not None:
        held = preprocess_all(image_paths(held_out), preprocess)
    else:
        images, held = split_held_out(images)
    onnx_path = bundle_dir / manifest["engine"]["onnx"]
    with _staging(bundle_dir) as staging:
        staged = staging / name
        progress.step(f"calibrating and quantizing the image encoder ({len(images)} images)")
        quantize_graph(onnx_path, staged, manifest, images, scope, progress.bar)
        for leftover in staging.glob("*-inferred.onnx"):  # onnxruntime's scratch files
            leftover.unlink()
        progress.done(f"scope {scope}")
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
        copied = file_record(staged)
        record = GraphRecord(
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
                "calibration_images": len(images),
                "held_out_images": len(held),
                "float": "condensation, anchor selection, LayerNorm, softmax, elementwise ops, "
                "products outside the scope"
                + ("" if scope == "attention" else ", attention scores"),
            },
            parity=report,
        )
        move_into_bundle(staged, bundle_dir, name, record.sha256)
        manifest = record_engine(manifest, record)  # type: ignore[arg-type]
        atomic_write_bytes(
            bundle_dir / MANIFEST_NAME, (dumps(manifest, indent=2) + "\n").encode("utf-8")
        )
    return record
