"""ONNX Runtime against PyTorch on the same inputs: polygraphy-style statistics, pass or fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import CLS_OUTPUT, EMBEDDING_OUTPUT
from vlm_export.export.graph.onnx_export import io_names
from vlm_export.models.condensing_tower import CondensingVisionTower
from vlm_export.runtime.engines.checks.parity import compare_outputs

MIN_COSINE = 0.9999  # embedding and cls_per_layer (the reservoir reads the CLS stack)
MAX_ABS_EMBEDDING = 1e-3
MIN_FATE_AGREEMENT = 0.99  # kept/merged/pruned per patch; near-ties may flip a rare token


class ParityError(UserError):
    """The exported graph does not compute what the PyTorch tower computes."""


def _realistic_anchors(tower: CondensingVisionTower, generator: torch.Generator) -> torch.Tensor:
    """Anchors made of the tower's own CLS tokens (class means of a few images), plus noise."""
    image, anchors, valid = tower.example_inputs(2)
    image = torch.randn(image.shape, generator=generator)
    with torch.no_grad():
        _, cls_stack, _ = tower(image, torch.zeros_like(anchors), torch.zeros_like(valid))
    rows = cls_stack[:, [layer - 1 for layer in tower.reduction_layers]]  # [2, R, D]
    picks = torch.randint(0, 2, (tower.num_classes,), generator=generator)
    noise = torch.randn(anchors.shape, generator=generator) * rows.std() * 0.3
    return rows[picks] + noise


def parity_cases(tower: CondensingVisionTower, batch_size: int, seed: int = 0):
    """Named input tuples: images alone, or images with anchors off and on."""
    generator = torch.Generator().manual_seed(seed)
    example = tower.example_inputs(batch_size)
    image = torch.randn(example[0].shape, generator=generator)
    if not tower.condensing:
        return [("image", (image,))]
    _, anchors, valid = example
    return [
        ("anchors_off", (image, torch.zeros_like(anchors), torch.zeros_like(valid))),
        ("anchors_on", (image, _realistic_anchors(tower, generator), torch.ones_like(valid))),
    ]


def check_parity(
    tower: CondensingVisionTower, onnx_path: str | Path, batch_size: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Run both on the parity cases; return the manifest's parity section; raise if it fails."""
    input_names, output_names = io_names(tower)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    cases = []
    for name, inputs in parity_cases(tower, batch_size, seed):
        with torch.no_grad():
            expected = [tensor.numpy() for tensor in tower(*inputs)]
        feeds = {key: tensor.numpy() for key, tensor in zip(input_names, inputs, strict=True)}
        actual = dict(zip(output_names, session.run(output_names, feeds), strict=True))
        want = dict(zip(output_names, expected, strict=True))
        cases.append(compare_outputs(name, actual, want, reference="PyTorch"))
    cosine_min = min(case[EMBEDDING_OUTPUT]["cosine"] for case in cases)
    cls_cosine_min = min(case[CLS_OUTPUT]["cosine"] for case in cases)
    max_abs = max(case[EMBEDDING_OUTPUT]["max_abs"] for case in cases)
    fate_min = min((case.get("token_fate_agreement", 1.0) for case in cases), default=1.0)
    report = {
        "reference": "PyTorch eager (fp32, CPU)",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "max_abs": max_abs,
        "median_abs": max(case[EMBEDDING_OUTPUT]["median_abs"] for case in cases),
        "cosine_min": cosine_min,
        "cls_cosine_min": cls_cosine_min,
        "token_fate_agreement_min": fate_min,
        "thresholds": {
            "cosine_min": MIN_COSINE,
            "embedding_max_abs": MAX_ABS_EMBEDDING,
            "token_fate_agreement_min": MIN_FATE_AGREEMENT,
        },
        "cases": cases,
    }
    problems = []
    if cosine_min < MIN_COSINE or max_abs > MAX_ABS_EMBEDDING:
        problems.append(
            f"embedding cosine {cosine_min:.6f} (need >= {MIN_COSINE}), max abs error "
            f"{max_abs:.2e} (need <= {MAX_ABS_EMBEDDING})"
        )
    if cls_cosine_min < MIN_COSINE:
        problems.append(f"cls_per_layer cosine {cls_cosine_min:.6f} (need >= {MIN_COSINE})")
    if fate_min < MIN_FATE_AGREEMENT:
        problems.append(
            f"token fate agreement {fate_min:.4f} (need >= {MIN_FATE_AGREEMENT}): the engine "
            "condenses other tokens than PyTorch"
        )
    report["passed"] = not problems
    if problems:
        raise ParityError("ONNX Runtime output differs from PyTorch: " + "; ".join(problems))
    return report
