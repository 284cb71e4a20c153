"""RAIL learners and predictors as the device commands make and load them.

A new learner takes its hyperparameters from the bundle's manifest (``adaptation.rail``: primal
hidden_dim, ridge, seed; dual gamma, ridge), then from the command line (primal hidden_dim, seed,
route); spec/rail.md's defaults fill in what a manifest does not record. A loaded learner keeps
what it was made with, and an option that contradicts it is refused. Any RAIL state file, learner
or inference, loads as a predictor for the fusion stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_export.core.errors import StateError, UserError
from vlm_export.core.labels import Label, saved_labels
from vlm_export.core.state_file import read_meta
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.rail import dual, footprint, primal
from vlm_export.runtime.rail.fusion import BETA, RailFusion
from vlm_export.runtime.rail.relabel import follow_labels
from vlm_export.runtime.rail.state import (
    LEARNER_KIND,
    Learner,
    Predictor,
    load_inference_state,
    load_learner_state,
    to_inference,
)

FORMS = ("primal", "dual")
PRIMAL_OPTIONS = ("hidden_dim", "seed", "route")


@dataclass(frozen=True)
class LearnerOptions:
    """What the command line asks of a learner; None leaves the default (or the loaded value)."""

    form: str | None = None
    hidden_dim: int | None = None
    seed: int | None = None
    route: str | None = None

    def primal_flags(self) -> list[str]:
        """The primal-only options that were given, as command-line flags."""
        return [
            f"--{key.replace('_', '-')}" for key in PRIMAL_OPTIONS if getattr(self, key) is not None
        ]


def rail_section(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``adaptation.rail`` section (empty if the bundle records none)."""
    return (manifest.get("adaptation") or {}).get("rail") or {}


def fusion_beta(manifest: dict[str, Any]) -> float:
    """RAIL-Fusion's beta: the manifest's ``fusion_beta``, else the spec's 0.8."""
    return float(rail_section(manifest).get("fusion_beta", BETA))


def form_of(learner: Learner) -> str:
    """``primal`` or ``dual``."""
    return "primal" if isinstance(learner, primal.PrimalAdapter) else "dual"


def check_options(options: LearnerOptions, form: str) -> None:
    """Refuse primal-only options for the dual form."""
    flags = options.primal_flags()
    if form == "dual" and flags:
        raise UserError(f"{', '.join(flags)}: primal form only (this learner is dual)")


def new_learner(bundle: Bundle, form: str, options: LearnerOptions) -> Learner:
    """An empty learner over the bundle's whole label space, on its embedding width.

    A primal learner that would not fit in the memory available is refused before allocation.
    """
    check_options(options, form)
    in_dim, classes = bundle.text_embeddings.shape[1], bundle.num_classes
    section = rail_section(bundle.manifest)
    if form == "primal":
        defaults = section.get("primal") or {}
        hidden_dim = _choose(options.hidden_dim, defaults.get("hidden_dim", primal.HIDDEN_DIM))
        if hidden_dim < 0:
            raise UserError(f"--hidden-dim must be 0 or more, got {hidden_dim}")
        footprint.check_primal("the primal learner", in_dim, classes, hidden_dim)
        return primal.PrimalAdapter(
            in_dim,
            classes,
            hidden_dim,
            float(defaults.get("ridge", primal.RIDGE)),
            _choose(options.seed, defaults.get("seed", 0)),
            options.route or "cholesky",
        )
    if form == "dual":
        defaults = section.get("dual") or {}
        return dual.DualAdapter(
            in_dim,
            classes,
            float(defaults.get("gamma", dual.GAMMA)),
            float(defaults.get("ridge", dual.RIDGE)),
        )
    raise UserError(f"unknown RAIL form {form!r}; choose one of {', '.join(FORMS)}")


def _choose(given: int | None, default: Any) -> int:
    return int(default) if given is None else given


def check_loaded(learner: Learner, options: LearnerOptions, path: str | Path) -> None:
    """Refuse options that contradict a loaded learner (it was learned under its own settings)."""
    form = form_of(learner)
    check_options(options, form)
    clashes = [f"form {form}"] if options.form not in (None, form) else []
    if form == "primal":
        clashes += [
            f"{key.replace('_', '-')} {getattr(learner, key)}"
            for key in PRIMAL_OPTIONS
            if getattr(options, key) not in (None, getattr(learner, key))
        ]
    if clashes:
        raise UserError(
            f"{path} was learned with {', '.join(clashes)}; drop the options that differ or "
            "start a new state file"
        )


def describe(learner: Learner | Predictor) -> str:
    """One line: form, size and how many classes are learned."""
    mask = learner.learned_mask
    learned = f"{int(mask.sum())}/{len(mask)} classes learned"
    if isinstance(learner, primal.PrimalAdapter):
        setup = f"d_h {learner.hidden_dim}, {learner.route}"
        return f"primal ({setup}), {learner.num_samples} samples, {learned}"
    if isinstance(learner, primal.PrimalPredictor):
        return f"primal predictor, {learned}"
    return f"dual (gamma {learner.gamma}), {len(learner.features)} samples, {learned}"


def state_header(path: str | Path) -> dict[str, Any] | None:
    """The JSON header of a state file, or None if it cannot be read (loading then says why)."""
    try:
        return read_meta(path)
    except StateError:
        return None


def load_predictor(
    path: str | Path,
    bundle_fingerprint: str,
    labels: list[Label] | None = None,
    engine_fingerprint: str | None = None,
) -> Predictor:
    """A predictor from a RAIL learner state (solved, made predict-only) or inference state.

    With the bundle's ``labels``, a state that records its own labels predicts for the bundle's
    classes by label (``follow_labels``); such a state may come from another bundle of the same
    image engine (``engine_fingerprint``), one whose classes changed.
    """
    header = state_header(path) or {}
    if header.get("kind") == LEARNER_KIND:
        predictor = to_inference(load_learner_state(path, bundle_fingerprint, engine_fingerprint))
    else:
        predictor = load_inference_state(path, bundle_fingerprint, engine_fingerprint)
    saved = saved_labels(header, path)
    if labels is None or saved is None or saved == list(labels):
        return predictor
    if len(saved) != predictor.num_classes:
        raise StateError(f"{path} records {len(saved)} labels for {predictor.num_classes} classes")
    return follow_labels(predictor, saved, labels, str(path))


def open_fusion(path: str | Path, bundle: Bundle) -> RailFusion:
    """The RAIL fusion stage of ``vlm-edge run --rail-state``: the state's predictor over the
    bundle's classes (by label), with the manifest's fusion beta."""
    predictor = load_predictor(path, bundle.fingerprint, bundle.labels, bundle.engine_fingerprint)
    return RailFusion(predictor, fusion_beta(bundle.manifest))
