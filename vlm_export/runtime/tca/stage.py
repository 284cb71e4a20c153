"""TCA on the host side of the pipeline: the reservoir for a bundle, and the per-frame stage.

The stage updates the reservoir with each frame, hands the anchors to the engine only when they
changed (the engine reads them on the next frame), and computes the logit correction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.atomic import check_can_create
from vlm_export.core.errors import UserError
from vlm_export.core.manifest import ANCHORS_INPUT, CLS_OUTPUT
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.base import EngineBackend
from vlm_export.runtime.tca.reservoir import TokenReservoir
from vlm_export.runtime.tca.reservoir_config import ReservoirConfig, require_reservoir_memory

RESERVOIR_KEYS = tuple(item.name for item in dataclasses.fields(ReservoirConfig))


def reservoir_config(
    manifest: dict[str, Any], overrides: Mapping[str, Any] | None = None
) -> ReservoirConfig:
    """Reservoir hyperparameters: manifest ``adaptation.tca`` defaults, then ``overrides``.

    Other keys of the manifest section (preset name, zero-shot factor) are not reservoir settings.
    """
    defaults = (manifest.get("adaptation") or {}).get("tca") or {}
    values = {key: defaults[key] for key in RESERVOIR_KEYS if key in defaults}
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    unknown = sorted(set(values) - set(RESERVOIR_KEYS))
    if unknown:
        raise UserError(f"unknown reservoir setting(s): {', '.join(unknown)}")
    return ReservoirConfig(**values)


def reservoir_geometry(bundle: Bundle) -> tuple[int, int, int, list[int]]:
    """(num_classes, num_layers, width, anchor_layers) of the bundle's condensing engine (its
    class capacity, the rows of the anchors, is ``bundle.class_capacity``)."""
    condensation = bundle.manifest["condensation"]
    if not condensation or ANCHORS_INPUT not in bundle.engine_io("inputs"):
        raise UserError(
            f"method tca needs a bundle exported with token condensation; this bundle's method "
            f"is {bundle.method}"
        )
    # shapes were checked against each other when the bundle was opened (runtime contract)
    _, num_layers, width = (int(v) for v in bundle.engine_io("outputs")[CLS_OUTPUT]["shape"])
    return bundle.num_classes, num_layers, width, [int(i) for i in condensation["anchor_layers"]]


def check_reservoir_fits(bundle: Bundle) -> None:
    """UserError when the reservoir of a condensing bundle's own settings cannot fit in memory
    (what ``run`` would refuse); nothing for a bundle that does not condense."""
    if not bundle.manifest.get("condensation") or ANCHORS_INPUT not in bundle.engine_io("inputs"):
        return
    num_classes, num_layers, width, anchor_layers = reservoir_geometry(bundle)
    capacity = reservoir_config(bundle.manifest).capacity
    require_reservoir_memory(num_classes, num_layers, width, len(anchor_layers), capacity)


def build_reservoir(
    bundle: Bundle,
    overrides: Mapping[str, Any] | None = None,
    state: str | Path | None = None,
    owner: str | None = None,
) -> TokenReservoir:
    """A reservoir for ``bundle``: loaded from ``state`` if that file exists, else empty.

    A loaded reservoir keeps the config it was saved with; an override that contradicts it is a
    UserError (the stored entries were selected under that config). A state saved for other
    classes of the same engine keeps its entries by label (see ``TokenReservoir.load``). The
    anchors have the engine's class capacity rows.
    """
    geometry = reservoir_geometry(bundle)
    if state is not None:
        check_can_create(state)  # saved during and after the run: refuse a bad path up front
    if state is not None and Path(state).exists():
        reservoir = TokenReservoir.load(
            state,
            bundle.fingerprint,
            *geometry,
            labels=bundle.labels,
            engine_fingerprint=bundle.engine_fingerprint,
            anchor_rows=bundle.class_capacity,
            owner=owner,
        )
        saved = dataclasses.asdict(reservoir.config)
        clashes = [
            f"{key}={saved[key]}"
            for key, value in (overrides or {}).items()
            if value is not None and saved[key] != value
        ]
        if clashes:
            raise UserError(
                f"state {state} was saved with {', '.join(clashes)}; drop those options or start "
                "a new state file"
            )
        return reservoir
    config = reservoir_config(bundle.manifest, overrides)
    return TokenReservoir(*geometry, config=config, anchor_rows=bundle.class_capacity)


def save_reservoir(
    reservoir: TokenReservoir, path: str | Path, bundle: Bundle, owner: str | None = None
) -> None:
    """Save ``reservoir`` (of ``bundle``'s classes) with its labels, so that it follows them;
    ``owner`` names whose state it is (a service's source)."""
    reservoir.save(path, bundle.fingerprint, bundle.labels, bundle.engine_fingerprint, owner)


class TcaStage:
    """TCA on the host: reservoir update, anchors to the engine when they move, correction."""

    def __init__(self, reservoir: TokenReservoir, backend: EngineBackend) -> None:
        self.reservoir = reservoir
        self.backend = backend
        self._pushed_version: int | None = None
        self.sync_anchors()

    def sync_anchors(self) -> None:
        """Hand the reservoir's anchors to the engine if they changed since the last push: the
        whole array the first time and after an activation, else only the classes that moved."""
        if self.reservoir.version == self._pushed_version:
            return
        rows = self.reservoir.take_anchor_changes()
        anchors, valid = self.reservoir.anchors()
        if self._pushed_version is None or rows is None:
            self.backend.set_anchors(anchors, valid)
        else:
            self.backend.update_anchor_rows(anchors, valid, rows)
        self._pushed_version = self.reservoir.version

    def rebind(self) -> None:
        """Hand the whole anchors to the engine again: another reservoir (another source of a
        service) used the engine since this stage last pushed them."""
        self.reservoir.take_anchor_changes()
        anchors, valid = self.reservoir.anchors()
        self.backend.set_anchors(anchors, valid)
        self._pushed_version = self.reservoir.version

    def update(self, logits: np.ndarray, cls_stack: np.ndarray) -> None:
        """Insert this frame into the reservoir, then push anchors if they moved."""
        self.reservoir.update(logits, cls_stack)
        self.sync_anchors()

    def correction(self, cls_stack: np.ndarray) -> np.ndarray:
        """Logit offsets z [C] for this frame."""
        return self.reservoir.correction(cls_stack)
