"""The engine check at open: run the reference images, compare with the bundle's record.

At export the bundle records the embeddings that ONNX Runtime (CPU, fp32) gives for the fixed
synthetic reference images of ``core.reference_images``, once per fp32 graph (the engine and
every ladder rung). When a backend and precision open on the device they run the same images:

- **drift**: the smallest cosine between an engine embedding and its record must reach the bound
  of the engine's precision (PRECISION_BOUNDS); below it the engine is refused (UserError), or
  with ``allow_drift`` run with a warning;
- **collapse**: when the engine gives (near) the same embedding for every reference image while
  the record's differ, or a non-finite one, it is refused even with ``allow_drift``.

A bundle without a record (exported before the check existed) opens with one note that the check
is skipped. INT8 graphs and TensorRT engines are compared with the fp32 record of ``engine.onnx``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm_export.core.errors import BundleError, UserError
from vlm_export.core.manifest import ANCHORS_INPUT, ANCHORS_VALID_INPUT, EMBEDDING_OUTPUT
from vlm_export.core.reference_images import (
    GENERATOR,
    REFERENCE_COUNT,
    REFERENCE_SEED,
    reference_inputs,
)
from vlm_export.runtime.engines.base import BundleGraph, EngineBackend
from vlm_export.runtime.engines.checks.parity import REFERENCE_PROVIDERS

if TYPE_CHECKING:
    from vlm_export.runtime.bundle import Bundle

log = logging.getLogger(__name__)

#: smallest cosine to the fp32 record, per precision the engine runs. Justified by the parity
#: that ``vlm-edge bench`` and the export measure on real images, with margin for the synthetic
#: images and for other CPUs and GPUs:
#: - fp32 (ONNX Runtime CPU/CUDA, OpenVINO fp32): the export's parity is cosine >= 0.9999 against
#:   PyTorch, measured 0.9999999; bench's fp32 gate is 0.9999. Bound 0.999: ten times bench's
#:   distance from 1, far above what a broken setting gives (a collapsed engine's cosine to the
#:   record is that of two different images).
#: - bf16 (OpenVINO) and fp16 (TensorRT): bench's gate is 0.999, measured 0.99986 on ViT-B/16.
#:   Bound 0.995: five times the gate's distance from 1.
#: - int8 (the quantized graph on any backend): quantize's gate is 0.99 on the user's images,
#:   measured 0.9985-0.9997 (scope mlp) and 0.9916 (scope blocks). Bound 0.98: the synthetic
#:   images lie partly outside the calibrated ranges, where INT8 clips more.
PRECISION_BOUNDS = {"fp32": 0.999, "bf16": 0.995, "fp16": 0.995, "int8": 0.98}
#: an engine whose reference embeddings spread less than this share of the record's has collapsed
COLLAPSE_SHARE = 0.05
#: a record that spreads less than this (mean 1 - cosine between images) cannot show a collapse
MIN_RECORD_SPREAD = 1e-6


class EngineDriftError(UserError):
    """The engine's reference embeddings are too far from the bundle's record (or collapsed)."""


@dataclass(frozen=True)
class CheckResult:
    """What the check at open found: cosine to the record, the bound, and the spreads."""

    backend: str
    precision: str
    cosine: float
    bound: float
    spread: float
    record_spread: float

    @property
    def collapsed(self) -> bool:
        """The engine gives one embedding for different images (or non-finite ones)."""
        if not np.isfinite(self.cosine) or not np.isfinite(self.spread):
            return True
        return (
            self.record_spread > MIN_RECORD_SPREAD
            and self.spread < COLLAPSE_SHARE * self.record_spread
        )

    @property
    def drifted(self) -> bool:
        """The cosine to the record is below the precision's bound."""
        return not self.cosine >= self.bound


def reference_section(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's ``reference`` section, None for a bundle exported without one."""
    section = manifest.get("reference")
    return section if isinstance(section, dict) else None


def record_file(manifest: dict[str, Any], graph: str) -> str | None:
    """The file holding the recorded embeddings of ``graph``, None when not recorded."""
    section = reference_section(manifest)
    if section is None:
        return None
    for record in section.get("records") or []:
        if isinstance(record, dict) and record.get("graph") == graph:
            return str(record.get("file"))
    return None


def load_record(bundle: Bundle, graph: str) -> np.ndarray | None:
    """The recorded reference embeddings [N, E] of ``graph``; BundleError when unreadable."""
    name = record_file(bundle.manifest, graph)
    if name is None:
        return None
    if name not in bundle.manifest["files"]:
        raise BundleError(f"manifest reference names the unlisted file {name}")
    try:
        array = np.load(bundle.path / name, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"{name} is not a readable .npy array ({exc})") from None
    width = int(bundle.text_embeddings.shape[1])  # the embedding width of this bundle
    if (
        array.ndim != 2
        or not np.issubdtype(array.dtype, np.floating)
        or not 1 <= array.shape[0] <= REFERENCE_COUNT
        or array.shape[1] != width
    ):
        raise BundleError(
            f"{name} holds a {array.dtype} array of shape {list(array.shape)}, not the "
            f"[1 to {REFERENCE_COUNT}, {width}] float embeddings of the reference images; "
            "re-export the bundle"
        )
    if not np.isfinite(array).all():
        raise BundleError(f"{name} holds NaN or infinite values; re-export the bundle")
    return array.astype(np.float32)


def bundle_inputs(manifest: dict[str, Any], count: int) -> np.ndarray:
    """The reference images [count, 3, H, W] as this bundle's engine takes them."""
    pre = manifest["preprocess"]
    return reference_inputs(pre["size"], pre["mean"], pre["std"], count)


def run_reference(engine: EngineBackend, manifest: dict[str, Any], count: int) -> np.ndarray:
    """The engine's embeddings [count, E] of the reference images (anchors off, batch padded)."""
    inputs = {record["name"]: record for record in manifest["engine"]["inputs"]}
    if ANCHORS_INPUT in inputs and ANCHORS_VALID_INPUT in inputs:
        shape = [int(v) for v in inputs[ANCHORS_INPUT]["shape"]]
        engine.set_anchors(np.zeros(shape, np.float32), np.zeros(shape[0], np.float32))
    images = bundle_inputs(manifest, count)
    return embed_batches(lambda batch: engine.infer(batch)[EMBEDDING_OUTPUT], images, manifest)


def embed_batches(infer: Any, images: np.ndarray, manifest: dict[str, Any]) -> np.ndarray:
    """``infer`` ([B, 3, H, W] -> [B, E]) over ``images`` in the engine's batch size B."""
    batch = int(manifest["engine"]["batch_size"])
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        out.append(np.asarray(infer(padded), np.float32)[: len(chunk)])
    return np.concatenate(out).reshape(len(images), -1)


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-300)


def spread(embeddings: np.ndarray) -> float:
    """How different the embeddings of the reference images are: mean 1 - cosine over pairs."""
    unit = _unit(embeddings)
    count = len(unit)
    if count < 2:
        return 0.0
    cosines = unit @ unit.T
    pairs = cosines[np.triu_indices(count, k=1)]
    return float(np.mean(1.0 - pairs))


def compare(
    embeddings: np.ndarray, record: np.ndarray, backend: str, precision: str
) -> CheckResult:
    """The engine's reference embeddings against the record."""
    cosines = np.sum(_unit(embeddings) * _unit(record), axis=1)
    finite = bool(np.all(np.isfinite(embeddings)))
    return CheckResult(
        backend=backend,
        precision=precision,
        cosine=float(np.min(cosines)) if finite else float("nan"),
        bound=PRECISION_BOUNDS.get(precision, PRECISION_BOUNDS["fp32"]),
        spread=spread(embeddings) if finite else float("nan"),
        record_spread=spread(record),
    )


def engine_precision(bundle: Bundle, engine: EngineBackend) -> str:
    """The precision an opened engine runs: OpenVINO's, a TensorRT engine's record, int8 for
    the quantized graph, else fp32."""
    precision = getattr(engine, "precision", None)
    if isinstance(precision, str):
        return precision
    description = engine.description
    if description.startswith("tensorrt:"):
        name = description.split(":", 1)[1]
        for record in bundle.manifest.get("engines") or []:
            if record.get("file") == name:
                return str(record.get("precision") or "fp16")
        return "fp16"
    return "int8" if description.endswith(":int8") else "fp32"


def check_engine(
    bundle: Bundle,
    engine: EngineBackend,
    allow_drift: bool = False,
    graph: str | None = None,
) -> CheckResult | None:
    """Run the reference images on ``engine`` and compare with the record of ``graph`` (default:
    the bundle's engine). Refuses with EngineDriftError (a drift unless ``allow_drift``, which
    warns instead; a collapse always); None, with a note on the engine, when nothing is recorded.
    """
    graph = graph or bundle.manifest["engine"]["onnx"]
    record = load_record(bundle, graph)
    backend = engine.description.split(":")[0]
    if record is None:
        note = (
            "the bundle records no reference embeddings (exported before vlm-export had the "
            "engine check): the check at open is skipped; re-export to have it"
        )
        notes = getattr(engine, "notes", None)
        if isinstance(notes, list):
            if note not in notes:
                notes.append(note)
        else:
            engine.notes = [note]  # type: ignore[attr-defined]
        log.info(note)
        return None
    precision = engine_precision(bundle, engine)
    embeddings = run_reference(engine, bundle.manifest, len(record))
    result = compare(embeddings, record, backend, precision)
    where = f"{backend} {precision} ({graph})"
    if not np.all(np.isfinite(embeddings)):
        raise EngineDriftError(
            f"{where} gives non-finite embeddings (NaN or infinity) for the reference images; "
            "refused even with --allow-drift: try another --backend or --precision"
        )
    if result.collapsed:
        raise EngineDriftError(
            f"{where} collapsed: it gives (near) the same embedding for the {len(record)} "
            f"different reference images (spread {result.spread:.2e}, recorded "
            f"{result.record_spread:.2e}; cosine to the record {result.cosine:.4f}, bound "
            f"{result.bound}); refused even with --allow-drift: try another --backend or "
            "--precision"
        )
    if result.drifted:
        message = (
            f"{where} drifted from the bundle's reference embeddings: cosine {result.cosine:.4f} "
            f"is below the {precision} bound {result.bound}"
        )
        if not allow_drift:
            raise EngineDriftError(
                f"{message}; try another --backend or --precision, or pass --allow-drift to run it"
            )
        log.warning("%s; running it anyway (--allow-drift)", message)
    return result


def record_name(graph: str) -> str:
    """The file that records a graph's reference embeddings: ``image_encoder.reference.npy``."""
    stem = graph[: -len(".onnx")] if graph.endswith(".onnx") else graph
    return f"{stem}.reference.npy"


def record_reference(
    folder: str | Path, manifest: dict[str, Any], graphs: Sequence[str]
) -> dict[str, Any]:
    """Run the reference images through each of ``graphs`` in ``folder`` (ONNX Runtime CPU,
    fp32), write each record beside it and return the manifest's ``reference`` section.

    ``manifest`` needs ``engine`` and ``preprocess`` (the exporter calls this before the files
    are hashed, so the records are listed with their sha256 like every other file).
    """
    from vlm_export.runtime.engines.backends.onnxruntime_backend import (
        OnnxRuntimeBackend,
        import_onnxruntime,
    )

    records = []
    for graph in graphs:
        view = {**manifest, "engine": {**manifest["engine"], "onnx": graph}}
        graph_view = BundleGraph(Path(folder), view)
        engine = OnnxRuntimeBackend(graph_view, providers=list(REFERENCE_PROVIDERS))  # type: ignore[arg-type]
        try:
            embeddings = run_reference(engine, view, REFERENCE_COUNT)
        finally:
            engine.close()
        name = record_name(graph)
        np.save(Path(folder) / name, embeddings.astype(np.float32), allow_pickle=False)
        records.append({"graph": graph, "file": name, "precision": "fp32"})
    return {
        "images": REFERENCE_COUNT,
        "generator": GENERATOR,
        "seed": REFERENCE_SEED,
        "runtime": f"onnxruntime {import_onnxruntime().__version__} CPUExecutionProvider fp32",
        "records": records,
    }


def describe_check(manifest: dict[str, Any]) -> list[str]:
    """The check as ``vlm-edge info`` shows it: the record, and the bound per precision."""
    section = reference_section(manifest)
    if section is None:
        return ["none recorded (exported before the engine check): the check at open is skipped"]
    graphs = [str(r.get("graph")) for r in section.get("records") or [] if isinstance(r, dict)]
    bounds = ", ".join(f"{name} {bound}" for name, bound in PRECISION_BOUNDS.items())
    return [
        f"embeddings of {section.get('images')} synthetic images for {', '.join(graphs)} "
        f"({section.get('runtime')})",
        f"checked at open: cosine to them >= {bounds}, else refused (--allow-drift: a warning); "
        "a collapsed engine is always refused",
    ]
