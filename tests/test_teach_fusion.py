"""TeachFusion: the spec's RAIL-Fusion when the taught predictor is unsure, taught classes that
zero-shot cannot name win on frames like their examples, and unknown examples lower the scores."""

from __future__ import annotations

import numpy as np
import pytest

from vlm_export.runtime.numerics import softmax
from vlm_export.runtime.rail.fusion import fuse
from vlm_export.runtime.teach.examples import UNKNOWN, Example, new_id
from vlm_export.runtime.teach.fusion import TEACH_GATE, TeachFusion
from vlm_export.runtime.teach.learner import TeachLearner

DIM, HIDDEN = 512, 1024
CLASSES = [("site", "cat"), ("site", "dog"), ("site", "truck"), ("site", "line 3 jam")]


def unit(rows):
    rows = np.asarray(rows, np.float64)
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def world():
    """Text embeddings of 4 classes, and image clusters: cat and dog images lie near their
    text; 'line 3 jam' images look like trucks to zero-shot, 'unknown' ones like dogs."""
    rng = np.random.default_rng(0)
    text = unit(rng.standard_normal((len(CLASSES), DIM)))
    centers = {
        "cat": text[0],
        "dog": text[1],
        "line 3 jam": unit(0.6 * text[2] + 0.8 * unit(rng.standard_normal(DIM))),
        UNKNOWN: unit(0.6 * text[1] + 0.8 * unit(rng.standard_normal(DIM))),
    }
    taught = []
    for label, center in centers.items():
        for vector in unit(center + 0.01 * rng.standard_normal((8, DIM))):
            taught.append(Example(new_id(), label, "cam", "2026-01-01T00:00:00Z", vector))
    learner = TeachLearner.fit(taught, DIM, HIDDEN)
    return text, taught, learner


def logits_of(text, embedding):
    return (100.0 * unit(embedding) @ text.T).astype(np.float32)


def test_equals_spec_fusion_when_the_predictor_is_unsure(world):
    text, _, learner = world
    fusion = TeachFusion(learner.predictor(), CLASSES)
    rng = np.random.default_rng(1)
    frames = unit(rng.standard_normal((40, DIM)))
    checked = 0
    for frame in frames:
        outputs = learner.predictor().predict(frame[None])[0]
        if outputs.max() >= TEACH_GATE:
            continue
        logits = logits_of(text, frame)
        columns = [
            learner.labels.index(name) if name in learner.labels else -1 for _, name in CLASSES
        ]
        adapter = np.array([outputs[c] if c >= 0 else 0.0 for c in columns], np.float32)
        mask = np.array([c >= 0 for c in columns])
        np.testing.assert_array_equal(
            fusion.fused_scores(logits, frame), fuse(logits, adapter, mask, 0.8)
        )
        checked += 1
    assert checked >= 30
    assert fusion.learned_mask.tolist() == [True, True, False, True]


def test_a_class_zero_shot_cannot_read_wins_on_its_examples(world):
    text, taught, learner = world
    fusion = TeachFusion(learner.predictor(), CLASSES)
    jam = [e for e in taught if e.label == "line 3 jam"]
    for example in jam:
        logits = logits_of(text, example.embedding)
        assert softmax(logits).argmax() == 2  # zero-shot alone says truck
        scores = fusion.fused_scores(logits, example.embedding)
        assert scores.argmax() == 3 and scores[3] > 0.5


def test_unknown_examples_push_the_top_score_below_min_score(world):
    text, taught, learner = world
    fusion = TeachFusion(learner.predictor(), CLASSES)
    unknown = [e for e in taught if e.label == UNKNOWN]
    plain = [softmax(logits_of(text, e.embedding)).max() for e in unknown]
    fused = [fusion.fused_scores(logits_of(text, e.embedding), e.embedding).max() for e in unknown]
    assert min(plain) > 0.5  # zero-shot alone is confident about something
    assert max(fused) < 0.3  # a min_score of 0.3 rejects every one of them
    # without the unknown examples the frames are not rejected
    others = TeachLearner.fit([e for e in taught if e.label != UNKNOWN], DIM, HIDDEN)
    without = TeachFusion(others.predictor(), CLASSES)
    assert (
        max(without.fused_scores(logits_of(text, e.embedding), e.embedding).max() for e in unknown)
        > 0.3
    )


def test_for_labels_follows_names(world):
    text, taught, learner = world
    fusion = TeachFusion(learner.predictor(), CLASSES)
    new = [("site", "line 3 jam"), ("site", "cat"), ("site", "horse")]
    moved = fusion.for_labels(CLASSES, new)
    assert moved.learned_mask.tolist() == [True, True, False]
    example = next(e for e in taught if e.label == "line 3 jam")
    logits = logits_of(text[[3, 0, 2]], example.embedding)
    assert moved.fused_scores(logits, example.embedding).argmax() == 0


def test_nothing_taught_is_zero_shot(world):
    text, _, _ = world
    empty = TeachLearner(DIM, HIDDEN).predictor()
    fusion = TeachFusion(empty, CLASSES)
    frame = unit(np.random.default_rng(3).standard_normal(DIM))
    logits = logits_of(text, frame)
    np.testing.assert_array_equal(fusion.fused_scores(logits, frame), softmax(logits))


def test_in_the_pipeline_a_taught_class_and_unknown_frames(tmp_path):
    """Through Pipeline on a real (fake) bundle: set_classes adds the taught class (for_labels
    follows it by name), its frames are decided as it, unknown frames fall below min_score."""
    from fakebundle import make_bundle, write_images

    from vlm_export.runtime.bundle import Bundle
    from vlm_export.runtime.engines.factory import open_backend
    from vlm_export.runtime.pipeline import Pipeline

    bundle = Bundle.open(make_bundle(tmp_path / "bundle", method="zeroshot"))
    images = write_images(tmp_path / "images", 8)
    backend = open_backend(bundle, "onnxruntime")
    plain = Pipeline(bundle, backend, "zeroshot")
    embeddings = [plain.process(path).embedding for path in images]
    dim = bundle.text_embeddings.shape[1]
    taught = [
        Example(new_id(), "line 3 jam" if i < 4 else UNKNOWN, "cam", "t", embeddings[i])
        for i in range(8)
    ]
    learner = TeachLearner.fit(taught, dim, 256)
    fusion = TeachFusion(learner.predictor(), bundle.labels)
    pipeline = Pipeline(bundle, backend, "rail", fusion=fusion, min_score=0.3)
    text = np.random.default_rng(5).standard_normal(dim)
    pipeline.set_classes(
        [*bundle.classes, "line 3 jam"],
        np.vstack([bundle.text_embeddings, unit(text)[None]]),
        [*bundle.class_domains, bundle.domains[0]],
    )
    for index in range(4):
        assert pipeline.process(images[index]).class_name == "line 3 jam"
    for index in range(4, 8):
        result = pipeline.process(images[index])
        assert result.unknown and result.score < 0.3
    backend.close()
