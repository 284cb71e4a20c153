"""Adding to a bundle: only to one whose files match its manifest, and never over another run's
graph added while this one worked."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from fakebundle import write_images
from tiny_tca import export_tiny_tca

from vlm_export.core.manifest import MANIFEST_NAME, read_manifest, sha256_file, verify_files
from vlm_export.export.bundle.staging import _staging
from vlm_export.export.cli import main as export_main
from vlm_export.export.int8 import quantize

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A condensing vlm-test-tiny bundle (random weights) from the real exporter."""
    pytest.importorskip("torch")
    return export_tiny_tca(tmp_path_factory.mktemp("exported") / "bundle", CLASSES)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("calibration")
    write_images(folder, 10, seed=5)
    return folder


@pytest.fixture()
def bundle(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "bundle"))


def _listing(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) if p.is_file() else "folder" for p in folder.iterdir()}


@pytest.mark.parametrize(
    "command",
    [
        ["quantize", "--calibration", "IMAGES"],
        ["build-engine"],
        ["build-ncnn"],
        ["build-rknn"],
        ["build-litert"],
    ],
)
def test_adding_to_a_bundle_whose_graph_was_corrupted_is_refused_first(
    bundle, images, capsys, command
) -> None:
    """The same size, one byte flipped: one line naming the file, nothing added or left."""
    graph = bundle / "image_encoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x40
    graph.write_bytes(bytes(data))
    before = _listing(bundle)
    argv = [command[0], str(bundle), *(str(images) if a == "IMAGES" else a for a in command[1:])]
    code = export_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"vlm-export {command[0]}: error: ")
    assert (
        "image_encoder.onnx does not match its sha256" in err[0] and "nothing was added" in err[0]
    )
    assert _listing(bundle) == before


def test_a_graph_another_run_added_meanwhile_is_not_replaced(
    bundle, images, monkeypatch, capsys
) -> None:
    """A second quantize (--scope blocks) finishes while the first (--scope mlp) is gating: the
    first refuses to replace the graph at the end, and the second's stays listed and sound."""
    real_gate, runs = quantize.gate_report, []

    def gate_with_another_run(*args, **kwargs):
        if not runs:
            runs.append("second")
            argv = ["quantize", str(bundle), "--calibration", str(images), "--scope", "blocks"]
            assert export_main([*argv, "--quiet"]) == 0
        return real_gate(*args, **kwargs)

    monkeypatch.setattr(quantize, "gate_report", gate_with_another_run)
    argv = ["quantize", str(bundle), "--calibration", str(images), "--scope", "mlp", "--quiet"]
    code = export_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "was added to" in err[0] and "by another run while this one worked" in err[0]
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    (engine,) = [e for e in manifest["engines"] if e.get("precision") == "int8"]
    assert engine["quantization"]["scope"] == "blocks"
    assert set(os.listdir(bundle)) == {*manifest["files"], MANIFEST_NAME}  # no staging left


def test_with_overwrite_the_later_graph_replaces_it_and_keeps_the_rest(
    bundle, images, monkeypatch
) -> None:
    """What the manifest gained meanwhile is read again before the graph moves in."""
    real_gate, runs = quantize.gate_report, []

    def gate_with_another_run(*args, **kwargs):
        if not runs:
            runs.append("second")
            manifest = json.loads((bundle / MANIFEST_NAME).read_text())
            (bundle / "notes.bin").write_bytes(b"another run's file")
            manifest["files"]["notes.bin"] = {
                "sha256": sha256_file(bundle / "notes.bin"),
                "bytes": 18,
            }
            (bundle / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        return real_gate(*args, **kwargs)

    monkeypatch.setattr(quantize, "gate_report", gate_with_another_run)
    argv = ["quantize", str(bundle), "--calibration", str(images), "--overwrite", "--quiet"]
    assert export_main(argv) == 0
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    assert "notes.bin" in manifest["files"]
    assert any(e.get("precision") == "int8" for e in manifest["engines"])


def test_a_runs_staging_folder_outlives_a_concurrent_runs_clean_up(tmp_path) -> None:
    """Its top folder's mtime stays old while the run works below it; it is held, not stale."""
    with _staging(tmp_path) as slow:
        (slow / "work").mkdir()
        then = time.time() - 3600
        os.utime(slow, (then, then))
        with _staging(tmp_path):
            pass
        assert (slow / "work").is_dir()
    assert os.listdir(tmp_path) == []
