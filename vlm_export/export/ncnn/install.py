"""``vlm-export build-ncnn``: the bundle's image encoder as an ncnn graph, checked, then recorded.

The ONNX graph is rewritten for pnnx (``ncnn.graph``), converted in fp32 (``ncnn.convert``) in a
staging folder inside the bundle, and, where the ``ncnn`` Python package is installed, run
against ONNX Runtime CPU (``ncnn.check``, in a child process: a graph ncnn cannot run may crash
it). Only a passing graph is moved into the bundle: the .bin, then the .param, each from its own
staging folder, then the manifest (written atomically) lists both. A failure leaves the bundle as
it was.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlm_export.core.atomic import WriteError, atomic_write_bytes
from vlm_export.core.errors import UserError
from vlm_export.core.json_text import dumps
from vlm_export.core.manifest import (
    MANIFEST_NAME,
    NCNN_ENGINE_FORMAT,
    file_record,
    ncnn_engines,
    read_manifest,
)
from vlm_export.export.bundle.staging import (
    _refuse_listed,
    _staging,
    move_into_bundle,
    record_engine,
)
from vlm_export.export.ncnn.convert import signal_name
from vlm_export.runtime.engines.checks import parity as engine_parity

PRECISION = "fp32"
CHECK_MODULE = "vlm_export.export.ncnn.check"
ONNX_INSTALL_HINT = 'build-ncnn reads the ONNX graph with onnx: pip install ".[ncnn-export]"'


@dataclass(frozen=True)
class NcnnRecord:
    """An ncnn graph of the bundle, as its ``engines`` record (see core.manifest)."""

    file: str
    weights: str
    sha256: str
    nbytes: int
    converter: str
    blobs: dict[str, dict[str, str]]
    rounded_outputs: list[str]
    parity: dict[str, Any] | None
    built_utc: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )

    def to_manifest(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "weights": self.weights,
            "format": NCNN_ENGINE_FORMAT,
            "precision": PRECISION,
            "converter": self.converter,
            "blobs": self.blobs,
            "rounded_outputs": self.rounded_outputs,
            "built_utc": self.built_utc,
            "sha256": self.sha256,
            "bytes": self.nbytes,
            "parity": self.parity,
        }


def file_names(onnx_name: str) -> tuple[str, str]:
    """The .param and .bin names of a bundle ONNX file's ncnn graph."""
    stem = Path(onnx_name).stem
    return f"{stem}.ncnn.param", f"{stem}.ncnn.bin"


def ncnn_available() -> bool:
    """Whether the ``ncnn`` Python package is installed (not imported here)."""
    return importlib.util.find_spec("ncnn") is not None


def _prepared_onnx(onnx_path: Path, target: Path) -> list[str]:
    """Write the pnnx-ready copy of the graph to ``target``; the outputs the runtime rounds."""
    try:
        import onnx
    except ImportError:
        raise UserError(ONNX_INSTALL_HINT) from None
    from vlm_export.export.ncnn.graph import prepare_for_pnnx

    prepared, rounded = prepare_for_pnnx(onnx.load(str(onnx_path)))
    onnx.save(prepared, str(target))
    return rounded


def _blob_map(manifest: dict[str, Any], param_text: str) -> dict[str, dict[str, str]]:
    """Manifest input/output name -> ncnn blob (pnnx names them in0.., out0.. in ONNX order)."""
    from vlm_export.export.ncnn.convert import NcnnConversionError, io_blobs

    inputs, outputs = io_blobs(param_text)
    names = {kind: [r["name"] for r in manifest["engine"][kind]] for kind in ("inputs", "outputs")}
    if len(inputs) != len(names["inputs"]) or len(outputs) != len(names["outputs"]):
        raise NcnnConversionError(
            f"pnnx wrote {len(inputs)} inputs and {len(outputs)} outputs; the manifest lists "
            f"{len(names['inputs'])} and {len(names['outputs'])}"
        )
    return {
        "inputs": dict(zip(names["inputs"], inputs, strict=True)),
        "outputs": dict(zip(names["outputs"], outputs, strict=True)),
    }


def check_in_child(bundle_dir: Path, record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Run ``ncnn.check`` in a child process; its parity report, or EngineParityError."""
    request = {"bundle": str(bundle_dir), "record": record, "folder": str(folder)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", CHECK_MODULE],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            env=env,
        )
    except OSError as exc:
        raise engine_parity.EngineParityError(f"cannot start the ncnn check: {exc}") from None
    if done.returncode < 0:
        raise engine_parity.EngineParityError(
            f"ncnn crashed ({signal_name(done.returncode)}) running the converted graph"
        )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = " ".join(done.stderr.split())[-300:]
        raise engine_parity.EngineParityError(f"the ncnn check failed: {tail}") from None
    if "error" in answer:
        raise engine_parity.EngineParityError(answer["error"])
    return answer["report"]


def describe_report(report: dict[str, Any] | None) -> str:
    """One line about the parity of an ncnn graph (or why it was not run)."""
    if report is None:
        return (
            "not run here (the ncnn Python package is not installed): vlm-edge checks it "
            "against the bundle's reference images when it opens it"
        )
    return f"against {report['reference']}: {engine_parity.describe(report)}"


def add_ncnn_to_bundle(
    bundle_dir: str | Path,
    overwrite: bool = False,
    check: Callable[[Path, dict[str, Any], Path], dict[str, Any]] | None = check_in_child,
) -> NcnnRecord:
    """Convert the bundle's image encoder to ncnn, check it, record it (see the module doc).

    ``check`` runs the converted graph against ONNX Runtime; None (or no ncnn installed) skips
    it and records ``parity`` null.
    """
    from vlm_export.export.ncnn.convert import pnnx_executable, run_pnnx

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    engine = manifest["engine"]
    if int(engine["batch_size"]) != 1:
        raise UserError(
            f"ncnn runs batch 1; this bundle was exported with batch {engine['batch_size']}"
        )
    pnnx_executable()  # missing converter: one line before any work
    param_name, weights_name = file_names(engine["onnx"])
    _refuse_listed(bundle_dir, manifest, param_name, overwrite, "rebuild")
    if not any(r.get("weights") == weights_name for r in ncnn_engines(manifest)):
        _refuse_listed(bundle_dir, manifest, weights_name, overwrite, "rebuild")
    shapes = [list(record["shape"]) for record in engine["inputs"]]
    with _staging(bundle_dir) as work, _staging(bundle_dir) as holder:
        rounded = _prepared_onnx(bundle_dir / engine["onnx"], work / "prepared.onnx")
        stem = Path(engine["onnx"]).stem
        converted = run_pnnx(work / "prepared.onnx", shapes, work, stem)
        param_text = converted.param.read_text(encoding="utf-8")
        param = file_record(converted.param)
        record = NcnnRecord(
            file=param_name,
            weights=weights_name,
            sha256=param["sha256"],
            nbytes=param["bytes"],
            converter=f"pnnx {converted.pnnx_version}",
            blobs=_blob_map(manifest, param_text),
            rounded_outputs=rounded,
            parity=None,
        )
        staged_param, staged_weights = holder / param_name, work / weights_name
        try:
            os.replace(converted.param, staged_param)
            os.replace(converted.weights, staged_weights)
        except OSError as exc:
            raise WriteError(f"cannot write into {bundle_dir}: {exc.strerror or exc}") from None
        if check is not None and ncnn_available():
            staged = {**record.to_manifest(), "weights": os.path.relpath(staged_weights, holder)}
            record = _with_parity(record, check(bundle_dir, staged, holder))
        weights = file_record(staged_weights)
        move_into_bundle(staged_weights, bundle_dir, weights_name, weights["sha256"])
        move_into_bundle(staged_param, bundle_dir, param_name, record.sha256)
        manifest = record_engine(manifest, record)
        manifest["files"][weights_name] = {"sha256": weights["sha256"], "bytes": weights["bytes"]}
        atomic_write_bytes(
            bundle_dir / MANIFEST_NAME, (dumps(manifest, indent=2) + "\n").encode("utf-8")
        )
    return record


def _with_parity(record: NcnnRecord, report: dict[str, Any]) -> NcnnRecord:
    """The record with its passing parity report; EngineParityError (nothing kept) otherwise."""
    fates = report.get("token_fate_agreement_min")
    if not report["passed"] or (fates is not None and fates < 1.0):
        raise engine_parity.EngineParityError(
            f"{record.file} was not added to the bundle: it differs from "
            f"{engine_parity.REFERENCE}: {engine_parity.describe(report)} (fp32 needs every "
            "token fate equal)"
        )
    return replace(record, parity=report)
