"""TCA token reservoir and logit correction (spec/tca.md section 3), NumPy only.

One buffer per class holds up to ``capacity`` entries; an entry is the zero-shot entropy of an image
and its CLS stack [L, D] (``cls_per_layer`` of the engine). Per image the pipeline calls
``update`` (insert, evict, rebuild anchors) and then ``correction`` (logit offsets z [C]).

Storage: every entry is kept as its per-layer unit vectors plus per-layer norms. The unit stacks of
all entries form one contiguous [C*M, L*D] matrix whose rows are handed out in the order entries
first arrive (an entry's slot keeps its row when a later entry replaces it), so the stored entries
are always its first rows and the correction is one matrix-vector product over them alone: a
camera that has seen 20 of 1000 classes reads 60 rows per frame, not 3000. The raw tokens that
anchors and eviction need are unit * norm (float32 rounding). This holds the reservoir in half
the memory of raw plus normalised copies (ImageNet, ViT-B/16: 110 MB).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from vlm_export.core.errors import StateError, UserError
from vlm_export.core.labels import Label, label_sources, labels_meta, saved_labels
from vlm_export.core.state_file import load_state, save_state
from vlm_export.runtime.tca.reservoir_config import (
    DEFAULT_CONFIG,
    ReservoirConfig,
    check_state_arrays,
    is_int,
    require_reservoir_memory,
    saved_geometry,
)
from vlm_export.runtime.tca.scores import layer_weights, mean_similarity, prediction_entropy

STATE_KIND = "tca_reservoir"
#: the state array that records each filled slot's row of the correction's matrix ([C, M], -1
#: empty): a loaded state keeps the rows, so its corrections equal the saved one's to the bit
#: (a BLAS product may round a row differently at another position); optional, older states
#: without it are packed class by class
ROW_ORDER = "row_order"
STATE_SCHEMA_VERSION = 1

# Norm floor: cosine as in torch.nn.functional.cosine_similarity (eps 1e-8 per vector), as the
# released code computes it.
_COS_EPS = 1e-8
# Leading layers whose summed weight is below this are left out of the correction: |cos| <= 1, so
# each affinity moves by at most this much, below float32 resolution of the affinity itself.
_SKIP_WEIGHT_MASS = 1e-7


class TokenReservoir:
    """Per-class buffers of (entropy, CLS stack) with anchors and the TCA logit correction.

    Anchors are ``anchors[c] = valid[c] * mean of class c's stored rows anchor_layers``:

    - ``anchor_rule="all_classes"`` (reference, the released code): all classes become valid at
      once, when EVERY class holds >= 2 entries; until then anchors and valid are all zeros.
    - ``anchor_rule="per_class"`` (alternative for large label spaces, where the reference rule
      switches anchors on late or never): class c is valid as soon as it holds one entry. The engine
      then picks the best-matching anchor among valid classes only, and uses ordinary attention
      while no class is valid.

    ``anchor_rows`` (default ``num_classes``) is the engine's class capacity K >= C: the anchors
    arrays have K rows, rows C..K-1 stay zero and invalid, so they bind to the engine as they are.

    ``version`` counts changes of (anchors, valid): the pipeline pushes anchors to the engine only
    when it moved. Eviction ties go to the lowest slot, the newcomer counting as the last slot; a
    newcomer that is not evicted takes the evicted entry's slot.
    """

    def __init__(
        self,
        num_classes: int,
        num_layers: int,
        width: int,
        anchor_layers: Sequence[int],
        config: ReservoirConfig = DEFAULT_CONFIG,
        anchor_rows: int | None = None,
    ) -> None:
        for name, value in (("num_classes", num_classes), ("num_layers", num_layers)):
            if not is_int(value) or value < 1:
                raise UserError(f"reservoir {name} must be an integer >= 1, got {value!r}")
        if not is_int(width) or width < 1:
            raise UserError(f"reservoir width must be an integer >= 1, got {width!r}")
        layers = tuple(anchor_layers)
        if not layers or not all(is_int(i) and 0 <= i < num_layers for i in layers):
            raise UserError(
                f"anchor_layers must be a non-empty list of layers in 0..{num_layers - 1}, "
                f"got {list(layers)}"
            )
        if anchor_rows is None:
            anchor_rows = num_classes
        if not is_int(anchor_rows) or anchor_rows < num_classes:
            raise UserError(
                f"{num_classes} classes do not fit an engine with class capacity {anchor_rows}"
            )
        require_reservoir_memory(num_classes, num_layers, width, len(layers), config.capacity)
        self.config = config
        self.num_classes = int(num_classes)
        self.anchor_rows = int(anchor_rows)
        self.num_layers = int(num_layers)
        self.width = int(width)
        self.anchor_layers = tuple(int(i) for i in layers)
        self.version = 0
        self.dropped_entries = 0  # entries of classes select_classes left out (for a message)
        self._changed: set[int] | None = set()  # classes whose anchor moved; None: all of them

        classes, slots = self.num_classes, config.capacity
        self._rows = np.zeros((classes * slots, self.num_layers, self.width), np.float32)
        self._unit_matrix = self._rows.reshape(classes * slots, self.num_layers * self.width)
        self._row_of = np.full((classes, slots), -1, np.int64)  # the row of each filled slot
        self._class_of_row = np.zeros(classes * slots, np.int64)
        self._live = 0  # rows handed out: the stored entries are rows 0..live-1
        self._norms = np.zeros((classes, slots, self.num_layers), np.float32)
        self._entropies = np.zeros((classes, slots), np.float64)
        self._counts = np.zeros(classes, np.int64)
        rows = self.anchor_rows
        self._anchors = np.zeros((rows, len(self.anchor_layers), self.width), np.float32)
        self._valid = np.zeros(rows, np.float32)
        self._anchors_view = self._anchors.view()
        self._anchors_view.flags.writeable = False
        self._valid_view = self._valid.view()
        self._valid_view.flags.writeable = False

        weights = layer_weights(self.num_layers, config.tau)
        self._first_layer = int(np.searchsorted(np.cumsum(weights), _SKIP_WEIGHT_MASS, "right"))
        self._weights = weights[self._first_layer :]
        self._affinity = np.empty(classes * slots, np.float32)

    # ------------------------------------------------------------------ per frame
    def update(self, zero_shot_logits: np.ndarray, cls_stack: np.ndarray) -> int:
        """Insert this image into the buffer of its zero-shot class; return that class y.

        ``zero_shot_logits`` [C] = 100 * cos(f, t_c); ``cls_stack`` [L, D] = the engine's
        ``cls_per_layer`` for this image. Evicts when the buffer exceeds capacity (possibly the
        newcomer), then rebuilds the anchors; ``version`` moves if they changed.
        """
        logits = np.asarray(zero_shot_logits, dtype=np.float64)
        stack = self._check_stack(cls_stack)
        if logits.shape != (self.num_classes,):
            raise ValueError(f"zero_shot_logits must be [{self.num_classes}], got {logits.shape}")
        if not (np.isfinite(logits).all() and np.isfinite(stack).all()):
            raise ValueError("reservoir update got non-finite logits or CLS tokens")
        label = int(np.argmax(logits))
        entropy = prediction_entropy(logits)
        norms = np.maximum(np.linalg.norm(stack, axis=1), np.float32(_COS_EPS))
        units = stack / norms[:, None]

        count = int(self._counts[label])
        appending = count < self.config.capacity
        slot = count if appending else self._choose_eviction(label, entropy, units, norms)
        if slot == self.config.capacity:
            return label  # the newcomer itself was evicted
        # entry first, count last: a reader never sees a counted slot without its entry
        self._store(label, slot, units)
        self._norms[label, slot] = norms
        self._entropies[label, slot] = entropy
        if appending:
            self._counts[label] = count + 1
        self._refresh_anchors(label)
        return label

    def correction(self, cls_stack: np.ndarray) -> np.ndarray:
        """z [C] float32: lambda * sum over class c's entries of exp(-beta * (1 - a_e)).

        a_e = sum_l w_l cos(V_l, V_e,l) with w = softmax(linspace(0, 1, L) / tau), computed as one
        product of the stored unit stacks with concat_l(w_l V_l / |V_l|).
        """
        stack = self._check_stack(cls_stack)[self._first_layer :]
        norms = np.maximum(np.linalg.norm(stack, axis=1), np.float32(_COS_EPS))
        query = (stack * (self._weights / norms)[:, None].astype(np.float32)).ravel()
        live = self._live
        units = self._unit_matrix[:live, self._first_layer * self.width :]
        affinity = self._affinity[:live]
        np.matmul(units, query, out=affinity)
        terms = np.exp(np.float32(self.config.beta) * (affinity - np.float32(1.0)))
        per_class = np.zeros(self.num_classes, np.float32)
        np.add.at(per_class, self._class_of_row[:live], terms)  # in slot order within a class
        return (np.float32(self.config.lam) * per_class).astype(np.float32, copy=False)

    # ------------------------------------------------------------------ views
    def anchors(self) -> tuple[np.ndarray, np.ndarray]:
        """(anchors [K, R, D] float32, valid [K] float32): read-only views of the live buffers.

        ``anchors[c, i]`` = mean over class c's entries of CLS row ``anchor_layers[i]`` (raw tokens)
        where ``valid[c]`` is 1, zeros elsewhere (always for rows c >= C, up to the capacity K =
        ``anchor_rows``). The same arrays every call: no copy per frame.
        """
        return self._anchors_view, self._valid_view

    def counts(self) -> np.ndarray:
        """Entries per class [C] int64 (a copy)."""
        return self._counts.copy()

    # ------------------------------------------------------------------ internals
    def _check_stack(self, cls_stack: np.ndarray) -> np.ndarray:
        stack = np.asarray(cls_stack, dtype=np.float32)
        if stack.shape != (self.num_layers, self.width):
            raise ValueError(
                f"cls_stack must be [{self.num_layers}, {self.width}], got {stack.shape}"
            )
        return stack

    def _choose_eviction(
        self, label: int, entropy: float, units: np.ndarray, norms: np.ndarray
    ) -> int:
        """Slot to evict from a full buffer plus newcomer (slot ``capacity`` = the newcomer)."""
        entropies = np.append(self._entropies[label], entropy)
        if self.config.eviction == "entropy":
            return int(np.argmax(entropies))
        all_units = np.concatenate([self._rows[self._row_of[label]], units[None]])
        all_norms = np.concatenate([self._norms[label], norms[None]])
        return int(np.argmax(entropies + mean_similarity(all_units, all_norms)))

    def _store(self, label: int, slot: int, units: np.ndarray) -> None:
        """Write an entry's unit stack into its slot's row; a slot filled for the first time gets
        the next free row, published (``_live``) only once it holds the entry."""
        row = int(self._row_of[label, slot])
        if row >= 0:
            self._rows[row] = units
            return
        row = self._live
        self._rows[row] = units
        self._class_of_row[row] = label
        self._row_of[label, slot] = row
        self._live = row + 1

    def _unit_stacks(self) -> np.ndarray:
        """The stored unit stacks as [C, M, L, D] (zeros in empty slots), as states hold them."""
        stacks = np.zeros((*self._row_of.shape, self.num_layers, self.width), np.float32)
        filled = self._row_of >= 0
        stacks[filled] = self._rows[self._row_of[filled]]
        return stacks

    def _class_anchor(self, label: int) -> np.ndarray:
        count = int(self._counts[label])
        rows = self._rows[self._row_of[label, :count]][:, self.anchor_layers]
        rows = rows * self._norms[label, :count][:, self.anchor_layers, None]
        return rows.mean(axis=0)

    def _refresh_anchors(self, label: int) -> None:
        """Recompute anchors after class ``label`` changed; bump ``version`` if they moved."""
        if self.config.anchor_rule == "per_class" or self._valid[label] == 1.0:
            anchor = self._class_anchor(label)
            if self._valid[label] == 1.0 and np.array_equal(anchor, self._anchors[label]):
                return
            self._anchors[label] = anchor
            self._valid[label] = 1.0
            self.version += 1
            if self._changed is not None:
                self._changed.add(label)
        elif self._counts.min() >= 2:
            self._rebuild_all_anchors()

    def _rebuild_all_anchors(self) -> None:
        """Set every anchor and valid flag from the buffers (activation, state load)."""
        self._anchors[:] = 0.0
        self._valid[:] = 0.0
        classes = self.num_classes
        if self.config.anchor_rule == "per_class":
            self._valid[:classes] = self._counts >= 1
        else:
            self._valid[:classes] = float(self._counts.min() >= 2)
        for label in np.flatnonzero(self._valid):
            self._anchors[label] = self._class_anchor(int(label))
        self.version += 1
        self._changed = None

    def take_anchor_changes(self) -> np.ndarray | None:
        """Classes whose anchor (and valid flag) changed since the last call, sorted; None when
        all of them may have (activation, state load). Lets an engine copy only those rows."""
        changed = self._changed
        self._changed = set()
        return None if changed is None else np.array(sorted(changed), dtype=np.int64)

    def select_classes(
        self, sources: Sequence[int | None], anchor_rows: int | None = None
    ) -> TokenReservoir:
        """A reservoir for another label space: class i holds the entries of this reservoir's
        class ``sources[i]``, or none when that is None (``core.labels.label_sources`` maps labels
        to sources). Same config and geometry, ``anchor_rows`` (default: this one's); anchors are
        rebuilt from the moved entries; ``dropped_entries`` of the new one counts those left out."""
        for source in sources:
            if source is not None and not (is_int(source) and 0 <= source < self.num_classes):
                raise ValueError(f"source class {source} is not in 0..{self.num_classes - 1}")
        chosen = [i for i, source in enumerate(sources) if source is not None]
        if len({sources[i] for i in chosen}) != len(chosen):
            raise ValueError("a class's entries may move to one class only")
        new = TokenReservoir(
            len(sources),
            self.num_layers,
            self.width,
            self.anchor_layers,
            self.config,
            self.anchor_rows if anchor_rows is None else anchor_rows,
        )
        current = self.state_arrays()
        del current[ROW_ORDER]  # the moved entries are packed anew, class by class
        arrays = {
            name: np.zeros((len(sources), *array.shape[1:]), array.dtype)
            for name, array in current.items()
        }
        old = [sources[i] for i in chosen]
        for name, array in current.items():
            arrays[name][chosen] = array[old]
        new.load_state_arrays(arrays)
        new.dropped_entries = int(self._counts.sum() - self._counts[old].sum())
        return new

    # ------------------------------------------------------------------ persistence
    def state_arrays(self) -> dict[str, np.ndarray]:
        """The state as named arrays, all a resumed reservoir needs to compute the same bits
        (read-only; ``unit_stacks`` [C, M, L, D] is assembled from the rows, the others are views
        of the live buffers: copy to keep). ``ROW_ORDER`` is storage, not a class's state."""
        arrays = {
            "unit_stacks": self._unit_stacks(),
            ROW_ORDER: self._row_of,
            "norms": self._norms,
            "entropies": self._entropies,
            "counts": self._counts,
        }
        views = {}
        for name, array in arrays.items():
            views[name] = array.view()
            views[name].flags.writeable = False
        return views

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Replace the state with arrays from ``state_arrays`` (``ROW_ORDER`` optional: without
        it the entries are packed class by class); rebuilds anchors, bumps version."""
        counts, occupied = check_state_arrays(
            arrays, self.num_classes, self.config.capacity, self.num_layers, self.width
        )
        self._row_of[:] = -1
        self._live = 0
        stacks = arrays["unit_stacks"]
        filled = list(zip(*np.nonzero(occupied), strict=True))  # class by class, slot order
        rows = _saved_rows(arrays.get(ROW_ORDER), occupied)
        if rows is not None:  # the saved rows, in the order they were handed out
            filled.sort(key=lambda at: rows[at])
        for label, slot in filled:
            self._store(int(label), int(slot), stacks[label, slot])
        self._norms[:] = arrays["norms"]
        self._entropies[:] = arrays["entropies"]
        self._counts[:] = counts
        self._rebuild_all_anchors()

    def _meta(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "num_classes": self.num_classes,
            "num_layers": self.num_layers,
            "width": self.width,
            "anchor_layers": list(self.anchor_layers),
            ROW_ORDER: True,  # the state holds the row_order array
        }

    def save(
        self,
        path: str | Path,
        bundle_fingerprint: str,
        labels: Sequence[Label] | None = None,
        engine_fingerprint: str | None = None,
        owner: str | None = None,
    ) -> None:
        """Write the reservoir to a state file (atomic; config and shapes in its header).

        With ``labels`` (one (domain, name) per class) and ``engine_fingerprint`` the state
        follows its labels when the bundle's classes change (see ``load``). ``owner`` names
        whose state it is (a service's source), checked by ``load``.
        """
        meta = self._meta()
        if owner is not None:
            meta["owner"] = owner
        if labels is not None:
            if len(labels) != self.num_classes:
                raise ValueError(f"{len(labels)} labels for {self.num_classes} classes")
            meta.update(labels_meta(engine_fingerprint or "", labels))
        save_state(
            path,
            STATE_KIND,
            STATE_SCHEMA_VERSION,
            bundle_fingerprint,
            self.state_arrays(),
            meta,
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        bundle_fingerprint: str,
        num_classes: int,
        num_layers: int,
        width: int,
        anchor_layers: Sequence[int],
        labels: Sequence[Label] | None = None,
        engine_fingerprint: str | None = None,
        anchor_rows: int | None = None,
        owner: str | None = None,
    ) -> TokenReservoir:
        """Read a reservoir saved by ``save``, with the config it was saved with.

        Raises StateError for another bundle, another kind or schema, or other class count, depth
        or width. Anchors are recomputed for ``anchor_layers`` from the stored stacks.

        A state that records its labels, given this bundle's ``labels``, keeps every entry with
        its label: kept labels keep their entries, new labels start empty, labels the bundle no
        longer has are dropped. Such a state also loads into a bundle of the same image engine
        (``engine_fingerprint``) whose classes changed. A state without labels must come from
        this very bundle (its fingerprint), hence has this bundle's classes. With ``owner``, a
        state saved for another owner (another source's state copied over) is a StateError.
        """
        configs: list[ReservoirConfig] = []

        def expected_shapes(meta: dict) -> dict[str, tuple[int, ...]]:
            """Check the header's geometry and config; the shapes its arrays must declare."""
            config, shapes = saved_geometry(meta, path, num_classes, num_layers, width)
            configs.append(config)
            if meta.get(ROW_ORDER) is True:
                shapes[ROW_ORDER] = shapes["entropies"]
            return shapes

        arrays, meta = load_state(
            path,
            STATE_KIND,
            STATE_SCHEMA_VERSION,
            bundle_fingerprint,
            expected_shapes=expected_shapes,
            engine_fingerprint=engine_fingerprint,
        )
        saved_owner = meta.get("owner")
        if owner is not None and saved_owner is not None and saved_owner != owner:
            raise StateError(
                f"{path} is the state of {str(saved_owner)[:80]!r}, not of {owner!r} (copied from "
                "another source?): move it back or delete it"
            )
        saved = saved_labels(meta, path)
        same = saved is None or labels is None or list(saved) == [tuple(x) for x in labels]
        stored = num_classes if same else len(saved)
        reservoir = cls(
            stored, num_layers, width, anchor_layers, configs[0], anchor_rows if same else None
        )
        try:
            reservoir.load_state_arrays(arrays)
        except StateError as exc:
            raise StateError(f"{path}: {exc}") from None
        if same:
            return reservoir
        rows = num_classes if anchor_rows is None else anchor_rows
        return reservoir.select_classes(label_sources(saved, labels), rows)


def _saved_rows(rows: np.ndarray | None, occupied: np.ndarray) -> np.ndarray | None:
    """A state's ``row_order`` when it fits its filled slots (rows 0..n-1, one each), else None."""
    if rows is None or np.shape(rows) != occupied.shape or np.asarray(rows).dtype.kind not in "iu":
        return None
    rows = np.asarray(rows)
    taken = np.sort(rows[occupied])
    if not np.array_equal(taken, np.arange(taken.size)) or (rows[~occupied] != -1).any():
        return None
    return rows
