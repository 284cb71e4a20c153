"""The TCA reservoir's settings and the shape of its state: the hyperparameters and their checks,
the arrays a state holds and the memory they take, and the checks a saved state passes before it
is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm_export.core.errors import StateError, UserError
from vlm_export.core.labels import saved_labels
from vlm_export.core.memory import capacity_hint, require_memory

EVICTION_MODES = ("diversity", "entropy")
ANCHOR_RULES = ("all_classes", "per_class")


def is_int(value: object) -> bool:
    """An integer, numpy's too, and not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number, numpy's too, and not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


#: the largest lam and beta: the correction is computed in float32 (up to 3.4e38)
MAX_LAM_BETA = 1e6


@dataclass(frozen=True)
class ReservoirConfig:
    """Reservoir hyperparameters (spec 3.5: ImageNet M=3, tau=0.1, lambda=3, beta=5).

    ``eviction``: "diversity" (score = entropy + mean similarity, reference) or "entropy".
    ``anchor_rule``: "all_classes" (reference) or "per_class"; see ``TokenReservoir``.
    """

    capacity: int = 3
    tau: float = 0.1
    lam: float = 3.0
    beta: float = 5.0
    eviction: str = "diversity"
    anchor_rule: str = "all_classes"

    def __post_init__(self) -> None:
        if not is_int(self.capacity) or self.capacity < 1:
            raise UserError(f"reservoir capacity must be an integer >= 1, got {self.capacity!r}")
        if not is_real(self.tau) or not math.isfinite(self.tau) or self.tau <= 0:
            raise UserError(f"reservoir tau must be a finite number > 0, got {self.tau!r}")
        for name in ("lam", "beta"):
            value = getattr(self, name)
            if not is_real(value) or not math.isfinite(value) or not 0 <= value <= MAX_LAM_BETA:
                raise UserError(
                    f"reservoir {name} must be a finite number from 0 to {MAX_LAM_BETA:g} (the "
                    f"reference uses lam 3, beta 5; larger ones overflow float32), got {value!r}"
                )
        if self.eviction not in EVICTION_MODES:
            choices = " or ".join(EVICTION_MODES)
            raise UserError(f"unknown reservoir eviction {self.eviction!r}; choose {choices}")
        if self.anchor_rule not in ANCHOR_RULES:
            choices = " or ".join(ANCHOR_RULES)
            raise UserError(f"unknown anchor rule {self.anchor_rule!r}; choose {choices}")
        if self.anchor_rule == "all_classes" and self.capacity < 2:
            raise UserError(
                "anchor rule 'all_classes' needs capacity >= 2 (it waits for 2 entries per class)"
            )


#: the reference's settings (spec 3.5)
DEFAULT_CONFIG = ReservoirConfig()


def require_reservoir_memory(
    num_classes: int, num_layers: int, width: int, anchor_layers: int, capacity: int
) -> None:
    """UserError naming a ``--capacity`` that fits when the reservoir cannot fit in memory."""
    require_memory(
        "TCA reservoir",
        reservoir_bytes(num_classes, capacity, num_layers, width, anchor_layers),
        fits=lambda available: capacity_hint(
            "--capacity",
            lambda m: reservoir_bytes(num_classes, m, num_layers, width, anchor_layers),
            available,
            capacity,
        ),
    )


def state_shapes(
    num_classes: int, capacity: int, num_layers: int, width: int
) -> dict[str, tuple[int, ...]]:
    """The arrays of a reservoir state and their shapes."""
    return {
        "unit_stacks": (num_classes, capacity, num_layers, width),
        "norms": (num_classes, capacity, num_layers),
        "entropies": (num_classes, capacity),
        "counts": (num_classes,),
    }


def reservoir_bytes(
    num_classes: int, capacity: int, num_layers: int, width: int, reductions: int
) -> int:
    """Bytes a reservoir's buffers take (entries, norms, entropies, anchors, per-frame scratch)."""
    per_entry = num_layers * width * 4 + num_layers * 4 + 8 + 4 + 4  # units, norms, H, occupied, a
    per_class = reductions * width * 4 + 4 + 8  # anchors, valid, count
    return num_classes * (capacity * per_entry + per_class)


def saved_geometry(
    meta: dict, path: str | Path, num_classes: int, num_layers: int, width: int
) -> tuple[ReservoirConfig, dict[str, tuple[int, ...]]]:
    """A saved state's config, and the shapes its arrays must have: StateError where its header
    records another class count (``num_classes``, or as many as its labels), depth or width, or
    a config that is not one."""
    saved = saved_labels(meta, path)
    stored = num_classes if saved is None else len(saved)
    for name, value in (
        ("num_classes", stored),
        ("num_layers", num_layers),
        ("width", width),
    ):
        if meta.get(name) != value:
            raise StateError(f"{path} holds a reservoir with {name}={meta.get(name)}, not {value}")
    settings = meta.get("config")
    if not isinstance(settings, dict):
        raise StateError(f"{path} has an unusable reservoir config (not a table of settings)")
    try:
        config = ReservoirConfig(**settings)
    except (TypeError, UserError) as exc:
        raise StateError(f"{path} has an unusable reservoir config ({exc})") from None
    return config, state_shapes(stored, config.capacity, num_layers, width)


def check_state_arrays(
    arrays: Mapping[str, np.ndarray], num_classes: int, slots: int, num_layers: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """(counts [C], occupied [C, slots]) of a state's arrays; StateError where an array is
    missing, of another shape or dtype, not finite, or a count or a norm is out of range."""
    expected = state_shapes(num_classes, slots, num_layers, width)
    for name, shape in expected.items():
        if name not in arrays:
            raise StateError(f"reservoir state has no array {name!r}")
        if np.shape(arrays[name]) != shape:
            raise StateError(
                f"reservoir state array {name!r} is {np.shape(arrays[name])}, expected {shape}"
            )
    counts = np.asarray(arrays["counts"])
    if counts.dtype.kind not in "iu" or counts.min() < 0 or counts.max() > slots:
        raise StateError(f"reservoir state counts must be integers in 0..{slots}")
    occupied = np.arange(slots) < counts[:, None]
    for name in expected:
        values = np.asarray(arrays[name])
        if values.dtype.kind not in "iuf":
            raise StateError(f"reservoir state array {name!r} has dtype {values.dtype}")
        if not np.isfinite(values).all():
            what = "NaN" if np.isnan(values).any() else "infinite"
            raise StateError(
                f"reservoir state array {name!r} holds {what} values: the state is corrupt"
            )
    if (np.asarray(arrays["norms"])[occupied] <= 0).any():
        raise StateError("reservoir state holds non-positive norms")
    return counts, occupied
