"""A LiteRT (``.tflite``) graph of the bundle's image tower, converted by litert-torch.

``add_litert_to_bundle`` rebuilds the bundle's tower in PyTorch from its manifest and lowers it
with litert-torch (``litert.convert``, in a child process: its logs and memory stay there) into
a staging folder inside the bundle. The graph keeps the manifest's tensor names (its
``serving_default`` signature) and shapes, image NCHW, so every backend feeds the same arrays.
It is then run with the LiteRT interpreter against the bundle's own ONNX graph on ONNX Runtime
CPU: the engine parity cases (random images, anchors off and on) and the bundle's reference
images. It is kept only when every embedding cosine reaches ``MIN_COSINE`` and every token fate
equals ONNX Runtime's, which also proves the rebuilt tower is the bundle's; then it moves into
the bundle and is recorded in ``engines`` (manifest written atomically). A failing or
interrupted conversion leaves the bundle as it was.

Why litert-torch and not onnx2tf (which converts the ONNX graph itself): onnx2tf 1.29 guesses
NCHW/NHWC layouts per tensor and, on these towers, transposed the token axis of the patch
embedding when tokens and channels have equal sizes (vlm-test-tiny: embedding cosine 0.92),
failed on ViT-B-32's positional-embedding Add and on ``Clip`` with only a minimum; litert-torch
lowers the PyTorch tower without layout guessing (cosine 1.0, fates equal, TopK and TopK-free).
It is the optional ``[litert-export]`` extra; without it the error names what to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.atomic import atomic_write_bytes
from vlm_export.core.errors import UserError
from vlm_export.core.json_text import dumps
from vlm_export.core.manifest import (
    ANCHORS_INPUT,
    EMBEDDING_OUTPUT,
    FATE_OUTPUT,
    MANIFEST_NAME,
    TFLITE_ENGINE_FORMAT,
    file_record,
    read_manifest,
)
from vlm_export.core.reference_images import REFERENCE_COUNT
from vlm_export.export.bundle.staging import _refuse_listed, _staging, move_into_bundle
from vlm_export.export.litert.convert import REFUSED
from vlm_export.export.progress import Progress
from vlm_export.runtime.engines.base import BundleGraph
from vlm_export.runtime.engines.checks import parity as engine_parity
from vlm_export.runtime.engines.checks.reference import bundle_inputs

INSTALL_HINT = (
    'the LiteRT converter is not installed: pip install ".[export,litert-export]" (litert-torch; '
    "see docs/litert.md)"
)
#: the converter's modules (import names) and the distributions whose versions are recorded
CONVERTER_MODULES = ("litert_torch", "torch", "open_clip")
CONVERTER_DISTRIBUTIONS = ("litert-torch", "torch", "open_clip_torch")
#: the embedding cosine every case needs (fp32; token fates must be equal too)
MIN_COSINE = 0.9999
PRECISION = "fp32"
LAYOUT = "nchw"
#: longest a conversion may run (ViT-B/16 takes minutes on a workstation CPU)
CONVERT_TIMEOUT_S = 3600


class LiteRtConverterMissing(UserError):
    """litert-torch (or torch, open_clip) is not installed in this environment."""


class LiteRtConversionError(UserError):
    """The conversion failed, or its graph differs from the bundle's ONNX graph."""


def litert_file_name(onnx_name: str) -> str:
    """The ``.tflite`` file of an ONNX graph (``image_encoder.fp32.tflite``)."""
    return f"{Path(onnx_name).stem}.{PRECISION}.tflite"


def check_converter() -> dict[str, str]:
    """The converter's versions; LiteRtConverterMissing naming what to install."""
    missing = [name for name in CONVERTER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise LiteRtConverterMissing(f"{INSTALL_HINT}; missing: {', '.join(missing)}")
    return {name: metadata.version(name) for name in CONVERTER_DISTRIBUTIONS}


def convert_tower(bundle_dir: Path, out: Path) -> Path:
    """Rebuild the bundle's tower and write it to ``out`` with litert-torch (a child process)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "vlm_export.export.litert.convert", str(bundle_dir), str(out)]
    try:
        done = subprocess.run(
            command,
            cwd=out.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=CONVERT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise LiteRtConversionError(
            f"litert-torch did not finish within {CONVERT_TIMEOUT_S} s"
        ) from None
    if done.returncode == REFUSED:
        raise LiteRtConversionError(done.stderr.strip().splitlines()[-1])
    if done.returncode != 0 or not out.is_file():
        raise LiteRtConversionError(
            f"litert-torch failed: {_last_error(done.stdout + done.stderr)}"
        )
    return out


def _last_error(log: str) -> str:
    """The last line of a converter log that says what went wrong (else its last line)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def _operators(tflite: Path) -> dict[str, int]:
    """Operator counts of a LiteRT graph as written (before a delegate takes ops over)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(model_path=str(tflite), experimental_op_resolver_type=resolver)
    counts: dict[str, int] = {}
    for op in interpreter._get_ops_details():
        counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
    return dict(sorted(counts.items()))


def _reference_cases(engine: Any, reference: Any, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The bundle's reference images through both (anchors off): one case per batch."""
    inputs = {record["name"]: record for record in manifest["engine"]["inputs"]}
    if ANCHORS_INPUT in inputs:
        shape = [int(v) for v in inputs[ANCHORS_INPUT]["shape"]]
        for backend in (engine, reference):
            backend.set_anchors(np.zeros(shape, np.float32), np.zeros(shape[0], np.float32))
    batch = int(manifest["engine"]["batch_size"])
    images = bundle_inputs(manifest, REFERENCE_COUNT)
    cases = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        want = {k: np.array(v) for k, v in reference.infer(chunk).items()}
        got = {k: np.array(v) for k, v in engine.infer(chunk).items()}
        cases.append(engine_parity.compare_outputs(f"reference{start}", got, want))
    return cases


def parity_report(bundle_dir: Path, manifest: dict[str, Any], tflite: Path) -> dict[str, Any]:
    """The ``.tflite`` graph on LiteRT against ONNX Runtime CPU; LiteRtConversionError when an
    embedding cosine is below MIN_COSINE or a token fate differs."""
    from vlm_export.runtime.engines.backends.litert_backend import LiteRtBackend

    graph = BundleGraph(bundle_dir, manifest)
    with contextlib.ExitStack() as stack:
        engine = LiteRtBackend(graph, graph=tflite, layout=LAYOUT)
        stack.callback(engine.close)
        reference = engine_parity.open_reference(bundle_dir, manifest)
        stack.callback(reference.close)
        try:
            report = engine_parity.compare_backends(engine, reference, manifest, PRECISION)
            report["cases"] += _reference_cases(engine, reference, manifest)
        except RuntimeError as exc:
            raise LiteRtConversionError(
                f"{tflite.name} was not added to the bundle: running it failed ({exc})"
            ) from None
    cosines = [case[EMBEDDING_OUTPUT]["cosine"] for case in report["cases"]]
    fates = [
        case[f"{FATE_OUTPUT}_agreement"]
        for case in report["cases"]
        if FATE_OUTPUT + "_agreement" in case
    ]
    report.update(
        embedding_cosine_min=min(cosines),
        token_fate_agreement_min=min(fates) if fates else None,
        thresholds={"embedding_cosine_min": MIN_COSINE, "token_fate_agreement": 1.0},
        reference_images=REFERENCE_COUNT,
        operators=_operators(tflite),
    )
    report["passed"] = bool(
        all(np.isfinite(cosines)) and min(cosines) >= MIN_COSINE and all(f == 1.0 for f in fates)
    )
    if not report["passed"]:
        raise LiteRtConversionError(
            f"{tflite.name} was not added to the bundle: it differs from "
            f"{engine_parity.REFERENCE}: {engine_parity.describe(report)} (token fates must all "
            "be equal)"
        )
    return report


def add_litert_to_bundle(
    bundle_dir: str | Path, overwrite: bool = False, progress: Progress | None = None
) -> dict[str, Any]:
    """Convert the bundle's ONNX image tower to ``.tflite``, check it, record it; the record.

    The file is ``<onnx stem>.fp32.tflite``; one the manifest already lists is replaced only
    with ``overwrite``. Steps: convert (litert-torch), check against ONNX Runtime, then move in and
    write the manifest.
    """
    bundle_dir = Path(bundle_dir)
    progress = progress or Progress(2, quiet=True)
    manifest = read_manifest(bundle_dir)
    versions = check_converter()
    onnx_name = str(manifest["engine"]["onnx"])
    name = litert_file_name(onnx_name)
    _refuse_listed(bundle_dir, manifest, name, overwrite, "rebuild")
    with _staging(bundle_dir) as staging:
        progress.step(
            f"rebuilding the image tower and converting it with litert-torch "
            f"{versions['litert-torch']}"
        )
        staged = convert_tower(bundle_dir, staging / name)
        progress.done(f"{staged.stat().st_size / 2**20:.1f} MiB")
        progress.step("checking it against ONNX Runtime CPU (parity images, reference images)")
        parity = parity_report(bundle_dir, manifest, staged)
        progress.done(engine_parity.describe(parity))
        listed = file_record(staged)
        record = {
            "file": name,
            "format": TFLITE_ENGINE_FORMAT,
            "precision": PRECISION,
            "layout": LAYOUT,
            "converter": {
                "tool": "litert-torch",
                "from": "the tower rebuilt from the manifest",
                **versions,
            },
            "operators": parity.pop("operators"),
            "built_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sha256": listed["sha256"],
            "bytes": listed["bytes"],
            "parity": parity,
        }
        move_into_bundle(staged, bundle_dir, name, listed["sha256"])
        engines = [e for e in manifest.get("engines") or [] if e.get("file") != name]
        manifest["engines"] = [*engines, record]
        manifest["files"][name] = listed
        atomic_write_bytes(bundle_dir / MANIFEST_NAME, (dumps(manifest, indent=2) + "\n").encode())
    return record
