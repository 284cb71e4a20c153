"""RAIL state files: the learner state (everything needed to keep learning or merge) and the smaller
inference state (what a predict-only device needs), one ``.npz`` each via runtime.state_file.

Learner, primal: W_r, G and B (cholesky route) or R (woodbury), W, learned mask, sample count,
seed, d_h, ridge. Learner, dual: stored features and labels, M, alpha, learned mask, gamma, ridge.
Inference, primal: W_r and W in float32, learned mask. Inference, dual: features, alpha (float64),
learned mask, gamma. Every file records the bundle fingerprint and is refused by another bundle,
except that a file recording its labels (``label_fields``) loads into the same image engine with
other classes, for prediction by label (``rail.models.load_predictor``).

Loading refuses states that cannot be right: NaN or inf anywhere, negative sample counts, labels
outside the label space, a G or R that is not symmetric positive (semi-)definite (negative
diagonal, a 2 x 2 minor below zero; up to FULL_CHECK_DIM also a failed Cholesky factor).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.errors import StateError
from vlm_export.core.labels import Label, saved_labels
from vlm_export.core.state_file import StoredArray, load_state, read_meta, save_state, shape_text
from vlm_export.runtime.rail.dual import DualAdapter, DualPredictor
from vlm_export.runtime.rail.inputs import RailError
from vlm_export.runtime.rail.linalg import (
    all_finite,
    check_factorable,
    cholesky,
    symmetric_problem,
)
from vlm_export.runtime.rail.primal import ROUTES, PrimalAdapter, PrimalPredictor
from vlm_export.runtime.rail.relabel import Learner, Predictor, follow_learner_labels

LEARNER_KIND = "rail-learner"
INFERENCE_KIND = "rail-inference"
SCHEMA_VERSION = 1
FULL_CHECK_DIM = 4096  # up to this width a loaded G or R is also Cholesky-factored (< 1 s)
MERGE_BLOCK_ROWS = 256  # rows of a streamed d x d matrix read at a time
COLUMN_ARRAYS = ("weights", "cross")  # W and B: read sparsely, their zero columns left untouched
#: every array a RAIL state may hold (learner and inference, primal and dual); others are refused
STATE_ARRAYS = frozenset(
    ("weights", "learned_mask", "projection", "gram", "cross", "inverse", "features", "labels",
     "coef")
)  # fmt: skip


def to_inference(learner: Learner) -> Predictor:
    """The predict-only form of a learner (solves a primal learner first if needed)."""
    return learner.to_inference()


def save_learner_state(
    path: str | Path,
    learner: Learner,
    bundle_fingerprint: str,
    label_fields: dict[str, Any] | None = None,
) -> None:
    """Write a learner state atomically (the previous file stays intact if anything fails).

    ``label_fields`` (``core.labels.labels_meta``: engine fingerprint and labels) go into the
    header, so that a predictor made from the state follows its labels when the classes change.
    """
    mask = learner.learned_mask
    if isinstance(learner, PrimalAdapter):
        arrays = {"weights": learner.weights, "learned_mask": mask}
        if learner.projection is not None:
            arrays["projection"] = learner.projection
        if learner.route == "cholesky":
            arrays.update(gram=learner.gram, cross=learner.cross)
        else:
            arrays["inverse"] = learner.inverse
        meta = {
            "form": "primal",
            "route": learner.route,
            "in_dim": learner.in_dim,
            "hidden_dim": learner.hidden_dim,
            "num_classes": learner.num_classes,
            "ridge": learner.ridge,
            "seed": learner.seed,
            "num_samples": learner.num_samples,
            "solved": learner.solved,
        }
    else:
        arrays = {
            "features": learner.features,
            "labels": learner.labels,
            "inverse": learner.inverse,
            "coef": learner.coef,
            "learned_mask": mask,
        }
        meta = _dual_meta(learner)
    meta.update(label_fields or {})
    save_state(path, LEARNER_KIND, SCHEMA_VERSION, bundle_fingerprint, arrays, meta)


def save_inference_state(
    path: str | Path,
    model: Learner | Predictor,
    bundle_fingerprint: str,
    label_fields: dict[str, Any] | None = None,
) -> None:
    """Write an inference state atomically; a learner is converted with ``to_inference`` first.
    ``label_fields`` as for ``save_learner_state``."""
    if isinstance(model, (PrimalAdapter, DualAdapter)):
        model = to_inference(model)
    arrays: dict[str, np.ndarray] = {"learned_mask": model.learned_mask}
    if isinstance(model, PrimalPredictor):
        arrays["weights"] = model.weights
        if model.projection is not None:
            arrays["projection"] = model.projection
        meta = {
            "form": "primal",
            "in_dim": model.in_dim,
            "hidden_dim": 0 if model.projection is None else model.projection.shape[1],
            "num_classes": model.num_classes,
        }
    else:
        arrays.update(features=model.features, coef=model.coef)
        meta = _dual_meta(model)
    meta.update(label_fields or {})
    save_state(path, INFERENCE_KIND, SCHEMA_VERSION, bundle_fingerprint, arrays, meta)


def _dual_meta(model: DualAdapter | DualPredictor) -> dict[str, Any]:
    meta = {"form": "dual", "in_dim": model.in_dim, "num_classes": model.num_classes}
    meta["gamma"] = model.gamma
    if isinstance(model, DualAdapter):
        meta["ridge"] = model.ridge
    return meta


class _Reader:
    """Typed access to a loaded state's arrays and header; anything missing is a StateError."""

    def __init__(self, path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]):
        self.path, self.arrays, self.meta = path, arrays, meta

    def field(self, name: str, kind: type) -> Any:
        value = self.meta.get(name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise StateError(f"{self.path} has a corrupt header (field {name!r})")
        return value

    def array(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        value = self.arrays.get(name)
        if value is None or value.shape != shape or value.dtype != np.dtype(dtype):
            found = "missing" if value is None else f"{value.dtype} {shape_text(value.shape)}"
            raise StateError(
                f"{self.path}: array {name!r} should be {np.dtype(dtype)} {shape_text(shape)}, "
                f"found {found} (corrupt state)"
            )
        return value

    def finite(self, name: str, what: str) -> None:
        value = self.arrays.get(name)  # a StoredArray is checked as it is read, if it is read
        if isinstance(value, np.ndarray) and not all_finite(value):
            raise StateError(f"{self.path}: {what} holds NaN or inf entries (corrupt state)")


def load_learner_state(
    path: str | Path, bundle_fingerprint: str | None, engine_fingerprint: str | None = None
) -> Learner:
    """Read a learner state; StateError if corrupt, of another schema or from another bundle.

    ``bundle_fingerprint=None`` skips the bundle check (inspection only). ``engine_fingerprint``
    also accepts a state of the same engine that records its labels (for prediction only: the
    caller maps its classes by label).
    """
    reader = _Reader(
        path,
        *load_state(
            path,
            LEARNER_KIND,
            SCHEMA_VERSION,
            bundle_fingerprint,
            engine_fingerprint=engine_fingerprint,
            defer=COLUMN_ARRAYS,
            allowed=STATE_ARRAYS,
        ),
    )
    form = reader.field("form", str)
    in_dim, classes = reader.field("in_dim", int), reader.field("num_classes", int)
    mask = reader.array("learned_mask", (classes,), bool)
    try:
        if form == "primal":
            learner = _load_primal_learner(reader, in_dim, classes)
        elif form == "dual":
            count = _sample_count(reader)  # in_dim checked against the features before any use
            features = reader.array("features", (count, in_dim), np.float64)
            learner = DualAdapter(
                in_dim, classes, reader.field("gamma", float), reader.field("ridge", float)
            )
            learner.features = features
            learner.labels = reader.array("labels", (count,), np.int64)
            learner.inverse = reader.array("inverse", (count, count), np.float64)
            learner.coef = reader.array("coef", (count, classes), np.float64)
            _check_dual(reader, learner.labels, classes)
            _check_symmetric(reader, learner.inverse, "M = (K + lambda I)^-1", positive=True)
        else:
            raise StateError(f"{path} holds an unknown RAIL form {form!r}")
    except RailError as exc:
        raise StateError(f"{path} has invalid hyperparameters ({exc})") from None
    learner.learned_mask = mask.copy()
    return learner


def _sample_count(reader: _Reader) -> int:
    """Rows of the stored dual features (0 when missing or not an array of rows: the shape
    check that follows names what is wrong)."""
    features = reader.arrays.get("features")
    return int(features.shape[0]) if features is not None and features.shape else 0


def primal_sizes(path: str | Path) -> tuple[int, int, int] | None:
    """(in_dim, num_classes, hidden_dim) of a primal learner state, checked against the shapes
    its arrays declare (none is read), for a memory estimate before loading; None for a dual
    state. StateError for a file that is no learner state or whose sizes disagree."""
    reader = _Reader(
        path,
        *load_state(
            path, LEARNER_KIND, SCHEMA_VERSION, None, defer=STATE_ARRAYS, allowed=STATE_ARRAYS
        ),
    )
    if reader.field("form", str) != "primal":
        return None
    in_dim, classes = reader.field("in_dim", int), reader.field("num_classes", int)
    hidden = reader.field("hidden_dim", int)
    reader.array("learned_mask", (classes,), bool)
    if hidden:
        reader.array("projection", (in_dim, hidden), np.float64)
    reader.array("weights", (hidden or in_dim, classes), np.float64)
    return in_dim, classes, hidden


def _load_primal_learner(
    reader: _Reader, in_dim: int, classes: int, matrix: bool = True
) -> PrimalAdapter:
    """The primal learner of a state; ``matrix=False`` leaves G or R out (a StoredArray)."""
    hidden = reader.field("hidden_dim", int)
    route = reader.field("route", str)
    if route not in ROUTES:
        raise StateError(f"{reader.path} has an unknown primal route {route!r}")
    projection = reader.array("projection", (in_dim, hidden), np.float64) if hidden else None
    dim = hidden or in_dim  # the header's sizes agree with W before anything of them is allocated
    reader.array("weights", (dim, classes), np.float64)
    learner = PrimalAdapter(
        in_dim,
        classes,
        hidden,
        reader.field("ridge", float),
        reader.field("seed", int),
        route,
        projection=projection,
        matrix=False,
    )
    if matrix:
        learner.weights = _column_array(reader, "weights", (dim, classes), "the weights W")
    learner.num_samples = reader.field("num_samples", int)
    learner.solved = reader.field("solved", bool)
    if learner.num_samples < 0:
        raise StateError(
            f"{reader.path} records {learner.num_samples} samples: a sample count cannot be "
            "negative (corrupt state)"
        )
    reader.finite("projection", "the random layer W_r")
    if route == "cholesky":
        learner.cross = _column_array(reader, "cross", (dim, classes), "the statistics B")
    name = "gram" if route == "cholesky" else "inverse"
    if matrix:
        value = reader.array(name, (dim, dim), np.float64)
        if route == "cholesky":
            _check_symmetric(reader, value, "the Gram matrix G", shift=learner.ridge)
        else:
            _check_symmetric(reader, value, "R = (G + lambda I)^-1", positive=True)
            if (value.diagonal() > (1 + 1e-9) / learner.ridge).any():
                raise StateError(
                    f"{reader.path}: R = (G + lambda I)^-1 has a diagonal entry above 1 / lambda "
                    "(corrupt state)"
                )
        setattr(learner, name, value)
    return learner


def _column_array(reader: _Reader, name: str, shape: tuple[int, int], what: str) -> np.ndarray:
    """W or B of a primal state, Fortran-ordered, read so that the columns of classes never
    learned stay untouched zero pages; StateError if not finite."""
    stored = reader.array(name, shape, np.float64)
    array = stored.read_sparse() if stored.fortran_order else _fortran_columns(stored)
    if not all_finite(array):
        raise StateError(f"{reader.path}: {what} holds NaN or inf entries (corrupt state)")
    return array


def _fortran_columns(stored: StoredArray) -> np.ndarray:
    """A C-ordered stored matrix (earlier versions saved W and B so) into Fortran order, block of
    rows by block of rows, writing only the columns of each block that hold a nonzero bit."""
    array = np.zeros(stored.shape, stored.dtype, order="F")
    for start, block in stored.blocks(MERGE_BLOCK_ROWS):
        keep = np.flatnonzero(block.view(np.uint64).any(axis=0))
        array[start : start + len(block), keep] = block[:, keep]
    return array


def _check_symmetric(
    reader: _Reader, value: np.ndarray, what: str, shift: float = 0.0, positive: bool = False
) -> None:
    """Refuse a matrix that cannot be symmetric positive semi-definite (definite: ``positive``)."""
    problem = symmetric_problem(value, what)
    if problem is None and positive and len(value) and (value.diagonal() <= 0).any():
        problem = f"{what} has a diagonal entry <= 0: it is not positive definite"
    if problem is None and 0 < len(value) <= FULL_CHECK_DIM:
        try:
            if positive:
                cholesky(value, what)
            else:
                check_factorable(value, shift, what)
        except RailError:
            problem = f"{what} is not positive {'definite' if positive else 'semi-definite'}"
    if problem is not None:
        raise StateError(f"{reader.path}: {problem} (corrupt state)")


def _check_dual(reader: _Reader, labels: np.ndarray, classes: int) -> None:
    for name, what in (("features", "the stored features"), ("coef", "alpha")):
        reader.finite(name, what)
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise StateError(f"{reader.path} has labels outside [0, {classes}) (corrupt state)")


def load_inference_state(
    path: str | Path, bundle_fingerprint: str | None, engine_fingerprint: str | None = None
) -> Predictor:
    """Read an inference state; StateError if corrupt, of another schema or from another bundle
    (``engine_fingerprint``: or the same engine, when the state records its labels)."""
    reader = _Reader(
        path,
        *load_state(
            path,
            INFERENCE_KIND,
            SCHEMA_VERSION,
            bundle_fingerprint,
            engine_fingerprint=engine_fingerprint,
            allowed=STATE_ARRAYS,
        ),
    )
    form = reader.field("form", str)
    in_dim, classes = reader.field("in_dim", int), reader.field("num_classes", int)
    mask = reader.array("learned_mask", (classes,), bool)
    if form == "primal":
        hidden = reader.field("hidden_dim", int)
        projection = reader.array("projection", (in_dim, hidden), np.float32) if hidden else None
        weights = reader.array("weights", (hidden or in_dim, classes), np.float32)
        reader.finite("projection", "the random layer W_r")
        reader.finite("weights", "the weights W")
        return PrimalPredictor(projection, weights, mask)
    if form == "dual":
        count = _sample_count(reader)
        features = reader.array("features", (count, in_dim), np.float64)
        coef = reader.array("coef", (count, classes), np.float64)
        for name, what in (("features", "the stored features"), ("coef", "alpha")):
            reader.finite(name, what)
        return DualPredictor(features, coef, reader.field("gamma", float), mask)
    raise StateError(f"{path} holds an unknown RAIL form {form!r}")


def merge_learner_states(states: Iterable[Learner]) -> Learner:
    """The exact joint learner of several devices' learners (the inputs are not changed).

    Primal (cholesky route): G, B, sample counts and learned masks add, then W is solved. Dual:
    the other devices' samples join the first's by block updates. All must share the form and
    hyperparameters (seed, d_h, ridge, gamma, label space); load each state with the bundle's
    fingerprint so that all come from the same bundle. ``states`` is consumed once, in order: a
    generator that loads one file at a time keeps one input in memory besides the result.
    """
    iterator = iter(states)
    first = next(iterator, None)
    if first is None:
        raise StateError("no learner states to merge")
    if isinstance(first, PrimalAdapter):
        merged = _merge_primal(first, iterator)
    else:
        merged = DualAdapter(first.in_dim, first.num_classes, first.gamma, first.ridge)
        merged.features, merged.labels = first.features.copy(), first.labels.copy()
        merged.inverse, merged.coef = first.inverse.copy(), first.coef.copy()
        merged.learned_mask = first.learned_mask.copy()
        for index, state in enumerate(iterator, start=1):
            if not isinstance(state, DualAdapter):
                raise StateError("cannot merge primal and dual learner states")
            _require_same(first, state, index, ("in_dim", "num_classes", "gamma", "ridge"))
            merged.partial_fit(state.features, state.labels)
    return merged


def _merge_primal(first: PrimalAdapter, others: Iterator[Learner]) -> PrimalAdapter:
    merged = PrimalAdapter(
        first.in_dim,
        first.num_classes,
        first.hidden_dim,
        first.ridge,
        first.seed,
        projection=first.projection,
    )
    for index, state in enumerate(itertools.chain([first], others)):
        _check_mergeable(state, index)
        _add_statistics(merged, first, state, index, state.gram)
    merged.solved = False
    merged.finalize()
    return merged


def _check_mergeable(state: Learner, index: int) -> None:
    if not isinstance(state, PrimalAdapter):
        raise StateError("cannot merge primal and dual learner states")
    if state.route != "cholesky":
        raise StateError(
            f"learner state {index} uses the woodbury route (R only); merging needs the "
            "cholesky route's statistics G and B"
        )


def _add_statistics(
    merged: PrimalAdapter,
    first: PrimalAdapter,
    state: PrimalAdapter,
    index: int,
    gram: np.ndarray | StoredArray,
) -> None:
    """merged += state's G (an array, or one streamed from its file), B, counts and mask."""
    keys = ("route", "in_dim", "hidden_dim", "num_classes", "ridge", "seed")
    _require_same(first, state, index, keys)
    if state.projection is not None and not np.array_equal(state.projection, first.projection):
        raise StateError(f"learner state {index} has another random layer W_r than state 0")
    blocks = _finite_blocks(gram) if isinstance(gram, StoredArray) else [(0, gram)]
    merged.add_statistics(blocks, state.cross, state.learned_mask, state.num_samples)


def _finite_blocks(gram: StoredArray) -> Iterator[tuple[int, np.ndarray]]:
    for start, block in gram.blocks(MERGE_BLOCK_ROWS):
        if not all_finite(block):
            raise StateError(f"{gram.path}: the Gram matrix G holds NaN or inf entries")
        yield start, block


def _following(
    learner: Learner, path: str | Path, meta: dict[str, Any], labels: Sequence[Label] | None
) -> Learner:
    """``learner`` over ``labels`` by class name when its state recorded other labels."""
    saved = saved_labels(meta, path) if labels is not None else None
    if saved is None or saved == list(labels):
        return learner
    return follow_learner_labels(learner, saved, list(labels), str(path))


def merge_learner_files(
    paths: Sequence[str | Path],
    bundle_fingerprint: str,
    engine_fingerprint: str | None = None,
    labels: Sequence[Label] | None = None,
) -> Learner:
    """The joint learner of several learner state files, holding one d x d matrix at a time.

    Primal: the first state becomes the result; every other state's G is added block by block
    straight from its file, never loaded whole (its W, not needed, is not loaded at all).
    Dual: ``merge_learner_states`` over the files. With ``engine_fingerprint`` and ``labels``
    (a bundle's), states of the same image engine made with other classes are taken too, each
    following the bundle's classes by name first.
    """

    def load(path: str | Path) -> Learner:
        learner = load_learner_state(path, bundle_fingerprint, engine_fingerprint)
        return _following(learner, path, read_meta(path), labels)

    first = load(paths[0])
    if not isinstance(first, PrimalAdapter):
        return merge_learner_states(itertools.chain([first], map(load, paths[1:])))
    _check_mergeable(first, 0)
    reference = PrimalAdapter(  # the hyperparameters of state 0, without its matrix
        first.in_dim,
        first.num_classes,
        first.hidden_dim,
        first.ridge,
        first.seed,
        projection=first.projection,
        matrix=False,
    )
    for index, path in enumerate(paths[1:], start=1):
        reader = _Reader(
            path,
            *load_state(
                path,
                LEARNER_KIND,
                SCHEMA_VERSION,
                bundle_fingerprint,
                engine_fingerprint=engine_fingerprint,
                defer=("gram", *COLUMN_ARRAYS),
                allowed=STATE_ARRAYS,
            ),
        )
        if reader.field("form", str) != "primal":
            raise StateError("cannot merge primal and dual learner states")
        in_dim, classes = reader.field("in_dim", int), reader.field("num_classes", int)
        state = _load_primal_learner(reader, in_dim, classes, matrix=False)
        state.learned_mask = reader.array("learned_mask", (classes,), bool)
        state = _following(state, path, reader.meta, labels)
        _check_mergeable(state, index)
        _require_same(reference, state, index, ("in_dim", "hidden_dim", "num_classes"))
        dim = state.feature_dim
        _add_statistics(
            first, reference, state, index, reader.array("gram", (dim, dim), np.float64)
        )
    problem = symmetric_problem(first.gram, "the merged Gram matrix G")
    if problem is not None:
        raise StateError(f"{problem}: a state file is corrupt")
    first.solved = False
    first.finalize()
    return first


def _require_same(first: Learner, other: Learner, index: int, keys: Sequence[str]) -> None:
    for key in keys:
        if getattr(first, key) != getattr(other, key):
            raise StateError(
                f"learner state {index} has {key} = {getattr(other, key)}, state 0 has "
                f"{getattr(first, key)}: only states of the same setup merge"
            )
