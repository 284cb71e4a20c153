"""Adaptation state follows class names when the classes change: TCA reservoir entries, RAIL
columns. References are literal: the reservoir rebuilt by hand, label by label."""

from __future__ import annotations

import numpy as np
import pytest
from fakebundle import make_bundle

from vlm_export.core.errors import StateError, UserError
from vlm_export.core.labels import label_sources
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.pipeline import Pipeline
from vlm_export.runtime.rail.dual import DualPredictor
from vlm_export.runtime.rail.fusion import RailFusion
from vlm_export.runtime.rail.primal import PrimalPredictor
from vlm_export.runtime.rail.relabel import follow_labels
from vlm_export.runtime.tca.reservoir import TokenReservoir
from vlm_export.runtime.tca.reservoir_config import ReservoirConfig

L, D, LAYERS = 4, 8, [1, 2]
OLD = [("d", "cat"), ("d", "dog"), ("d", "bird"), ("d", "sea lion")]
NEW = [("d", "bird"), ("d", "fox"), ("d", "cat"), ("d", "owl"), ("d", "sea_lion")]


def _filled(labels, seed=0, capacity=3) -> TokenReservoir:
    config = ReservoirConfig(capacity=capacity, anchor_rule="per_class")
    reservoir = TokenReservoir(len(labels), L, D, LAYERS, config)
    rng = np.random.default_rng(seed)
    for frame in range(40):
        logits = np.zeros(len(labels))
        logits[frame % len(labels)] = 5.0 + rng.random()
        reservoir.update(logits, rng.standard_normal((L, D)).astype(np.float32))
    return reservoir


def _by_hand(reservoir: TokenReservoir, old, new, rows=None) -> TokenReservoir:
    """The reference: an empty reservoir for ``new`` whose arrays are copied label by label."""
    current = reservoir.state_arrays()
    arrays = {name: np.zeros((len(new), *a.shape[1:]), a.dtype) for name, a in current.items()}
    for i, label in enumerate(new):
        for j, previous in enumerate(old):
            if previous == label:
                for name, array in current.items():
                    arrays[name][i] = array[j]
    result = TokenReservoir(
        len(new),
        reservoir.num_layers,
        reservoir.width,
        reservoir.anchor_layers,
        reservoir.config,
        reservoir.anchor_rows if rows is None else rows,
    )
    result.load_state_arrays(arrays)
    return result


def _same(a: TokenReservoir, b: TokenReservoir) -> None:
    for name, array in a.state_arrays().items():
        np.testing.assert_array_equal(array, b.state_arrays()[name], err_msg=name)
    for x, y in zip(a.anchors(), b.anchors(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_state_follows_names_through_a_file(tmp_path) -> None:
    reservoir = _filled(OLD)
    path = tmp_path / "reservoir.npz"
    reservoir.save(path, "bundle-old", OLD, "engine-1")
    loaded = TokenReservoir.load(
        path,
        "bundle-new",
        len(NEW),
        L,
        D,
        LAYERS,
        labels=NEW,
        engine_fingerprint="engine-1",
        anchor_rows=9,
    )
    _same(loaded, _by_hand(reservoir, OLD, NEW, 9))
    assert loaded.counts().tolist() == [3, 0, 3, 0, 0]  # "sea lion" != "sea_lion": a new class
    assert loaded.anchors()[0].shape == (9, 2, D)
    # the correction of a kept class is the same as before, wherever its row went
    stack = np.random.default_rng(9).standard_normal((L, D)).astype(np.float32)
    before, after = reservoir.correction(stack), loaded.correction(stack)
    assert after[0] == before[2] and after[2] == before[0] and after[1] == after[3] == 0


def test_state_of_the_same_labels_loads_as_is_and_old_states_still_load(tmp_path) -> None:
    reservoir = _filled(OLD, seed=3)
    path = tmp_path / "same.npz"
    reservoir.save(path, "bundle-new", OLD, "engine-1")
    _same(TokenReservoir.load(path, "bundle-new", 4, L, D, LAYERS, labels=OLD), reservoir)
    legacy = tmp_path / "legacy.npz"
    reservoir.save(legacy, "bundle-old")  # saved before states recorded their labels
    _same(TokenReservoir.load(legacy, "bundle-old", 4, L, D, LAYERS, labels=OLD), reservoir)
    with pytest.raises(StateError, match="another bundle"):
        TokenReservoir.load(
            legacy, "bundle-new", 4, L, D, LAYERS, labels=OLD, engine_fingerprint="engine-1"
        )


def test_state_of_another_engine_is_refused(tmp_path) -> None:
    path = tmp_path / "r.npz"
    _filled(OLD).save(path, "bundle-old", OLD, "engine-1")
    with pytest.raises(StateError, match="another bundle"):
        TokenReservoir.load(
            path, "bundle-new", 5, L, D, LAYERS, labels=NEW, engine_fingerprint="engine-2"
        )


def test_select_classes_never_moves_one_class_to_two() -> None:
    reservoir = _filled(OLD)
    with pytest.raises(ValueError, match="one class only"):
        reservoir.select_classes([0, 0])
    with pytest.raises(UserError, match="capacity 3"):
        reservoir.select_classes([0, 1, 2, None], anchor_rows=3)


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_rail_predictor_follows_names(form) -> None:
    rng = np.random.default_rng(1)
    mask = np.array([True, False, True, True])
    features = rng.standard_normal((3, 6))
    if form == "primal":
        predictor = PrimalPredictor(None, rng.standard_normal((6, 4)).astype(np.float32), mask)
    else:
        predictor = DualPredictor(
            rng.standard_normal((5, 6)), rng.standard_normal((5, 4)), 0.5, mask
        )
    moved = follow_labels(predictor, OLD, NEW)
    before, after = predictor.predict(features), moved.predict(features)
    for i, source in enumerate(label_sources(OLD, NEW)):
        if source is None:
            assert not after[:, i].any() and not moved.learned_mask[i]
        else:
            np.testing.assert_array_equal(after[:, i], before[:, source])
            assert moved.learned_mask[i] == mask[source]
    with pytest.raises(StateError, match="none of the 3 classes it learned"):
        follow_labels(predictor, OLD, [("d", "dog"), ("d", "owl")])


class _Backend:
    description = "fake"

    def __init__(self, bundle: Bundle) -> None:
        outputs = bundle.engine_io("outputs")
        self.embed = outputs["embedding"]["shape"][1]
        _, self.layers, self.width = outputs["cls_per_layer"]["shape"]
        self.rng = np.random.default_rng(0)
        self.anchors: list[np.ndarray] = []

    def set_anchors(self, anchors, valid) -> None:
        self.anchors.append(np.array(anchors))

    def update_anchor_rows(self, anchors, valid, rows) -> None:
        self.set_anchors(anchors, valid)

    def infer(self, image):
        embedding = self.rng.standard_normal((1, self.embed)).astype(np.float32)
        embedding /= np.linalg.norm(embedding)
        cls = self.rng.standard_normal((1, self.layers, self.width)).astype(np.float32)
        return {"embedding": embedding, "cls_per_layer": cls}


def test_live_pipeline_takes_new_classes_between_frames(tmp_path) -> None:
    bundle = Bundle.open(make_bundle(tmp_path / "b", method="tca+rail"))
    backend = _Backend(bundle)
    rng = np.random.default_rng(2)
    weights = rng.standard_normal((bundle.text_embeddings.shape[1], bundle.num_classes))
    fusion = RailFusion(
        PrimalPredictor(None, weights.astype(np.float32), np.ones(bundle.num_classes, bool))
    )
    pipeline = Pipeline(bundle, backend, "tca+rail", fusion=fusion)
    size = pipeline.preprocessor.size
    for index in range(30):
        pipeline.process_tensor(rng.standard_normal((3, *size)).astype(np.float32), index)
    old_labels, old = bundle.labels, pipeline.reservoir
    names = ["bus", "zebra", "cat"]
    domains = ["vehicles", "animals", "animals"]
    text = rng.standard_normal((3, bundle.text_embeddings.shape[1])).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    with pytest.raises(UserError, match="7 classes exceed the engine's class capacity of 6"):
        pipeline.set_classes(
            [f"c{i}" for i in range(7)], np.zeros((7, text.shape[1])), ["animals"] * 7
        )
    assert pipeline.reservoir is old and pipeline.bundle is bundle  # nothing changed
    pipeline.set_classes(names, text, domains)
    new_labels = list(zip(domains, names, strict=True))
    _same(pipeline.reservoir, _by_hand(old, old_labels, new_labels))
    assert pipeline.fusion.adapter.learned_mask.tolist() == [True, False, True]
    assert backend.anchors[-1].shape[0] == 6  # the whole capacity is pushed to the engine
    result = pipeline.process_tensor(rng.standard_normal((3, *size)).astype(np.float32), 99)
    assert result.class_name in names and len(result.scores) == 3
    assert pipeline.bundle.labels == new_labels
    assert pipeline.bundle.domains == ["vehicles", "animals"]


def test_rail_state_file_follows_names_or_is_refused(tmp_path) -> None:
    from vlm_export.core.labels import labels_meta
    from vlm_export.runtime.rail.models import load_predictor
    from vlm_export.runtime.rail.state import save_inference_state

    rng = np.random.default_rng(4)
    mask = np.array([True, True, False, True])
    predictor = PrimalPredictor(None, rng.standard_normal((6, 4)).astype(np.float32), mask)
    path, legacy = tmp_path / "rail.npz", tmp_path / "legacy.npz"
    save_inference_state(path, predictor, "bundle-old", labels_meta("engine-1", OLD))
    save_inference_state(legacy, predictor, "bundle-old")
    moved = load_predictor(path, "bundle-new", NEW, "engine-1")
    np.testing.assert_array_equal(moved.weights, follow_labels(predictor, OLD, NEW).weights)
    assert moved.learned_mask.tolist() == [False, False, True, False, False]
    same = load_predictor(path, "bundle-old", OLD, "engine-1")
    np.testing.assert_array_equal(same.weights, predictor.weights)
    with pytest.raises(StateError, match="another bundle"):
        load_predictor(path, "bundle-new", NEW, "engine-2")
    with pytest.raises(StateError, match="another bundle"):
        load_predictor(legacy, "bundle-new", NEW, "engine-1")


def _unit(rows: int, width: int, seed: int = 0) -> np.ndarray:
    text = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    return text / np.linalg.norm(text, axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("names", "change", "message"),
    [
        (["cat", "dog"], lambda t: np.full_like(t, np.nan), "NaN or infinite"),
        (["cat", "dog"], lambda t: np.zeros_like(t), "row 0 is all zeros"),
        (["cat", "dog"], lambda t: t[:1], r"must be \[2, \d+\]"),
        (["cat", "dog"], lambda t: t[:, :3], r"must be \[2, \d+\]"),
        (["cat", "dog"], lambda t: t.ravel(), r"must be \[2, \d+\]"),
        (["cat", "dog"], lambda t: [["a"] * t.shape[1]] * 2, "array of real numbers"),
        ("cat", lambda t: t[:1], "give a list of class names, got str"),
        (["cat", ""], lambda t: t, "class name 2 is not a non-empty string"),
        (["cat", 2], lambda t: t, "class name 2 is not a non-empty string"),
        (["cat", "x" * 1001], lambda t: t, "1,001 characters"),
        (["cat", "ca\x00t"], lambda t: t, "control or invisible characters"),
        (["cat", "Cat"], lambda t: t, "'Cat' is given twice in domain"),
        (["red_fox", "red fox"], lambda t: t, "'red fox' is given twice in domain"),
        (["cafe\u0301", "caf\u00e9"], lambda t: t, "is given twice in domain"),
        (["cat", "dog"], lambda t: t.astype(complex), "real numbers, got complex128"),
    ],
)
def test_set_classes_refuses_bad_names_and_embeddings_and_changes_nothing(
    tmp_path, names, change, message
) -> None:
    bundle = Bundle.open(make_bundle(tmp_path / "b", method="tca"))
    pipeline = Pipeline(bundle, _Backend(bundle), "tca")
    text = change(_unit(2, bundle.text_embeddings.shape[1]))
    with pytest.raises(UserError, match=message):
        pipeline.set_classes(names, text, ["animals"] * 2)
    assert pipeline.bundle is bundle


def test_set_classes_normalises_rows_and_keeps_unit_rows_bit_for_bit(tmp_path) -> None:
    bundle = Bundle.open(make_bundle(tmp_path / "b", method="tca"))
    pipeline = Pipeline(bundle, _Backend(bundle), "tca")
    text = _unit(2, bundle.text_embeddings.shape[1])
    scaled = text.copy()
    scaled[1] *= 10.0
    pipeline.set_classes(["cat", "dog"], scaled, ["animals"] * 2)
    held = pipeline.bundle.text_embeddings
    assert np.array_equal(held[0], text[0])  # already of unit length: kept as given
    assert np.allclose(held[1], text[1], atol=1e-7)
    with pytest.raises(UserError, match="give one domain per class: 1 for 2 classes"):
        pipeline.set_classes(["cat", "dog"], text, ["animals"])
    for domains in (["animals", None], ["animals", ""], ["animals", "\u200b"], [1, 2]):
        with pytest.raises(UserError, match="is not a domain name"):
            pipeline.set_classes(["cat", "dog"], text, domains)
    huge = np.full_like(text, 1e308, dtype=np.float64)  # its norm overflows float64
    pipeline.set_classes(["cat", "dog"], huge, ["animals"] * 2)
    assert np.allclose(np.linalg.norm(pipeline.bundle.text_embeddings, axis=1), 1.0)
