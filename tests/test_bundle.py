"""Bundle loading: validation of manifest, files, embeddings and classes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle

from vlm_export.core import manifest as mf
from vlm_export.core.errors import BundleError, UserError
from vlm_export.runtime.bundle import Bundle


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


def test_untrained_bundle_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = make_bundle(tmp_path / "u", method="zeroshot", untrained=True)
    with caplog.at_level(logging.WARNING, logger="vlm_export"):
        bundle = Bundle.open(folder)
    assert bundle.untrained
    [record] = caplog.records
    assert record.name == "vlm_export.runtime.bundle" and record.levelno == logging.WARNING
    assert "UNTRAINED" in record.getMessage() and "meaningless" in record.getMessage()


def test_trained_bundle_does_not_warn(bundle_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="vlm_export"):
        Bundle.open(bundle_dir)
    assert not caplog.records


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


def test_embedding_shape_mismatch(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path / "z", method="zeroshot")

    def edit(manifest: dict) -> None:
        manifest["text"]["shape"] = [7, 8]
        manifest["labels"]["num_classes"] = 7  # a consistent manifest; the .npy disagrees

    _edit_manifest(folder, edit)
    with pytest.raises(BundleError, match=r"shape \[6, 8\], manifest says \[7, 8\]"):
        Bundle.open(folder)


def test_pickled_embeddings_refused(copy: Path) -> None:
    path = copy / mf.TEXT_EMBEDDINGS
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BundleError, match="has dtype object, expected float32"):
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


def _set(path: str | tuple, value):
    """An edit that sets manifest[a][b]... = value (path "a.b.0.c" or a tuple; "-" deletes it)."""

    def edit(manifest: dict) -> None:
        *parents, last = path.split(".") if isinstance(path, str) else path
        node = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if value == "-":
            del node[key]
        else:
            node[key] = value

    return edit


def _add_file(name: str):
    def edit(manifest: dict) -> None:
        manifest["files"][name] = dict(manifest["files"][mf.CLASSES_FILE])

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _set(("files", mf.IMAGE_ENCODER_ONNX), [1]),
            "files.image_encoder.onnx: expected a file record (object), got a list",
        ),
        (
            _set(("files", mf.CLASSES_FILE, "sha256"), 5),
            "files.classes.json.sha256: expected a string, got 5",
        ),
        (
            _set(("files", mf.CLASSES_FILE, "bytes"), "120"),
            "bytes: expected an integer, got the string '120'",
        ),
        (
            _set(("files", mf.CLASSES_FILE, "bytes"), "-"),
            "files.classes.json: missing field 'bytes'",
        ),
        (_add_file(f"../copy/{mf.CLASSES_FILE}"), "files: expected a plain file name inside"),
        (_add_file("sub/x.json"), "got the string 'sub/x.json'"),
        (_add_file(".."), "expected a plain file name"),
        (
            _set("engines", [{"file": "../other.engine"}]),
            "engines[0].file: expected a plain file name",
        ),
        (_set("text", []), "text: expected an object, got a list"),
        (_set("engine.batch_size", 0), "engine.batch_size: expected a number >= 1, got 0"),
        (
            _set("engine.batch_size", "1"),
            "engine.batch_size: expected an integer, got the string '1'",
        ),
        (_set("engine.batch_size", True), "engine.batch_size: expected an integer, got true"),
        (
            _set("engine.inputs", {"image": [1, 3, 32, 32]}),
            "engine.inputs: expected a list, got an object",
        ),
        (
            _set("engine.inputs.0.shape", [1, 3, -32, 32]),
            "engine.inputs[0].shape[2]: expected a number >= 1, got -32",
        ),
        (
            _set("engine.inputs.0.shape", "1x3x32x32"),
            "engine.inputs[0].shape: expected a list, got the string",
        ),
        (_set("engine.outputs.0.name", 3), "engine.outputs[0].name: expected a string, got 3"),
        (_set("engine.outputs.0.dtype", "-"), "engine.outputs[0]: missing field 'dtype'"),
        (_set("engine.inputs.0.shape", [1, 3, 16, 16]), "'image' has shape [1, 3, 16, 16]"),
        (_set("text.shape", [6, 9]), "does not fit embedding"),
        (_set("labels.num_classes", 5), "num_classes is 5, text.shape has 6 rows"),
        (_set("labels.num_classes", "-"), "labels.num_classes None is not a positive integer"),
        (
            _set("condensation.anchor_layers", "0,1"),
            "condensation.anchor_layers: expected a list, got the string '0,1'",
        ),
        (_set("condensation.reduction_layers", "-"), "reduction_layers None is not a list"),
        (_set("condensation.anchor_layers", [0]), "1 anchor_layers for 2 reduction_layers"),
        (_set("condensation.anchor_layers", [0, 4]), "anchor_layers [4] are outside the 4 rows"),
        (_set("engine.inputs.1.shape", [5, 2, 16]), "'anchors' has shape [5, 2, 16], expected"),
        (_set("engine.inputs.2", "-"), "no 'anchors_valid' tensor"),
        (_set("engine.outputs.1.shape", [1, 4, 12]), "expected [6, 2, 12]"),
        (_set("engine.outputs.1", "-"), "output 'cls_per_layer' has shape None"),
        (_set("engine.outputs.2.shape", [1, 3, 16]), "'token_fate' has shape [1, 3, 16]"),
    ],
)
def test_inconsistent_manifest_is_a_bundle_error(copy: Path, edit, message: str) -> None:
    _edit_manifest(copy, edit)
    with pytest.raises(BundleError) as caught:
        Bundle.open(copy)
    assert message in str(caught.value)


def test_manifest_field_types_are_checked_on_read(copy: Path) -> None:
    # read_manifest (also used by the engine tools) checks types, not the runtime contract
    _edit_manifest(copy, _set("engine.batch_size", -1))
    with pytest.raises(BundleError, match="batch_size: expected a number >= 1, got -1"):
        mf.read_manifest(copy)
    _edit_manifest(copy, _set("engine.batch_size", 1))
    _edit_manifest(copy, _set("condensation.anchor_layers", "-"))
    assert "anchor_layers" not in mf.read_manifest(copy)["condensation"]
    with pytest.raises(BundleError, match="anchor_layers None"):
        mf.validate_runtime_contract(mf.read_manifest(copy))


def test_plain_names() -> None:
    for name in ("image_encoder.onnx", "a.b.engine", "classes.json"):
        assert mf.is_plain_name(name)
    for name in ("", ".", "..", "../x", "a/b", "/abs", "C:x.onnx", "a\\b", "x..y", 3, None):
        assert not mf.is_plain_name(name)


def test_engine_io_names_are_the_manifest_contract(bundle_dir: Path) -> None:
    bundle = Bundle.open(bundle_dir)
    assert list(bundle.engine_io("inputs")) == [
        mf.IMAGE_INPUT,
        mf.ANCHORS_INPUT,
        mf.ANCHORS_VALID_INPUT,
    ]
    assert list(bundle.engine_io("outputs")) == [mf.EMBEDDING_OUTPUT, mf.CLS_OUTPUT, mf.FATE_OUTPUT]
