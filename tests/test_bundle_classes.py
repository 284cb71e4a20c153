"""Replacing a bundle's label space on disk: all or nothing, hashes and manifest consistent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle

from vlm_export.core.atomic import WriteError
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.text import bundle_classes
from vlm_export.runtime.text.label_space import LabelSpace


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of the folder by name, with its bytes (hidden temporaries included)."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _space(bundle: Bundle, names: list[str]) -> LabelSpace:
    rng = np.random.default_rng(len(names))
    text = rng.standard_normal((len(names), bundle.text_embeddings.shape[1])).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    labels = [("animals", name) for name in names]
    return LabelSpace(labels, ["animals"], text, ("a photo of a {}.",), "single", len(names))


def test_new_label_space_is_written_and_opens(tmp_path) -> None:
    folder = make_bundle(tmp_path / "b", method="zeroshot")
    bundle = Bundle.open(folder)
    space = _space(bundle, ["owl", "fox", "cat", "eel", "ant", "bee", "emu", "elk"])
    manifest = bundle_classes.write_label_space(bundle, space)
    reopened = Bundle.open(folder)  # verifies every sha256
    assert reopened.labels == space.labels and reopened.domains == ["animals"]
    np.testing.assert_array_equal(reopened.text_embeddings, space.text_embeddings)
    assert manifest["text"]["template_strings"] == ["a photo of a {}."]
    assert manifest["labels"]["num_classes"] == 8
    listed = set(manifest["files"]) | {"manifest.json"}
    assert {p.name for p in folder.iterdir()} == listed, "old files removed, no leftovers"
    assert reopened.engine_fingerprint == bundle.engine_fingerprint
    assert reopened.fingerprint != bundle.fingerprint


@pytest.mark.parametrize("failing", ["text_embeddings", "classes", "manifest.json"])
def test_a_failed_write_leaves_the_bundle_byte_identical(tmp_path, monkeypatch, failing) -> None:
    folder = make_bundle(tmp_path / "b", method="tca")
    before = snapshot(folder)
    bundle = Bundle.open(folder)
    real = bundle_classes.atomic_write_bytes

    def flaky(path, data):
        if Path(path).name.startswith(failing):
            raise WriteError(f"cannot write {path}: No space left on device")
        real(path, data)

    monkeypatch.setattr(bundle_classes, "atomic_write_bytes", flaky)
    with pytest.raises(WriteError):
        bundle_classes.write_label_space(bundle, _space(bundle, ["owl", "fox"]))
    assert snapshot(folder) == before


def test_a_bundle_changed_meanwhile_is_not_overwritten(tmp_path) -> None:
    folder = make_bundle(tmp_path / "b", method="zeroshot")
    bundle = Bundle.open(folder)
    first = _space(bundle, ["owl", "fox"])
    bundle_classes.write_label_space(bundle, first)
    after_first = snapshot(folder)
    with pytest.raises(Exception, match="changed while"):
        bundle_classes.write_label_space(bundle, _space(bundle, ["eel"]))
    assert snapshot(folder) == after_first


def test_new_labels_replace_one_domain_of_several(tmp_path) -> None:
    from vlm_export.core.errors import UserError
    from vlm_export.runtime.text.label_space import new_labels

    bundle = Bundle.open(make_bundle(tmp_path / "b", method="rail"))
    animals = [("animals", name) for name in ("cat", "dog", "bird")]
    labels, domains = new_labels(bundle, ["tram", "cat"], "vehicles")
    assert labels == [*animals, ("vehicles", "tram"), ("vehicles", "cat")]
    assert domains == ["animals", "vehicles"]
    labels, domains = new_labels(bundle, ["fern"], "plants")
    assert labels == [*bundle.labels, ("plants", "fern")] and domains[-1] == "plants"
    with pytest.raises(UserError, match="has domains animals, vehicles"):
        new_labels(bundle, ["fern"])
    with pytest.raises(UserError, match="may hold only"):
        new_labels(bundle, ["fern"], "a/b")
