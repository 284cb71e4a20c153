"""The Python API's teaching: ``pipeline.teach(image, label)``, ``forget(id)``, ``examples()``
on an opened pipeline, checked against a fresh learner on the stored examples."""

from __future__ import annotations

import numpy as np
import pytest
from fakebundle import make_bundle, write_images

from vlm_export.core.errors import UserError
from vlm_export.runtime import open_pipeline
from vlm_export.runtime.teach.learner import TeachLearner


def _tinted(color: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(-30, 30, (40, 40, 3))
    return np.clip(np.array(color)[None, None, :] + noise, 0, 255).astype(np.uint8)


def test_teach_forget_and_examples(tmp_path) -> None:
    bundle = make_bundle(tmp_path / "bundle", method="tca")
    database = tmp_path / "examples.sqlite"
    with open_pipeline(bundle, examples=database) as pipeline:
        ids = [
            pipeline.teach(_tinted((220, 30, 30), seed), "bus", channels="RGB") for seed in range(3)
        ] + [pipeline.teach(_tinted((30, 30, 220), 9), "unknown", channels="RGB")]
        assert [e.label for e in pipeline.examples()].count("bus") == 3
        decided = pipeline.classify(_tinted((220, 30, 30), 7), channels="RGB")
        assert decided.class_name == "bus"
        assert pipeline.forget(ids[0]) and not pipeline.forget(ids[0])
        teaching = pipeline._teaching
        fresh = TeachLearner.fit(teaching.store.all(), teaching.dim, teaching.learner.hidden_dim)
        assert teaching.learner.ids == fresh.ids == sorted(ids[1:])
        scale = np.abs(fresh.weights).max()
        assert np.abs(teaching.learner.weights - fresh.weights).max() <= 1e-9 * scale
        with pytest.raises(UserError, match="control"):
            pipeline.teach(write_images(tmp_path / "img", 1)[0], "a\nb")
    with open_pipeline(bundle, examples=database) as again:  # kept in the database
        assert sorted(e.id for e in again.examples()) == sorted(ids[1:])
    with pytest.raises(UserError, match="closed"):
        again.teach(_tinted((1, 2, 3), 0), "bus", channels="RGB")


def test_stored_labels_meet_the_classes_when_the_database_opens(tmp_path, caplog) -> None:
    """A stored label in another spelling of a class takes the class's ("Bus" is "bus"), and a
    label that is no class on a bundle without a text engine is learned but not decided (one
    warning), never a refusal to open."""
    from vlm_export.runtime.bundle import Bundle
    from vlm_export.runtime.teach.examples import Example, check_embedding, new_id
    from vlm_export.runtime.teach.store import ExampleStore

    bundle = make_bundle(tmp_path / "bundle", method="tca")
    opened = Bundle.open(bundle)
    database = tmp_path / "examples.sqlite"
    dim = opened.text_embeddings.shape[1]
    store = ExampleStore.open(database, opened.engine_fingerprint, dim)
    bus = opened.classes.index("bus")
    for seed, label in enumerate(["Bus", "Bus", "forklift"]):
        vector = opened.text_embeddings[bus] + 0.1 * np.random.default_rng(seed).standard_normal(
            dim
        )
        store.add(
            Example(new_id(), label, "cam", "2026-01-01T00:00:00Z", check_embedding(vector, dim))
        )
    store.close()
    with caplog.at_level("WARNING"), open_pipeline(bundle, examples=database) as pipeline:
        assert sorted(e.label for e in pipeline.examples()) == ["bus", "bus", "forklift"]
        assert "examples of 'forklift' are not decided" in caplog.text
        assert pipeline._teaching.learner.num_samples == 3
        assert "forklift" not in pipeline.bundle.classes


def test_stored_examples_decide_from_the_first_frame_after_a_restart(tmp_path) -> None:
    """A camera program that only classifies: after a restart the examples in the database
    decide its first frame, as they did before it stopped; a file that is no database is
    refused when the pipeline opens, not at the first teach."""
    bundle = make_bundle(tmp_path / "bundle", method="tca")
    database = tmp_path / "examples.sqlite"
    red = _tinted((220, 30, 30), 7)
    with open_pipeline(bundle, examples=database) as pipeline:
        for seed in range(3):
            pipeline.teach(_tinted((220, 30, 30), seed), "bus", channels="RGB")
        before = pipeline.classify(red, channels="RGB")
    assert before.class_name == "bus"
    with open_pipeline(bundle, examples=database) as again:
        after = again.classify(red, channels="RGB")  # nothing else called first
    assert after.class_name == "bus" and after.scores.tolist() == before.scores.tolist()
    (tmp_path / "garbage.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(UserError, match="not a readable example database"):
        open_pipeline(bundle, examples=tmp_path / "garbage.sqlite")
