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

``method="nncf"`` makes an OpenVINO INT8 IR instead (``int8_nncf``: NNCF's transformer preset,
the condensation in its ignored scope), gated the same way in OpenVINO's CPU plugin and recorded
with ``format`` "openvino" and its ``.bin`` as ``weights``.
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
from vlm_export.export.int8_nncf import int8_ir_name, quantize_ir, require_nncf
from vlm_export.export.int8_nncf import settings as nncf_settings
from vlm_export.export.progress import Progress
from vlm_export.runtime.io.preprocess import Preprocessor

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
    OpenVINO IR). ``progress`` (two steps: quantize, compare) reports the work once the inputs
    are checked.
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
    onnx_name = manifest["engine"]["onnx"]
    name = int8_ir_name(onnx_name) if method == "nncf" else int8_file_name(onnx_name)
    _refuse_listed(bundle_dir, manifest, name, overwrite, "replace")
    if method == "nncf":
        _refuse_unlisted(bundle_dir, manifest, Path(name).with_suffix(".bin").name)
    else:
        quantized_node_names(bundle_dir / onnx_name, scope)  # bad or empty scope: now
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
        if method == "nncf":
            quantize_ir(onnx_path, staged, manifest, images, progress.bar)
            progress.done("NNCF, transformer preset")
        else:
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
        if method == "nncf":
            record = _ir_record(name, staged, copied, len(images), len(held), report)
            weights = record.weights or {}
            move_into_bundle(
                staged.with_suffix(".bin"), bundle_dir, weights["file"], weights["sha256"]
            )
            move_into_bundle(staged, bundle_dir, name, record.sha256)
            manifest = record_engine(manifest, record)  # type: ignore[arg-type]
            manifest["files"][weights["file"]] = {
                "sha256": weights["sha256"],
                "bytes": weights["bytes"],
            }
            atomic_write_bytes(
                bundle_dir / MANIFEST_NAME, (dumps(manifest, indent=2) + "\n").encode("utf-8")
            )
            return record
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


def _refuse_unlisted(bundle_dir: Path, manifest: dict[str, Any], name: str) -> None:
    """An IR's weights file of that name that the manifest does not list is never replaced."""
    if (bundle_dir / name).exists() and name not in manifest["files"]:
        raise UserError(
            f"{bundle_dir / name} exists but the bundle's manifest does not list it; move it "
            "away first (it is not replaced)"
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
