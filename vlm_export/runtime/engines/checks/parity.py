"""An engine against ONNX Runtime CPU on the same inputs: the parity record of a TensorRT engine.

``compare_backends`` runs two ``EngineBackend`` objects, the engine under test and the reference
(ONNX Runtime's CPU provider on the bundle's ONNX graph, ``open_reference``), on a few seeded
random images; a condensing engine is compared with its anchors off (all zeros) and on (anchors
made from the reference's own CLS tokens at the anchor layers plus noise, every class valid), as
the reservoir feeds them. Per output it records polygraphy-style statistics: max and median
absolute error and cosine similarity (per batch item, the smallest), and for ``token_fate`` the
fraction of equal codes. The engine passes when every embedding value is finite and the embedding
cosine reaches ``MIN_EMBEDDING_COSINE`` for its precision; the other numbers are recorded, not
gated (fp16 near-ties may condense a different rare token).

No torch and no onnx: this runs where ``vlm-export build-engine`` runs, on the device itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import (
    ANCHORS_INPUT,
    ANCHORS_VALID_INPUT,
    CLS_OUTPUT,
    EMBEDDING_OUTPUT,
    FATE_OUTPUT,
    IMAGE_INPUT,
)
from vlm_export.runtime.engines.base import BundleGraph, EngineBackend

REFERENCE = "onnxruntime CPU"
REFERENCE_PROVIDERS = ("CPUExecutionProvider",)
#: the smallest embedding cosine (engine vs ONNX Runtime CPU) an engine of each precision needs
MIN_EMBEDDING_COSINE = {"fp16": 0.999, "fp32": 0.9999}
PARITY_IMAGES = 2
ANCHOR_NOISE = 0.3  # anchor noise, relative to the spread of the CLS rows it is added to


class EngineParityError(UserError):
    """The engine's outputs differ from ONNX Runtime CPU's beyond the threshold (or cannot be
    compared); the message gives the numbers."""


def open_reference(folder: str | Path, manifest: dict[str, Any]) -> EngineBackend:
    """ONNX Runtime on CPU over the bundle's ONNX graph (imports onnxruntime only now)."""
    from vlm_export.runtime.engines.backends.onnxruntime_backend import OnnxRuntimeBackend

    graph = BundleGraph(Path(folder), manifest)
    return OnnxRuntimeBackend(graph, providers=list(REFERENCE_PROVIDERS))  # type: ignore[arg-type]


def min_embedding_cosine(precision: str) -> float:
    """The embedding cosine threshold of ``precision``; UserError for an unknown precision."""
    if precision not in MIN_EMBEDDING_COSINE:
        known = ", ".join(MIN_EMBEDDING_COSINE)
        raise UserError(f"unknown engine precision {precision!r}; choose one of {known}")
    return MIN_EMBEDDING_COSINE[precision]


def _cosine_min(got: np.ndarray, want: np.ndarray) -> float:
    """The smallest cosine over the batch items (two zero vectors count as equal)."""
    a = got.reshape(got.shape[0], -1).astype(np.float64)
    b = want.reshape(want.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    both_zero = ~a.any(axis=1) & ~b.any(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosines = np.where(both_zero, 1.0, dots / np.maximum(norms, 1e-300))
    return float(np.min(cosines))


def _float_stats(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return {
        "max_abs": float(np.max(diff)),
        "median_abs": float(np.median(diff)),
        "cosine": _cosine_min(got, want),
    }


def compare_outputs(
    case: str,
    got: dict[str, np.ndarray],
    want: dict[str, np.ndarray],
    reference: str = "ONNX Runtime",
) -> dict[str, Any]:
    """One case's statistics, output by output (the reference's outputs ``want`` decide which):
    max/median abs error and cosine for float outputs, the fraction of equal codes otherwise.
    ``reference`` names what produced ``want``, for the error messages.

    Shared by the export's parity check (ONNX Runtime vs PyTorch) and the engine's (TensorRT vs
    ONNX Runtime), so both record the same statistics under the same names.
    """
    missing = sorted(set(want) - set(got))
    if missing:
        raise EngineParityError(f"no {', '.join(missing)} output(s) to compare")
    record: dict[str, Any] = {"case": case}
    for name, expected in want.items():
        value = np.asarray(got[name])
        if value.shape != expected.shape:
            raise EngineParityError(
                f"output {name!r} has shape {list(value.shape)}, {reference}'s "
                f"{list(expected.shape)}"
            )
        if name == FATE_OUTPUT or not np.issubdtype(expected.dtype, np.floating):
            record[f"{name}_agreement"] = float(np.mean(value == expected))
        else:
            record[name] = _float_stats(value, expected)
    return record


def _anchor_layers(manifest: dict[str, Any], layers: int, reductions: int) -> list[int]:
    """The CLS rows the anchors of each reduction block come from (manifest, else spread out)."""
    chosen = (manifest.get("condensation") or {}).get("anchor_layers")
    if (
        isinstance(chosen, list)
        and len(chosen) == reductions
        and all(isinstance(v, int) and 0 <= v < layers for v in chosen)
    ):
        return chosen
    return [int(v) for v in np.linspace(0, layers - 1, reductions)]


def cls_like_anchors(
    reference_outputs: dict[str, np.ndarray],
    anchors_shape: tuple[int, ...],
    manifest: dict[str, Any],
    rng: np.random.Generator,
) -> np.ndarray:
    """Anchors [C, R, D] scaled like CLS tokens: the first image's CLS rows plus noise per class."""
    classes, reductions, width = anchors_shape
    cls = reference_outputs.get(CLS_OUTPUT)
    if cls is not None and cls.ndim == 3 and cls.shape[2] == width:
        rows = cls[0, _anchor_layers(manifest, cls.shape[1], reductions)].astype(np.float64)
    else:  # no CLS stack to copy: unit-scale rows
        rows = rng.standard_normal((reductions, width))
    spread = float(rows.std()) or 1.0
    noise = rng.standard_normal((classes, reductions, width)) * spread * ANCHOR_NOISE
    return (rows[None] + noise).astype(np.float32)


def _run(
    backend: EngineBackend,
    image: np.ndarray,
    anchors: np.ndarray | None,
    valid: np.ndarray | None,
) -> dict[str, np.ndarray]:
    if anchors is not None:
        backend.set_anchors(anchors, valid)
    return {name: np.array(value) for name, value in backend.infer(image).items()}


def _min(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return min(present) if present else None


def _max(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return max(present) if present else None


def compare_backends(
    engine: EngineBackend,
    reference: EngineBackend,
    manifest: dict[str, Any],
    precision: str,
    images: int = PARITY_IMAGES,
    seed: int = 0,
) -> dict[str, Any]:
    """Run both backends on the same inputs; return the parity record (``passed`` included).

    The record is what the manifest's engine entry keeps under ``parity``. Cases: per image
    ``image<i>`` for a full tower, ``image<i>_anchors_off`` and ``image<i>_anchors_on`` for a
    condensing one. Raises EngineParityError only when the outputs cannot be compared.
    """
    threshold = min_embedding_cosine(precision)
    inputs = {record["name"]: record for record in manifest["engine"]["inputs"]}
    image_shape = tuple(int(v) for v in inputs[IMAGE_INPUT]["shape"])
    condensing = ANCHORS_INPUT in inputs and ANCHORS_VALID_INPUT in inputs
    rng = np.random.default_rng(seed)
    cases: list[dict[str, Any]] = []

    def compare(name: str, image, anchors=None, valid=None) -> dict[str, np.ndarray]:
        want = _run(reference, image, anchors, valid)
        got = _run(engine, image, anchors, valid)
        cases.append(compare_outputs(name, got, want))
        return want

    for index in range(images):
        image = rng.standard_normal(image_shape).astype(np.float32)
        if not condensing:
            compare(f"image{index}", image)
            continue
        anchors_shape = tuple(int(v) for v in inputs[ANCHORS_INPUT]["shape"])
        off = np.zeros(anchors_shape, np.float32)
        want = compare(f"image{index}_anchors_off", image, off, np.zeros(anchors_shape[0]))
        anchors = cls_like_anchors(want, anchors_shape, manifest, rng)
        compare(f"image{index}_anchors_on", image, anchors, np.ones(anchors_shape[0], np.float32))

    def stat(output: str, key: str) -> list[float | None]:
        return [case[output][key] if output in case else None for case in cases]

    if not all(EMBEDDING_OUTPUT in case for case in cases):
        raise EngineParityError(f"the engine has no float {EMBEDDING_OUTPUT!r} output to compare")
    embedding_cosines = stat(EMBEDDING_OUTPUT, "cosine")
    embedding_max_abs = stat(EMBEDDING_OUTPUT, "max_abs")
    finite = all(np.isfinite(v) for v in embedding_cosines + embedding_max_abs)
    cosine_min = _min(embedding_cosines)
    report: dict[str, Any] = {
        "reference": REFERENCE,
        "reference_backend": reference.description,
        "engine_backend": engine.description,
        "precision": precision,
        "images": images,
        "seed": seed,
        "embedding_cosine_min": cosine_min,
        "embedding_max_abs": _max(embedding_max_abs),
        "embedding_median_abs": _max(stat(EMBEDDING_OUTPUT, "median_abs")),
        "cls_cosine_min": _min(stat(CLS_OUTPUT, "cosine")),
        "cls_max_abs": _max(stat(CLS_OUTPUT, "max_abs")),
        "token_fate_agreement_min": _min(case.get(f"{FATE_OUTPUT}_agreement") for case in cases),
        "thresholds": {"embedding_cosine_min": threshold},
        "passed": bool(finite and cosine_min is not None and cosine_min >= threshold),
        "cases": cases,
    }
    return report


def describe(report: dict[str, Any]) -> str:
    """The numbers of a parity record in one line."""
    parts = [
        f"embedding cosine {report['embedding_cosine_min']:.6f} "
        f"(need >= {report['thresholds']['embedding_cosine_min']} for {report['precision']})",
        f"max abs error {report['embedding_max_abs']:.2e}",
    ]
    if report.get("cls_cosine_min") is not None:
        parts.append(f"cls_per_layer cosine {report['cls_cosine_min']:.6f}")
    if report.get("token_fate_agreement_min") is not None:
        parts.append(f"token fate agreement {report['token_fate_agreement_min']:.4f}")
    return ", ".join(parts)


def check_engine_parity(
    engine: EngineBackend,
    reference: EngineBackend,
    manifest: dict[str, Any],
    precision: str,
    images: int = PARITY_IMAGES,
    seed: int = 0,
) -> dict[str, Any]:
    """``compare_backends``, raising EngineParityError with the numbers when it did not pass."""
    report = compare_backends(engine, reference, manifest, precision, images, seed)
    if not report["passed"]:
        raise EngineParityError(f"the engine differs from {REFERENCE}: {describe(report)}")
    return report
