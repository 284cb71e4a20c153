"""Reference hyperparameters recorded in a bundle's manifest (spec/tca.md 3.5, spec/rail.md), and
the bounds of an engine's sizes (class capacity, batch)."""

from __future__ import annotations

from typing import Any

from vlm_export.core.errors import UserError
from vlm_export.runtime.text.class_lists import MAX_CLASSES

# dataset: (capacity M, tau, lambda, beta), as the TCA authors' released configs.
TCA_PRESETS: dict[str, tuple[int, float, float, float]] = {
    "imagenet": (3, 0.1, 3.0, 5.0),
    "imagenet_a": (3, 0.01, 3.0, 5.0),
    "imagenet_v2": (3, 0.1, 4.0, 9.0),
    "imagenet_r": (3, 0.1, 3.0, 8.0),
    "imagenet_sketch": (3, 0.1, 4.0, 8.0),
    "caltech101": (3, 1.0, 7.0, 6.0),
    "dtd": (3, 1.0, 2.0, 6.0),
    "eurosat": (2, 5.0, 8.0, 7.0),
    "fgvc_aircraft": (3, 0.02, 2.0, 2.0),
    "food101": (3, 0.01, 2.0, 5.0),
    "oxford_flowers": (3, 0.01, 7.0, 7.0),
    "oxford_pets": (3, 5.5, 2.0, 6.0),
    "stanford_cars": (3, 0.1, 1.5, 8.0),
    "sun397": (3, 0.01, 4.0, 3.0),
    "ucf101": (3, 0.01, 6.0, 8.0),
}

RAIL_DEFAULTS: dict[str, Any] = {
    "fusion_beta": 0.8,
    "primal": {"hidden_dim": 15000, "ridge": 0.1, "seed": 0},
    "dual": {"gamma": 0.1, "ridge": 1e-3},
}


class PresetError(UserError):
    """An unknown preset name."""


def tca_settings(
    preset: str = "imagenet", eviction: str = "diversity", anchor_rule: str = "all_classes"
) -> dict[str, Any]:
    """The manifest's adaptation.tca section for a dataset preset."""
    if preset not in TCA_PRESETS:
        raise PresetError(f"unknown TCA preset {preset!r}; choose from {', '.join(TCA_PRESETS)}")
    capacity, tau, lam, beta = TCA_PRESETS[preset]
    return {
        "preset": preset,
        "capacity": capacity,
        "tau": tau,
        "lam": lam,
        "beta": beta,
        "eviction": eviction,
        "anchor_rule": anchor_rule,
    }


#: the largest engine batch: a batch-N engine is for the user's own batched integration
MAX_BATCH_SIZE = 256


def check_sizes(max_classes: int | None, batch_size: int) -> None:
    """--max-classes (1 to the most a class list holds) and --batch-size (1 to MAX_BATCH_SIZE):
    UserError otherwise, before anything is built."""
    if max_classes is not None and not 1 <= max_classes <= MAX_CLASSES:
        raise UserError(f"--max-classes must be 1 to {MAX_CLASSES:,}, got {max_classes:,}")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise UserError(f"--batch-size must be 1 to {MAX_BATCH_SIZE}, got {batch_size:,}")
