"""TokenReservoir against a literal, loop-by-loop implementation of spec/tca.md section 3."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlm_export.core.errors import StateError, UserError
from vlm_export.core.state_file import save_state
from vlm_export.runtime.tca.reservoir import TokenReservoir
from vlm_export.runtime.tca.reservoir_config import ReservoirConfig

C, L, D = 7, 5, 16
ANCHOR_LAYERS = (1, 3)
FINGERPRINT = "0123456789abcdef"


class LiteralReservoir:
    """Spec 3.2-3.4 with Python lists and loops, float64 throughout.

    buffers[c] is the list of class c's entries (entropy, stack as nested lists). A full buffer
    receives the newcomer at its end; the evicted entry is the first with the highest score, and a
    newcomer that survives takes the evicted entry's place.
    """

    def __init__(self, config: ReservoirConfig) -> None:
        self.config = config
        self.buffers: list[list[tuple[float, list[list[float]]]]] = [[] for _ in range(C)]

    def update(self, logits: np.ndarray, stack: np.ndarray) -> int:
        s = [float(x) for x in logits]
        label = 0
        for c in range(C):
            if s[c] > s[label]:
                label = c
        top = max(s)
        log_sum = top + math.log(sum(math.exp(x - top) for x in s))
        entropy = 0.0
        for x in s:
            log_p = x - log_sum
            entropy -= math.exp(log_p) * log_p
        buffer = self.buffers[label]
        buffer.append((entropy, [[float(v) for v in row] for row in stack]))
        if len(buffer) > self.config.capacity:
            scores = [self._score(buffer, j) for j in range(len(buffer))]
            evict = 0
            for j in range(len(buffer)):
                if scores[j] > scores[evict]:
                    evict = j
            newcomer = buffer.pop()
            if evict < len(buffer):
                buffer[evict] = newcomer
        return label

    def _score(self, buffer: list, j: int) -> float:
        entropy = buffer[j][0]
        if self.config.eviction == "entropy":
            return entropy
        means = []
        for _, stack in buffer:
            mean = [sum(stack[layer][d] for layer in range(L)) / L for d in range(D)]
            norm = max(math.sqrt(sum(v * v for v in mean)), 1e-12)
            means.append([v / norm for v in mean])
        total = 0.0
        for k in range(len(buffer)):
            if k != j:
                total += sum(means[j][d] * means[k][d] for d in range(D))
        return entropy + total / (len(buffer) - 1)

    def valid(self) -> list[float]:
        if self.config.anchor_rule == "all_classes":
            ready = all(len(buffer) >= 2 for buffer in self.buffers)
            return [1.0 if ready else 0.0] * C
        return [1.0 if buffer else 0.0 for buffer in self.buffers]

    def anchors(self) -> list[list[list[float]]]:
        valid = self.valid()
        result = []
        for c in range(C):
            rows = []
            for layer in ANCHOR_LAYERS:
                row = [0.0] * D
                if valid[c]:
                    for _, stack in self.buffers[c]:
                        for d in range(D):
                            row[d] += stack[layer][d] / len(self.buffers[c])
                rows.append(row)
            result.append(rows)
        return result

    def correction(self, stack: np.ndarray) -> list[float]:
        exps = [math.exp(t / (L - 1) / self.config.tau) for t in range(L)]
        weights = [e / sum(exps) for e in exps]
        z = []
        for c in range(C):
            total = 0.0
            for _, entry in self.buffers[c]:
                affinity = 0.0
                for layer in range(L):
                    x = [float(v) for v in stack[layer]]
                    y = entry[layer]
                    dot = sum(x[d] * y[d] for d in range(D))
                    norm_x = max(math.sqrt(sum(v * v for v in x)), 1e-8)
                    norm_y = max(math.sqrt(sum(v * v for v in y)), 1e-8)
                    affinity += weights[layer] * dot / (norm_x * norm_y)
                total += math.exp(-self.config.beta * (1.0 - affinity))
            z.append(self.config.lam * total)
        return z


def frame_stream(seed: int, frames: int):
    """(logits, cls stack) pairs: noisy class prototypes with layer norms that differ by layer."""
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(C, L, D)) * rng.uniform(0.5, 4.0, size=(C, L, 1))
    for _ in range(frames):
        true_class = int(rng.integers(C))
        stack = prototypes[true_class] + rng.normal(scale=1.5, size=(L, D))
        logits = rng.normal(scale=2.0, size=C)
        logits[true_class] += rng.uniform(0.0, 6.0)
        yield logits.astype(np.float32), stack.astype(np.float32)


def stored_entries(reservoir: TokenReservoir, label: int) -> list[tuple[float, np.ndarray]]:
    state = reservoir.state_arrays()
    count = int(state["counts"][label])
    raw = state["unit_stacks"][label, :count] * state["norms"][label, :count, :, None]
    return [(float(state["entropies"][label, j]), raw[j]) for j in range(count)]


CONFIGS = [
    ReservoirConfig(eviction="diversity", anchor_rule="all_classes"),
    ReservoirConfig(eviction="entropy", anchor_rule="all_classes"),
    ReservoirConfig(eviction="diversity", anchor_rule="per_class"),
    ReservoirConfig(eviction="entropy", anchor_rule="per_class"),
    # tau 0.01 leaves the leading layers out of the fast correction (their weight is < 1e-7)
    ReservoirConfig(capacity=2, tau=0.01, lam=2.0, beta=7.0, eviction="diversity"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.eviction}-{c.anchor_rule}-{c.tau}")
def test_matches_literal_reference(config: ReservoirConfig) -> None:
    reservoir = TokenReservoir(C, L, D, ANCHOR_LAYERS, config)
    reference = LiteralReservoir(config)
    anchors_view, valid_view = reservoir.anchors()
    previous_anchors, previous_valid = reference.anchors(), reference.valid()
    newcomer_evicted = existing_evicted = 0
    for logits, stack in frame_stream(seed=1, frames=320):
        version = reservoir.version
        before = [len(buffer) for buffer in reference.buffers]
        label = reservoir.update(logits, stack)
        assert label == reference.update(logits, stack)
        if before[label] == config.capacity:
            replaced = any(entry[1] == stack.tolist() for entry in reference.buffers[label])
            existing_evicted += replaced
            newcomer_evicted += not replaced

        for c in range(C):
            mine, literal = stored_entries(reservoir, c), reference.buffers[c]
            assert len(mine) == len(literal)
            for (h_mine, s_mine), (h_ref, s_ref) in zip(mine, literal, strict=True):
                assert h_mine == pytest.approx(h_ref, rel=1e-12, abs=1e-12)
                np.testing.assert_allclose(s_mine, s_ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(reservoir.counts(), [len(b) for b in reference.buffers])

        anchors, valid = reservoir.anchors()
        assert anchors is anchors_view and valid is valid_view
        literal_anchors, literal_valid = reference.anchors(), reference.valid()
        np.testing.assert_array_equal(valid, literal_valid)
        np.testing.assert_allclose(anchors, literal_anchors, rtol=1e-5, atol=1e-5)
        changed = literal_anchors != previous_anchors or literal_valid != previous_valid
        assert reservoir.version - version == int(changed)
        previous_anchors, previous_valid = literal_anchors, literal_valid

        z = reservoir.correction(stack)
        assert z.dtype == np.float32 and z.shape == (C,)
        np.testing.assert_allclose(z, reference.correction(stack), rtol=1e-5, atol=1e-5)

    assert newcomer_evicted > 10 and existing_evicted > 10
    if config.anchor_rule == "all_classes":
        assert valid_view.all()


def test_all_classes_rule_waits_for_two_entries_everywhere() -> None:
    reservoir = TokenReservoir(3, L, D, ANCHOR_LAYERS, ReservoirConfig(capacity=3))
    stacks = np.random.default_rng(0).normal(size=(6, L, D)).astype(np.float32)
    labels = (0, 0, 1, 1, 2, 2)
    anchors, valid = reservoir.anchors()
    for i, label in enumerate(labels):
        assert reservoir.version == 0 and not valid.any() and not anchors.any()
        logits = np.zeros(3, np.float32)
        logits[label] = 10.0
        reservoir.update(logits, stacks[i])
    assert reservoir.version == 1 and valid.all()
    expected = stacks[:, list(ANCHOR_LAYERS)].reshape(3, 2, len(ANCHOR_LAYERS), D).mean(axis=1)
    np.testing.assert_allclose(anchors, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        anchors[0, 0, 0] = 1.0


def test_per_class_rule_marks_classes_with_an_entry() -> None:
    config = ReservoirConfig(capacity=1, anchor_rule="per_class")
    reservoir = TokenReservoir(4, L, D, ANCHOR_LAYERS, config)
    stack = np.random.default_rng(0).normal(size=(L, D)).astype(np.float32)
    reservoir.update(np.array([0, 0, 5, 0], np.float32), stack)
    anchors, valid = reservoir.anchors()
    np.testing.assert_array_equal(valid, [0, 0, 1, 0])
    np.testing.assert_allclose(anchors[2], stack[list(ANCHOR_LAYERS)], rtol=1e-6)
    assert not anchors[[0, 1, 3]].any() and reservoir.version == 1


@pytest.mark.parametrize("rule", ["all_classes", "per_class"])
def test_anchor_changes_name_exactly_the_rows_that_moved(rule: str) -> None:
    reservoir = TokenReservoir(
        3, L, D, ANCHOR_LAYERS, ReservoirConfig(capacity=2, anchor_rule=rule)
    )
    rng = np.random.default_rng(1)
    pushed_anchors = np.zeros((3, len(ANCHOR_LAYERS), D), np.float32)
    pushed_valid = np.zeros(3, np.float32)
    pushed_version = reservoir.version
    for frame in range(40):
        logits = np.zeros(3, np.float32)
        logits[[0, 1, 2, 0, 1, 2][frame % 6] if frame < 6 else rng.integers(3)] = 10.0
        before_anchors, before_valid = reservoir.anchors()
        before_anchors, before_valid = before_anchors.copy(), before_valid.copy()
        reservoir.update(logits, rng.normal(size=(L, D)).astype(np.float32))
        if reservoir.version == pushed_version:
            continue
        rows = reservoir.take_anchor_changes()
        anchors, valid = reservoir.anchors()
        if rows is None:  # everything may have moved: copy all
            pushed_anchors[:], pushed_valid[:] = anchors, valid
        else:
            moved = np.flatnonzero(
                (anchors != before_anchors).any(axis=(1, 2)) | (valid != before_valid)
            )
            assert set(moved) <= set(rows.tolist())
            assert len(rows) == 1  # one frame changes one class, outside an activation
            pushed_anchors[rows], pushed_valid[rows] = anchors[rows], valid[rows]
        pushed_version = reservoir.version
        np.testing.assert_array_equal(pushed_anchors, anchors)  # a row copy is enough
        np.testing.assert_array_equal(pushed_valid, valid)
    assert reservoir.take_anchor_changes().size == 0


def test_repeated_frame_leaves_a_full_buffer_and_version_unchanged() -> None:
    reservoir = TokenReservoir(2, L, D, ANCHOR_LAYERS, ReservoirConfig(anchor_rule="per_class"))
    rng = np.random.default_rng(3)
    logits = np.array([4.0, 1.0], np.float32)
    for _ in range(3):
        reservoir.update(logits, rng.normal(size=(L, D)))
    frame = rng.normal(size=(L, D)).astype(np.float32)
    reservoir.update(logits, frame)
    state = {name: array.copy() for name, array in reservoir.state_arrays().items()}
    version = reservoir.version
    for _ in range(5):
        reservoir.update(logits, frame)
    assert reservoir.version == version
    for name, array in reservoir.state_arrays().items():
        np.testing.assert_array_equal(array, state[name])


def test_save_load_resumes_exactly(tmp_path) -> None:
    config = ReservoirConfig(capacity=2, tau=0.05, eviction="diversity")
    frames = list(frame_stream(seed=7, frames=300))
    uninterrupted = TokenReservoir(C, L, D, ANCHOR_LAYERS, config)
    interrupted = TokenReservoir(C, L, D, ANCHOR_LAYERS, config)
    for logits, stack in frames[:150]:
        uninterrupted.update(logits, stack)
        interrupted.update(logits, stack)
    path = tmp_path / "reservoir.npz"
    interrupted.save(path, FINGERPRINT)
    resumed = TokenReservoir.load(path, FINGERPRINT, C, L, D, ANCHOR_LAYERS)
    assert resumed.config == config
    for mine, theirs in zip(resumed.anchors(), uninterrupted.anchors(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    for logits, stack in frames[150:]:
        versions = resumed.version, uninterrupted.version
        assert resumed.update(logits, stack) == uninterrupted.update(logits, stack)
        assert resumed.version - versions[0] == uninterrupted.version - versions[1]
        for mine, theirs in zip(resumed.anchors(), uninterrupted.anchors(), strict=True):
            np.testing.assert_array_equal(mine, theirs)
        np.testing.assert_array_equal(resumed.correction(stack), uninterrupted.correction(stack))
    for name, array in resumed.state_arrays().items():
        np.testing.assert_array_equal(array, uninterrupted.state_arrays()[name])


def test_rows_follow_arrival_and_a_state_without_them_still_loads(tmp_path) -> None:
    """Entries take the correction matrix's rows in the order they first arrive (a reservoir that
    has seen 3 of 7 classes reads 3 * capacity rows, not 7 * capacity); a state saved before
    rows were recorded loads packed class by class, with the same decisions."""
    config = ReservoirConfig(capacity=2, tau=0.05)
    reservoir = TokenReservoir(C, L, D, ANCHOR_LAYERS, config)
    seen = [5, 2, 5, 0, 2]
    for label, (_, stack) in zip(seen, frame_stream(seed=3, frames=5), strict=True):
        logits = np.full(C, -5.0, np.float32)
        logits[label] = 5.0
        reservoir.update(logits, stack)
    saved = tmp_path / "new.npz"
    reservoir.save(saved, FINGERPRINT)
    with np.load(saved) as state:
        rows = state["row_order"]
    assert rows[5].tolist() == [0, 2] and rows[2].tolist() == [1, 4] and rows[0, 0] == 3
    assert (rows[[1, 3, 4, 6]] == -1).all() and rows[0, 1] == -1
    stack = next(iter(frame_stream(seed=4, frames=1)))[1]
    want = reservoir.correction(stack)
    assert (want[[1, 3, 4, 6]] == 0).all() and (want[[0, 2, 5]] > 0).all()

    path = tmp_path / "old.npz"
    arrays = {k: v for k, v in reservoir.state_arrays().items() if k != "row_order"}
    meta = {k: v for k, v in reservoir._meta().items() if k != "row_order"}
    save_state(path, "tca_reservoir", 1, FINGERPRINT, arrays, meta)
    old = TokenReservoir.load(path, FINGERPRINT, C, L, D, ANCHOR_LAYERS)
    np.testing.assert_allclose(old.correction(stack), want, rtol=1e-6)
    old.save(saved, FINGERPRINT)
    with np.load(saved) as state:
        assert state["row_order"][0, 0] == 0  # packed class by class
    for logits, stack in frame_stream(seed=5, frames=20):
        assert old.update(logits, stack) == reservoir.update(logits, stack)


@pytest.mark.parametrize(
    ("fingerprint", "shape", "message"),
    [
        ("fedcba9876543210", (C, L, D), "another bundle"),
        (FINGERPRINT, (C + 1, L, D), "num_classes"),
        (FINGERPRINT, (C, L + 1, D), "num_layers"),
        (FINGERPRINT, (C, L, D * 2), "width"),
    ],
)
def test_load_refuses_other_bundle_or_shape(tmp_path, fingerprint, shape, message) -> None:
    reservoir = TokenReservoir(C, L, D, ANCHOR_LAYERS)
    for logits, stack in frame_stream(seed=2, frames=20):
        reservoir.update(logits, stack)
    path = tmp_path / "reservoir.npz"
    reservoir.save(path, FINGERPRINT)
    with pytest.raises(StateError, match=message):
        TokenReservoir.load(path, fingerprint, *shape, ANCHOR_LAYERS)


def test_load_refuses_other_kind_and_bad_arrays(tmp_path) -> None:
    path = tmp_path / "other.npz"
    save_state(path, "rail_adapter", 1, FINGERPRINT, {"w": np.zeros(3)})
    with pytest.raises(StateError, match="tca_reservoir"):
        TokenReservoir.load(path, FINGERPRINT, C, L, D, ANCHOR_LAYERS)
    reservoir = TokenReservoir(C, L, D, ANCHOR_LAYERS)
    state = {name: array.copy() for name, array in reservoir.state_arrays().items()}
    state["counts"][0] = 4
    with pytest.raises(StateError, match="counts"):
        reservoir.load_state_arrays(state)
    del state["norms"]
    with pytest.raises(StateError, match="norms"):
        reservoir.load_state_arrays(state)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"capacity": 0},
        {"capacity": 2.5},
        {"capacity": True},
        {"capacity": 1},  # all_classes needs two entries per class
        {"tau": 0.0},
        {"tau": float("nan")},
        {"lam": -1.0},
        {"beta": float("inf")},
        {"eviction": "fifo"},
        {"anchor_rule": "any"},
    ],
)
def test_config_validation(kwargs) -> None:
    with pytest.raises(UserError):
        ReservoirConfig(**kwargs)


def test_constructor_and_frame_validation() -> None:
    assert ReservoirConfig(capacity=1, anchor_rule="per_class").capacity == 1
    with pytest.raises(UserError, match="anchor_layers"):
        TokenReservoir(C, L, D, (1, L))
    with pytest.raises(UserError, match="num_classes"):
        TokenReservoir(0, L, D, ANCHOR_LAYERS)
    reservoir = TokenReservoir(C, L, D, ANCHOR_LAYERS)
    with pytest.raises(ValueError, match="cls_stack"):
        reservoir.update(np.zeros(C), np.zeros((L, D + 1)))
    with pytest.raises(ValueError, match="zero_shot_logits"):
        reservoir.update(np.zeros(C + 1), np.zeros((L, D)))
    with pytest.raises(ValueError, match="non-finite"):
        reservoir.update(np.full(C, np.nan), np.zeros((L, D)))
    assert not reservoir.counts().any()
