"""The online RAIL learner of taught examples, kept in sample space (push-through identity).

The primal RAIL solution W = (Phi^T Phi + lambda I)^-1 Phi^T Y equals W = Phi^T A with
A = (K + lambda I)^-1 Y and K = Phi Phi^T (N x N). A site teaches tens to thousands of examples,
so the learner keeps Phi and K: adding an example appends a row and column of K (O(N d)),
deleting one removes them (the state is then literally the state learned without it), and each
batch of changes ends with one Cholesky solve in float64 (O(N^3 / 3)).

The state is a pure function of the SET of examples: they are held sorted by id and the label
columns are ``sorted(set(labels))``, so any order or batching of the same adds and deletes gives
the same W, and so does a fresh learner on the same examples (``fit``).

Exact leave-one-out: with M = (K + lambda I)^-1, the fitted outputs are K A = Y - lambda A and
the hat matrix is I - lambda M, so h_ii = 1 - lambda M_ii and
loo_i = (fitted_i - h_ii y_i) / (1 - h_ii) = y_i - A_i / M_ii.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.linalg import LinAlgError, cho_factor, cho_solve

from vlm_export.core.errors import StateError
from vlm_export.core.state_file import load_state, save_state
from vlm_export.runtime.rail.footprint import PROCESS_BYTES
from vlm_export.runtime.rail.inputs import RailError, as_features
from vlm_export.runtime.rail.primal import RIDGE, hidden_features, random_projection
from vlm_export.runtime.teach.examples import Example
from vlm_export.runtime.teach.store import ids_digest

#: d_h of a teach learner unless chosen: about 1.3 GB at 5000 examples, for an 8 GB device
DEFAULT_HIDDEN_DIM = 4096
KIND = "teach-learner"
SCHEMA_VERSION = 1
STATE_ARRAYS = ("embeddings", "ids", "label_index", "labels", "weights")
WEIGHTS_TOLERANCE = 1e-6  # a loaded file's W against the W recomputed from its examples


@dataclass(frozen=True)
class TeachPredictor:
    """Predict-only snapshot for the frame path: W_r (None without a random layer) and W in
    float32, and the label of each column."""

    projection: np.ndarray | None
    weights: np.ndarray
    labels: tuple[str, ...]

    @property
    def in_dim(self) -> int:
        """Width of the image embeddings it takes."""
        return self.weights.shape[0] if self.projection is None else self.projection.shape[0]

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Regression outputs [B, len(labels)] float32 for embeddings [B, E]."""
        x = as_features(features, self.in_dim).astype(np.float32)
        return hidden_features(x, self.projection) @ self.weights


class TeachLearner:
    """Exact ridge regression on phi(x) over a set of examples, updated by batches of adds and
    deletes. Attributes: ``ids`` (sorted), ``labels`` (sorted label columns), ``weights`` W
    float64 [d, len(labels)], ``num_samples``."""

    def __init__(self, in_dim: int, hidden_dim: int, seed: int = 0, ridge: float = RIDGE) -> None:
        if in_dim < 1 or hidden_dim < 0 or seed < 0:
            raise RailError(
                f"need in_dim >= 1, hidden_dim >= 0, seed >= 0; got {in_dim}, {hidden_dim}, {seed}"
            )
        if not ridge > 0:
            raise RailError(f"ridge must be positive, got {ridge}")
        self.in_dim, self.hidden_dim = int(in_dim), int(hidden_dim)
        self.seed, self.ridge = int(seed), float(ridge)
        self.projection = random_projection(in_dim, hidden_dim, seed) if hidden_dim else None
        self._projection32: np.ndarray | None = None  # the predictors' copy, made once
        self.ids: list[str] = []
        self.example_labels: list[str] = []  # the label of each example, in ``ids`` order
        self.labels: list[str] = []
        self._embeddings = np.zeros((0, in_dim), np.float32)
        self._phi = np.zeros((0, self.feature_dim))
        self._kernel = np.zeros((0, 0))
        self._factor: tuple[np.ndarray, bool] | None = None
        self._coef = np.zeros((0, 0))
        self.weights = np.zeros((self.feature_dim, 0))

    @property
    def feature_dim(self) -> int:
        """Width d of phi(x): hidden_dim, or in_dim without a random layer."""
        return self.hidden_dim or self.in_dim

    @property
    def num_samples(self) -> int:
        """How many examples the state holds."""
        return len(self.ids)

    @property
    def digest(self) -> str:
        """sha256 over the sorted ids (as ``ExampleStore.digest``)."""
        return ids_digest(self.ids)

    @property
    def embeddings(self) -> np.ndarray:
        """The examples' embeddings [N, E] float32, in ``ids`` order (read-only view)."""
        view = self._embeddings.view()
        view.flags.writeable = False
        return view

    @classmethod
    def fit(
        cls,
        examples: Iterable[Example],
        in_dim: int,
        hidden_dim: int,
        seed: int = 0,
        ridge: float = RIDGE,
    ) -> TeachLearner:
        """A fresh learner on ``examples`` (one batch)."""
        learner = cls(in_dim, hidden_dim, seed, ridge)
        learner.apply(added=list(examples))
        return learner

    def apply(self, added: Sequence[Example] = (), removed: Sequence[str] = ()) -> None:
        """One batch of changes, then one solve. Ids in ``removed`` that are not held are
        ignored; examples in ``added`` whose id is held, was removed in this batch, or repeats
        in the batch are ignored (a delete wins over an add in the same batch). On RailError
        (bad embedding) nothing changes."""
        gone = set(removed)
        held = set(self.ids)
        fresh: dict[str, Example] = {}
        for example in added:
            if example.id not in held and example.id not in gone and example.id not in fresh:
                fresh[example.id] = example
        gone &= held
        if not fresh and not gone:
            return
        new = list(fresh.values())
        x_new = np.zeros((len(new), self.in_dim), np.float32)
        for row, example in enumerate(new):
            vector = np.asarray(example.embedding)
            if vector.shape != (self.in_dim,):
                raise RailError(
                    f"example {example.id}: an embedding must have shape [{self.in_dim}], got "
                    f"{list(vector.shape)}"
                )
            x_new[row] = vector
        x_new = as_features(x_new, self.in_dim)
        keep = np.array([i for i, name in enumerate(self.ids) if name not in gone], np.int64)
        phi_keep = self._phi[keep]
        phi_new = hidden_features(x_new, self.projection)
        ids = [self.ids[i] for i in keep] + [e.id for e in new]
        order = np.argsort(np.array(ids, dtype="U32"), kind="stable")
        where = np.empty(len(ids), np.int64)
        where[order] = np.arange(len(ids))  # sorted position of each (kept, then new) example
        old_at, new_at = where[: len(keep)], where[len(keep) :]
        kernel = np.empty((len(ids), len(ids)))
        kernel[np.ix_(old_at, old_at)] = self._kernel[np.ix_(keep, keep)]
        cross = phi_new @ phi_keep.T
        kernel[np.ix_(new_at, old_at)] = cross
        kernel[np.ix_(old_at, new_at)] = cross.T
        inner = phi_new @ phi_new.T
        kernel[np.ix_(new_at, new_at)] = (inner + inner.T) / 2
        phi = np.empty((len(ids), self.feature_dim))
        phi[old_at], phi[new_at] = phi_keep, phi_new
        embeddings = np.empty((len(ids), self.in_dim), np.float32)
        embeddings[old_at] = self._embeddings[keep]
        embeddings[new_at] = x_new.astype(np.float32)
        labels = [self.example_labels[i] for i in keep] + [e.label for e in new]
        self._solve([ids[i] for i in order], [labels[i] for i in order], embeddings, phi, kernel)

    def _solve(
        self,
        ids: list[str],
        example_labels: list[str],
        embeddings: np.ndarray,
        phi: np.ndarray,
        kernel: np.ndarray,
    ) -> None:
        """A = (K + lambda I)^-1 Y, W = Phi^T A; the state is replaced only when both are
        finite."""
        columns = sorted(set(example_labels))
        targets = one_hot(example_labels, columns)
        if ids:
            shifted = kernel.copy()
            shifted.flat[:: len(ids) + 1] += self.ridge
            try:
                factor = cho_factor(shifted, lower=True, overwrite_a=True, check_finite=True)
            except (LinAlgError, ValueError):
                raise RailError(
                    "K + lambda I is not positive definite (corrupt features)"
                ) from None
            coef = cho_solve(factor, targets)
        else:
            factor, coef = None, np.zeros((0, 0))
        weights = phi.T @ coef
        if not (np.isfinite(coef).all() and np.isfinite(weights).all()):
            raise RailError("the ridge solve gave non-finite weights")
        self.ids, self.example_labels, self.labels = ids, example_labels, columns
        self._embeddings, self._phi, self._kernel = embeddings, phi, kernel
        self._factor, self._coef, self.weights = factor, coef, weights

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Regression outputs [B, len(labels)] float64 for embeddings [B, E]."""
        x = as_features(features, self.in_dim)
        return hidden_features(x, self.projection) @ self.weights

    def loo_predictions(self) -> np.ndarray:
        """[N, len(labels)]: each example's outputs from the learner of all the others (exact)."""
        if not self.ids:
            return np.zeros((0, len(self.labels)))
        inverse_diagonal = np.diag(cho_solve(self._factor, np.eye(len(self.ids))))
        targets = one_hot(self.example_labels, self.labels)
        return targets - self._coef / inverse_diagonal[:, None]

    def predictor(self) -> TeachPredictor:
        """An immutable float32 snapshot for the frame path."""
        if self.projection is not None and self._projection32 is None:
            self._projection32 = self.projection.astype(np.float32)
        projection = self._projection32
        weights = self.weights.astype(np.float32)
        for array in (projection, weights):
            if array is not None:
                array.flags.writeable = False
        return TeachPredictor(projection, weights, tuple(self.labels))

    def primal_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """G = Phi^T Phi [d, d] and B = Phi^T Y [d, len(labels)] (the primal route's statistics:
        additive over devices, and W = (G + lambda I)^-1 B)."""
        targets = one_hot(self.example_labels, self.labels)
        return self._phi.T @ self._phi, self._phi.T @ targets

    def save(self, path: str | Path, bundle_fingerprint: str, digest: str | None = None) -> None:
        """Write the state atomically: the examples' embeddings, ids and labels, and W; the
        header records the ids' digest and the sample count. ``bundle_fingerprint``: the image
        engine's (``Bundle.engine_fingerprint``), as the store records it. ``digest``, when
        given (the store's), must be this learner's own."""
        if digest is not None and digest != self.digest:
            raise ValueError("the digest given is not the digest of this learner's examples")
        arrays = {
            "embeddings": self._embeddings,
            "ids": np.array(self.ids, dtype="U32").reshape(len(self.ids)),
            "label_index": np.array(
                [self.labels.index(label) for label in self.example_labels], np.int64
            ).reshape(len(self.ids)),
            "labels": np.array(self.labels, dtype=str).reshape(len(self.labels)),
            "weights": self.weights,
        }
        meta = {
            "in_dim": self.in_dim,
            "hidden_dim": self.hidden_dim,
            "seed": self.seed,
            "ridge": self.ridge,
            "num_samples": self.num_samples,
            "digest": self.digest,
        }
        save_state(path, KIND, SCHEMA_VERSION, bundle_fingerprint, arrays, meta)

    @classmethod
    def load(cls, path: str | Path, bundle_fingerprint: str) -> TeachLearner:
        """Read a state written by ``save``: the learner is rebuilt from the recorded examples
        (the same state as ``fit`` on them) and checked against the recorded W, digest and
        count. StateError (one line) for another bundle, a corrupt or inconsistent file."""
        arrays, meta = load_state(
            path, KIND, SCHEMA_VERSION, bundle_fingerprint, allowed=STATE_ARRAYS
        )
        try:
            learner = cls(meta["in_dim"], meta["hidden_dim"], meta["seed"], meta["ridge"])
            count, digest = int(meta["num_samples"]), str(meta["digest"])
        except (KeyError, TypeError, ValueError, RailError):
            raise StateError(f"{path} has a corrupt header") from None
        examples = _recorded_examples(path, arrays, learner.in_dim, count)
        try:
            learner.apply(added=examples)
        except RailError as exc:
            raise StateError(f"{path} holds examples that cannot be learned ({exc})") from None
        weights = arrays.get("weights")
        if (
            learner.num_samples != count
            or learner.digest != digest
            or weights is None
            or weights.shape != learner.weights.shape
            or not _close(weights, learner.weights, WEIGHTS_TOLERANCE)
        ):
            raise StateError(f"{path} is inconsistent: its W is not the W of its examples")
        return learner

    @staticmethod
    def peak_bytes(in_dim: int, hidden_dim: int, max_examples: int, labels: int) -> int:
        """Estimated peak bytes of the learner at ``max_examples`` examples and ``labels`` label
        columns: Phi twice (the held and the next during a batch), K three times (held, next and
        the factor) plus M of leave-one-out, W_r (float64 and the predictor's float32), W and A,
        the embeddings, and the process itself. ``primal_statistics`` (d x d) is not counted."""
        dim = hidden_dim or in_dim
        count = max_examples
        float64 = 2 * count * dim + 4 * count * count + in_dim * hidden_dim + dim * labels
        float64 += count * labels
        float32 = 2 * count * in_dim + in_dim * hidden_dim + dim * labels
        return 8 * float64 + 4 * float32 + PROCESS_BYTES


def one_hot(example_labels: Sequence[str], columns: Sequence[str]) -> np.ndarray:
    """Targets Y [N, len(columns)] float64: 1 where an example's label is the column's."""
    index = {label: column for column, label in enumerate(columns)}
    targets = np.zeros((len(example_labels), len(columns)))
    targets[np.arange(len(example_labels)), [index[label] for label in example_labels]] = 1.0
    return targets


def _close(saved: np.ndarray, computed: np.ndarray, tolerance: float) -> bool:
    scale = max(float(np.abs(computed).max(initial=0.0)), 1e-300)
    return bool(np.abs(saved - computed).max(initial=0.0) <= tolerance * scale)


def _recorded_examples(
    path: str | Path, arrays: dict[str, np.ndarray], in_dim: int, count: int
) -> list[Example]:
    """The examples a state file records (StateError for shapes that do not fit)."""
    embeddings, ids = arrays.get("embeddings"), arrays.get("ids")
    label_index, labels = arrays.get("label_index"), arrays.get("labels")
    if (
        embeddings is None
        or ids is None
        or label_index is None
        or labels is None
        or embeddings.shape != (count, in_dim)
        or embeddings.dtype != np.float32
        or ids.shape != (count,)
        or ids.dtype.kind != "U"
        or label_index.shape != (count,)
        or label_index.dtype.kind != "i"
        or labels.ndim != 1
        or labels.dtype.kind != "U"
        or (count and (label_index.min() < 0 or label_index.max() >= len(labels)))
    ):
        raise StateError(f"{path} has arrays of the wrong shape or type (corrupt state)")
    return [
        Example(str(ids[i]), str(labels[label_index[i]]), "", "", embeddings[i])
        for i in range(count)
    ]
