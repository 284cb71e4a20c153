"""Bundle loading: validation of manifest, files, embeddings and classes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle

from vlm_export.runtime import manifest as mf
from vlm_export.runtime.bundle import Bundle, UntrainedWeightsWarning
from vlm_export.runtime.errors import BundleError, UserError


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture
def copy(tmp_path: Path, bundle_dir: Path) -> Path:
    import shutil

    return Path(shutil.copytree(bundle_dir, tmp_path / "copy"))


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / mf.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_open_reads_everything(bundle_dir: Path) -> None:
    bundle = Bundle.open(bundle_dir)
    assert bundle.classes == ["cat", "dog", "bird", "car", "bus", "train"]
    assert bundle.class_domains == ["animals"] * 3 + ["vehicles"] * 3
    assert bundle.domains == ["animals", "vehicles"]
    assert bundle.text_embeddings.shape == (6, 8)
    assert bundle.text_embeddings.dtype == np.float32
    assert bundle.text_embeddings.flags.c_contiguous
    assert bundle.fingerprint == mf.bundle_fingerprint(bundle.manifest)
    assert not bundle.untrained
    assert bundle.method == "tca"
    assert bundle.onnx_path == bundle_dir / mf.IMAGE_ENCODER_ONNX
    np.testing.assert_array_equal(bundle.domain_class_indices("vehicles"), [3, 4, 5])
    with pytest.raises(BundleError, match="no domain 'plants'"):
        bundle.domain_class_indices("plants")


def test_untrained_bundle_warns(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path / "u", method="zeroshot", untrained=True)
    with pytest.warns(UntrainedWeightsWarning, match="meaningless"):
        bundle = Bundle.open(folder)
    assert bundle.untrained


def test_trained_bundle_does_not_warn(bundle_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Bundle.open(bundle_dir)


def test_missing_folder_and_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        Bundle.open(tmp_path / "nope")
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.open(tmp_path)
    (tmp_path / mf.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(tmp_path)
    (tmp_path / mf.MANIFEST_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BundleError, match="not a vlm-export bundle"):
        Bundle.open(tmp_path)


def test_missing_file(copy: Path) -> None:
    (copy / mf.TEXT_EMBEDDINGS).unlink()
    with pytest.raises(BundleError, match="missing: text_embeddings.npy"):
        Bundle.open(copy)


def test_truncated_file(copy: Path) -> None:
    data = (copy / mf.IMAGE_ENCODER_ONNX).read_bytes()
    (copy / mf.IMAGE_ENCODER_ONNX).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated"):
        Bundle.open(copy)


def test_tampered_file(copy: Path) -> None:
    path = copy / mf.CLASSES_FILE
    path.write_text(path.read_text().replace("cat", "cow"))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(copy)
    # without verification the tampered (but well-formed) file is read as is
    assert Bundle.open(copy, verify=False).classes[0] == "cow"


def test_newer_schema(copy: Path) -> None:
    _edit_manifest(copy, lambda m: m.update(schema_version=mf.SCHEMA_VERSION + 1))
    with pytest.raises(BundleError, match="newer than this runtime"):
        Bundle.open(copy)


def test_unlisted_core_file(copy: Path) -> None:
    _edit_manifest(copy, lambda m: m["files"].pop(mf.TEXT_EMBEDDINGS))
    with pytest.raises(BundleError, match="does not list"):
        Bundle.open(copy)


def test_embedding_shape_mismatch(copy: Path) -> None:
    _edit_manifest(copy, lambda m: m["text"].update(shape=[7, 8]))
    with pytest.raises(BundleError, match=r"shape \[6, 8\], manifest says \[7, 8\]"):
        Bundle.open(copy)


def test_pickled_embeddings_refused(copy: Path) -> None:
    path = copy / mf.TEXT_EMBEDDINGS
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BundleError, match="not a readable .npy"):
        Bundle.open(copy, verify=False)


def test_class_in_undeclared_domain(copy: Path) -> None:
    path = copy / mf.CLASSES_FILE
    data = json.loads(path.read_text())
    data["classes"][0]["domain"] = "plants"
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="undeclared domains: plants"):
        Bundle.open(copy, verify=False)


def test_bundle_errors_are_user_errors() -> None:
    assert issubclass(BundleError, UserError)
