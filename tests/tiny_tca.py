"""A condensing vlm-test-tiny bundle from the real exporter (seeded random weights), as the
precision and quantize tests build it."""

from __future__ import annotations

from pathlib import Path


def export_tiny_tca(out: Path, classes: list[str]) -> Path:
    """vlm-test-tiny exported with TCA (r = 0.035, K = 2) into ``out``; the same weights, hence
    the same gate numbers, every run."""
    import torch

    from vlm_export.export.pipeline import ExportOptions, export_bundle
    from vlm_export.models.schedule import CondensationConfig

    options = ExportOptions(
        method="tca",
        model="vlm-test-tiny",
        pretrained="none",
        domains=[("things", classes)],
        templates="single",
        condensation=CondensationConfig(drop_rate=0.035, merge_centers=2),
        out=out,
        quiet=True,
    )
    torch.manual_seed(0)
    return export_bundle(options)
