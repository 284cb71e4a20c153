"""A LiteRT (``.tflite``) graph of the bundle's image tower, converted from its ONNX graph.

``add_litert_to_bundle`` runs onnx2tf (TensorFlow's converter behind it) on the bundle's ONNX
graph in a staging folder inside the bundle, keeping the manifest's tensor names (a
``serving_default`` signature) and shapes: the image input stays NCHW
(``keep_shape_absolutely_input_names``), so every backend feeds the same arrays. ONNX ``Erf``
(exact GELU) has no TFLite builtin; onnx2tf writes it as a polynomial of builtins (absolute error
< 1.5e-7, ``replace_to_pseudo_operators``), which the parity check below bounds. The graph is then
run with the LiteRT interpreter against ONNX Runtime CPU: the engine parity cases (random images,
anchors off and on) and the bundle's reference images. It is kept only when every embedding
cosine reaches ``MIN_COSINE`` and every token fate equals ONNX Runtime's; then it moves into the
bundle and is recorded in ``engines`` (manifest written atomically). A failing or interrupted
conversion leaves the bundle as it was.

onnx2tf runs in a child process (``python -m onnx2tf``): TensorFlow's logs and memory stay there.
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
    ANCHORS_VALID_INPUT,
    EMBEDDING_OUTPUT,
    FATE_OUTPUT,
    IMAGE_INPUT,
    MANIFEST_NAME,
    TFLITE_ENGINE_FORMAT,
    file_record,
    read_manifest,
)
from vlm_export.core.reference_images import REFERENCE_COUNT
from vlm_export.export.bundle_staging import _refuse_listed, _staging, move_into_bundle
from vlm_export.export.progress import Progress
from vlm_export.runtime.engines import parity as engine_parity
from vlm_export.runtime.engines.reference import bundle_inputs

INSTALL_HINT = (
    'the LiteRT converter is not installed: pip install ".[litert-export]" (onnx2tf with '
    "TensorFlow; in a virtual environment with numpy<2, see docs/litert.md)"
)
#: the converter's modules (import names) and the distributions whose versions are recorded
CONVERTER_MODULES = ("onnx2tf", "tensorflow", "tf_keras", "onnx_graphsurgeon", "onnxsim")
CONVERTER_DISTRIBUTIONS = ("onnx2tf", "tensorflow", "onnxsim")
#: the embedding cosine every case needs (fp32; token fates must be equal too)
MIN_COSINE = 0.9999
PRECISION = "fp32"
LAYOUT = "nchw"
#: longest a conversion may run (ViT-B/16 takes minutes on a workstation CPU)
CONVERT_TIMEOUT_S = 3600


class LiteRtConverterMissing(UserError):
    """onnx2tf or TensorFlow is not installed in this environment."""


class LiteRtConversionError(UserError):
    """onnx2tf failed, or its graph differs from ONNX Runtime's outputs."""


def litert_file_name(onnx_name: str) -> str:
    """The ``.tflite`` file of an ONNX graph (``image_encoder.fp32.tflite``)."""
    return f"{Path(onnx_name).stem}.{PRECISION}.tflite"


def check_converter() -> dict[str, str]:
    """The converter's versions; LiteRtConverterMissing naming what to install."""
    missing = [name for name in CONVERTER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise LiteRtConverterMissing(f"{INSTALL_HINT}; missing: {', '.join(missing)}")
    if int(np.__version__.split(".")[0]) >= 2:
        raise LiteRtConverterMissing(
            f"onnx2tf needs numpy<2 (this environment has numpy {np.__version__}): convert in a "
            'virtual environment with pip install ".[litert-export]" "numpy<2"'
        )
    return {name: metadata.version(name) for name in CONVERTER_DISTRIBUTIONS}


def onnx2tf_command(onnx_path: Path, out_dir: Path) -> list[str]:
    """The onnx2tf command line: names and NCHW shapes kept, signature written, Erf as builtins."""
    return [
        sys.executable,
        "-m",
        "onnx2tf",
        "-i",
        str(onnx_path),
        "-o",
        str(out_dir),
        "-kat",
        IMAGE_INPUT,
        ANCHORS_INPUT,
        ANCHORS_VALID_INPUT,
        "-coion",
        "-osd",
        "-rtpo",
        "Erf",
        "-n",
    ]


def convert_onnx(onnx_path: Path, out_dir: Path) -> Path:
    """Run onnx2tf on ``onnx_path`` into ``out_dir``; the fp32 ``.tflite`` it wrote.

    onnx2tf simplifies the graph with the ``onnxsim`` command of this environment first (its
    ``bin`` folder goes first on PATH)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    try:
        done = subprocess.run(
            onnx2tf_command(onnx_path, out_dir),
            cwd=out_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=CONVERT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise LiteRtConversionError(
            f"onnx2tf did not finish within {CONVERT_TIMEOUT_S} s"
        ) from None
    written = out_dir / f"{onnx_path.stem}_float32.tflite"
    if done.returncode != 0 or not written.is_file():
        raise LiteRtConversionError(f"onnx2tf failed: {_last_error(done.stdout + done.stderr)}")
    return written


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
    from vlm_export.runtime.engines.litert_backend import LiteRtBackend

    graph = engine_parity.BundleGraph(bundle_dir, manifest)
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
    with ``overwrite``. Steps: convert (onnx2tf), check against ONNX Runtime, then move in and
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
        progress.step(f"converting {onnx_name} with onnx2tf {versions['onnx2tf']}")
        converted = convert_onnx(bundle_dir / onnx_name, staging)
        staged = converted.rename(staging / name)
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
            "converter": {"tool": "onnx2tf", "from": onnx_name, **versions},
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
