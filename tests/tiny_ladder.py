"""A tiny ladder bundle and the inputs its rungs are compared on (the shared-weights tests of
ONNX Runtime and OpenVINO use both)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.checks import measure

RATES = [0.0, 0.035, 0.1]


def export_tiny_ladder(folder: Path) -> Path:
    """vlm-test-tiny exported as a ladder at ``RATES`` (seeded weights, three classes)."""
    import torch

    from vlm_export.export.pipeline import ExportOptions, export_bundle
    from vlm_export.models.loading import TEST_MODEL
    from vlm_export.models.schedule import CondensationConfig

    torch.manual_seed(0)
    options = ExportOptions(
        method="tca",
        model=TEST_MODEL,
        domains=[("things", ["cat", "dog", "bird"])],
        out=folder / "ladder",
        templates="single",
        condensation=CondensationConfig(drop_rate=RATES[0]),
        max_classes=8,
        quiet=True,
        text_encoder=False,
        drop_rates=RATES,
    )
    return export_bundle(options)


def anchor_cases(bundle: Bundle) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image, anchors, valid): two images with anchors off, one with three classes valid."""
    inputs = bundle.engine_io("inputs")
    shape = [int(v) for v in inputs["anchors"]["shape"]]
    images = measure.synthetic_images([int(v) for v in inputs["image"]["shape"]], 3, seed=7)
    anchors = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    valid = (np.arange(shape[0]) < 3).astype(np.float32)
    off = (np.zeros(shape, np.float32), np.zeros(shape[0], np.float32))
    return [(images[0], *off), (images[1], *off), (images[2], anchors, valid)]
