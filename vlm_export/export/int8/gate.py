"""The gate an INT8 graph must pass: it and the bundle's fp32 graph (both in ONNX Runtime CPU) on
the calibration and held-out images; every embedding cosine must reach MIN_COSINE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import EMBEDDING_OUTPUT, FATE_OUTPUT, TEXT_EMBEDDINGS
from vlm_export.runtime.engines.base import BundleGraph
from vlm_export.runtime.engines.checks.parity import REFERENCE, cls_like_anchors

MIN_COSINE = 0.99
ANCHORS_ON_IMAGES = 4  # held-out images also run with anchors on (CLS-like, every class valid)


class QuantizationGateError(UserError):
    """The INT8 graph differs from the fp32 graph beyond the gate; it was not written."""


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1)
    denominator = np.linalg.norm(a, axis=1) * np.linalg.norm(b.astype(np.float64), axis=1)
    return np.sum(a * b, axis=1) / np.maximum(denominator, 1e-300)


@dataclass
class GateStats:
    """Per-image embedding cosines, top-1 agreements and token-fate agreements of one image set."""

    cosines: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)
    fates: list[float] = field(default_factory=list)

    def add(self, got: dict[str, np.ndarray], want: dict[str, np.ndarray], text: np.ndarray):
        self.cosines.extend(_cosines(got[EMBEDDING_OUTPUT], want[EMBEDDING_OUTPUT]).tolist())
        top_got = np.argmax(got[EMBEDDING_OUTPUT] @ text.T, axis=1)
        top_want = np.argmax(want[EMBEDDING_OUTPUT] @ text.T, axis=1)
        self.top1.extend((top_got == top_want).tolist())
        if FATE_OUTPUT in want:
            self.fates.append(float(np.mean(got[FATE_OUTPUT] == want[FATE_OUTPUT])))

    def summary(self) -> dict[str, Any]:
        if not self.cosines:
            return {"images": 0}
        return {
            "images": len(self.top1),
            "embedding_cosine_min": float(np.min(self.cosines)),
            "embedding_cosine_mean": float(np.mean(self.cosines)),
            "top1_agreement": float(np.mean(self.top1)),
            "token_fate_agreement_mean": float(np.mean(self.fates)) if self.fates else None,
            "token_fate_agreement_min": float(np.min(self.fates)) if self.fates else None,
        }


def gate_report(
    bundle_dir: Path,
    manifest: dict[str, Any],
    int8_path: Path,
    calibration: list[np.ndarray],
    held_out: list[np.ndarray],
) -> dict[str, Any]:
    """The INT8 graph against the fp32 graph (ONNX Runtime CPU) on both image sets.

    An ONNX graph runs in ONNX Runtime CPU, an OpenVINO IR (``.xml``) in OpenVINO's CPU plugin.
    """
    from vlm_export.runtime.engines.backends.onnxruntime_backend import OnnxRuntimeBackend

    text = np.load(bundle_dir / manifest["text"].get("embeddings", TEXT_EMBEDDINGS))
    int8_manifest = {**manifest, "engine": {**manifest["engine"], "onnx": int8_path.name}}
    cpu = ["CPUExecutionProvider"]
    reference = OnnxRuntimeBackend(BundleGraph(bundle_dir, manifest), providers=cpu)  # type: ignore[arg-type]
    engine: Any
    if int8_path.suffix == ".xml":
        from vlm_export.runtime.engines.backends.openvino_backend import OpenVinoBackend

        graph = BundleGraph(bundle_dir, manifest)
        engine = OpenVinoBackend(graph, "int8", graph=int8_path)  # type: ignore[arg-type]
    else:
        graph = BundleGraph(int8_path.parent, int8_manifest)
        engine = OnnxRuntimeBackend(graph, providers=cpu)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    sets = {"calibration": GateStats(), "held_out": GateStats(), "held_out_anchors_on": GateStats()}
    try:
        for name, images in (("calibration", calibration), ("held_out", held_out)):
            for index, image in enumerate(images):
                want = reference.infer(image)
                sets[name].add(engine.infer(image), want, text)
                if name == "held_out" and index < ANCHORS_ON_IMAGES and engine.condensing:
                    shape = reference.bound_anchors()[0].shape
                    anchors = cls_like_anchors(want, shape, manifest, rng)
                    valid = np.ones(shape[0], np.float32)
                    for backend in (reference, engine):
                        backend.set_anchors(anchors, valid)
                    sets["held_out_anchors_on"].add(
                        engine.infer(image), reference.infer(image), text
                    )
                    off = np.zeros(shape, np.float32), np.zeros(shape[0], np.float32)
                    for backend in (reference, engine):
                        backend.set_anchors(*off)
    finally:
        engine.close()
        reference.close()
    summaries = {name: stats.summary() for name, stats in sets.items()}
    cosines = [c for stats in sets.values() for c in stats.cosines]
    finite = bool(np.all(np.isfinite(cosines)))
    return {
        "reference": REFERENCE + " fp32 graph",
        "precision": "int8",
        "thresholds": {"embedding_cosine_min": MIN_COSINE},
        "embedding_cosine_min": float(np.min(cosines)),
        "embedding_cosine_mean": float(np.mean(cosines)),
        "passed": finite and float(np.min(cosines)) >= MIN_COSINE,
        **summaries,
    }


def describe_gate(report: dict[str, Any]) -> str:
    """The gate's numbers in one line."""
    parts = [
        f"embedding cosine min {report['embedding_cosine_min']:.5f} mean "
        f"{report['embedding_cosine_mean']:.5f} (need >= {MIN_COSINE})"
    ]
    for name in ("calibration", "held_out"):
        stats = report[name]
        if stats.get("images"):
            part = f"{name} {stats['images']} images: top-1 agreement {stats['top1_agreement']:.3f}"
            if stats.get("token_fate_agreement_mean") is not None:
                part += f", token fate agreement {stats['token_fate_agreement_mean']:.4f}"
            parts.append(part)
    return "; ".join(parts)
