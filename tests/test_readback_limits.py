"""What the tool writes, it can read back: the label-space writer checks names, classes.json and
manifest.json against the loader's own limits before writing anything, and says so in one line
that never echoes an unbounded user string."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle
from test_bundle_classes import snapshot

from vlm_export.core import manifest as mf
from vlm_export.core.errors import BundleError
from vlm_export.core.labels import MAX_NAME_CHARS
from vlm_export.runtime import bundle as bundle_module
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.cli import main
from vlm_export.runtime.text import bundle_classes
from vlm_export.runtime.text.class_lists import (
    ClassListError,
    parse_domain_args,
    read_class_list,
)
from vlm_export.runtime.text.label_space import LabelSpace

LINE = 300  # no message line is longer than this (user strings cut to 80 characters)


def _space(bundle: Bundle, names: list[str]) -> LabelSpace:
    text = np.eye(len(names), bundle.text_embeddings.shape[1], dtype=np.float32)
    labels = [("animals", name) for name in names]
    return LabelSpace(labels, ["animals"], text, ("a {}.",), "one", len(names))


@pytest.mark.parametrize("size", [MAX_NAME_CHARS + 1, 5_000_000])
@pytest.mark.parametrize("suffix", [".txt", ".json"])
def test_a_class_name_over_the_limit_is_one_line_and_nothing_changes(
    tmp_path, capsys, size, suffix
) -> None:
    folder = make_bundle(tmp_path / "b", method="tca")
    before = snapshot(folder)
    names = ["cat", "x" * size, "dog"]
    path = tmp_path / f"big{suffix}"
    path.write_text(json.dumps(names) if suffix == ".json" else "\n".join(names))
    assert main(["classes", str(folder), str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and len(err[0]) < LINE, err
    assert "class name 2" in err[0] and f"{size:,} characters" in err[0] and "..." in err[0]
    assert snapshot(folder) == before


def test_a_name_at_the_limit_is_written_and_read_back(tmp_path) -> None:
    folder = make_bundle(tmp_path / "b", method="zeroshot")
    longest = "y" * MAX_NAME_CHARS
    bundle_classes.write_label_space(Bundle.open(folder), _space(Bundle.open(folder), [longest]))
    assert list(Bundle.open(folder, verify=True).classes) == [longest]
    assert read_class_list(_list(tmp_path, [longest])) == [longest]


def _list(tmp_path: Path, names: list[str]) -> Path:
    path = tmp_path / "names.json"
    path.write_text(json.dumps(names))
    return path


def test_the_loader_refuses_a_name_over_the_limit(tmp_path) -> None:
    folder = make_bundle(tmp_path / "b", method="zeroshot")
    classes = json.loads((folder / mf.CLASSES_FILE).read_text())
    classes["classes"][0]["name"] = "z" * (MAX_NAME_CHARS + 1)
    (folder / mf.CLASSES_FILE).write_text(json.dumps(classes))
    manifest = mf.read_manifest(folder)
    manifest["files"][mf.CLASSES_FILE] = mf.file_record(folder / mf.CLASSES_FILE)
    (folder / mf.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="more than") as error:
        Bundle.open(folder)
    assert len(str(error.value)) < LINE


def test_the_writer_and_the_loader_share_the_classes_json_limit(tmp_path, monkeypatch) -> None:
    """classes.json one byte over the (lowered) loader limit: refused, the bundle unchanged;
    exactly at it: written, and the loader with that limit reads it back."""
    folder = make_bundle(tmp_path / "b", method="zeroshot")
    names = [f"class number {i}" for i in range(40)]
    size = len(bundle_classes.classes_bytes([("animals", n) for n in names], ["animals"]))
    before = snapshot(folder)
    for module in (bundle_module, bundle_classes):
        monkeypatch.setattr(module, "MAX_CLASSES_BYTES", size - 1)
    bundle = Bundle.open(folder)
    with pytest.raises(ClassListError, match="nothing was changed"):
        bundle_classes.write_label_space(bundle, _space(bundle, names))
    assert snapshot(folder) == before
    for module in (bundle_module, bundle_classes):
        monkeypatch.setattr(module, "MAX_CLASSES_BYTES", size)
    bundle_classes.write_label_space(bundle, _space(bundle, names))
    assert list(Bundle.open(folder, verify=True).classes) == names


def test_a_manifest_over_the_loader_limit_is_never_written(tmp_path, monkeypatch) -> None:
    folder = make_bundle(tmp_path / "b", method="zeroshot")
    trial = Path(shutil.copytree(folder, tmp_path / "trial"))
    names = ["owl", "fox"]
    bundle_classes.write_label_space(Bundle.open(trial), _space(Bundle.open(trial), names))
    size = (trial / mf.MANIFEST_NAME).stat().st_size  # what the change writes
    before = snapshot(folder)
    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", size - 1)
    bundle = Bundle.open(folder)
    with pytest.raises(ClassListError, match="nothing was changed"):
        bundle_classes.write_label_space(bundle, _space(bundle, names))
    assert snapshot(folder) == before
    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", size)
    bundle_classes.write_label_space(bundle, _space(bundle, names))
    assert list(Bundle.open(folder, verify=True).classes) == names


def test_messages_about_names_stay_short(tmp_path) -> None:
    groups = [[f"{'w' * 900}{i}", f"{'W' * 900}{i}"] for i in range(50)]
    with pytest.raises(ClassListError) as error:
        read_class_list(_list(tmp_path, [name for group in groups for name in group]))
    assert len(str(error.value)) < 2000 and "and 45 more" in str(error.value)
    for arg in ("d" * 100_000 + "=x.txt", "bad name" * 10_000 + "=x.txt", "x" * 100_000):
        with pytest.raises(ClassListError) as error:
            parse_domain_args([arg])
        assert len(str(error.value)) < LINE
