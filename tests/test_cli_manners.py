"""Everyday manners of the two commands: a pipe closed early, no arguments, models that export."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from vlm_export.core.pipes import EXIT_BROKEN_PIPE
from vlm_export.runtime import cli

OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


def _export(*argv: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    command = [sys.executable, "-m", "vlm_export.export.cli", *argv]
    return subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True)


def test_list_models_into_a_closed_pipe_is_quiet() -> None:
    """`vlm-export --list-models | head -1`: no "Broken pipe", the shell's status 141."""
    reader, writer = os.pipe()
    process = _export("--list-models", stdout=writer)
    os.close(writer)
    os.close(reader)  # the reader is gone before the list is written
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_BROKEN_PIPE
    assert "Broken pipe" not in err and "Traceback" not in err


@pytest.mark.skipif(not OPEN_CLIP, reason="open_clip's model configs come with [export]")
def test_list_models_lists_the_vits_that_export() -> None:
    process = _export("--list-models")
    out, err = process.communicate(timeout=120)
    names = out.split()
    assert process.returncode == 0
    assert {"ViT-B-16", "ViT-B-32", "ViT-L-14", "vlm-test-tiny"} <= set(names)
    assert not {"RN50", "convnext_base", "ViT-SO400M-14-SigLIP", "coca_ViT-B-32"} & set(names)
    assert "other open_clip models are not listed" in err


@pytest.mark.skipif(not OPEN_CLIP, reason="open_clip's model configs come with [export]")
@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("RN50", "a ResNet"),
        ("ViT-SO400M-14-SigLIP", "a timm model"),
        ("coca_ViT-B-32", "attention"),
    ],
)
def test_a_model_that_cannot_export_is_refused_before_loading(model, reason, tmp_path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    argv = ["--model", model, "--pretrained", "none", "--classes", str(classes)]
    process = _export(*argv, "--out", str(tmp_path / "out"))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and err.count("\n") == 1
    assert f"model {model} cannot be exported" in err and reason in err
    assert not (tmp_path / "out").exists()


def test_vlm_edge_without_a_command_lists_the_commands(capsys) -> None:
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    for name in ("run", "info", "explain", "classes", "learn", "eval", "merge", "bench"):
        assert f"\n    {name} " in captured.err


def _without(monkeypatch, *names: str) -> None:
    """importlib.util.find_spec as on a device install that lacks ``names``."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a)
    )


def test_on_a_device_install_export_and_quantize_say_what_to_install(
    tmp_path, monkeypatch, capsys
) -> None:
    from fakebundle import make_bundle, write_images

    from vlm_export.export.cli import main as export_main

    bundle = make_bundle(tmp_path / "bundle", method="tca")
    calibration = tmp_path / "calib"
    write_images(calibration, 3)
    _without(monkeypatch, "torch", "open_clip")
    argv = ["--model", "ViT-B-16", "--pretrained", "none", "--out", str(tmp_path / "out")]
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install ".[export]"' in err[0] and "quantize" in err[0]
    _without(monkeypatch, "onnx")
    assert export_main(["quantize", str(bundle), "--calibration", str(calibration)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "vlm-export quantize: error: vlm-export quantize needs onnx: pip install "
        '".[quantize]" (onnx; no torch), with [cpu] or [gpu] installed'
    ]
    assert not (tmp_path / "out").exists()


QUANTIZE_WITHOUT_TORCH = """
import json, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "open_clip"):
            raise ImportError(f"blocked on the device: {name}")
sys.meta_path.insert(0, Block())
from vlm_export.export.cli import main
code = main(["quantize", sys.argv[1], "--calibration", sys.argv[2]])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def test_quantize_runs_without_torch(tmp_path) -> None:
    """`vlm-export quantize` on a device install: onnx and ONNX Runtime, never torch."""
    import json

    from fakebundle import make_bundle, write_images

    from vlm_export.core.manifest import read_manifest

    # wide enough for per-tensor uint8 activations to meet the gate's cosine (at the default
    # width of 16, one layer's rounding costs a random network 1-5 % of it)
    bundle = make_bundle(tmp_path / "bundle", method="tca", width=256, embed=128)
    write_images(tmp_path / "calib", 10, seed=5)
    done = subprocess.run(
        [sys.executable, "-c", QUANTIZE_WITHOUT_TORCH, str(bundle), str(tmp_path / "calib")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"code": 0, "torch": False}
    engines = read_manifest(bundle)["engines"]
    assert any(e.get("precision") == "int8" and e.get("format") == "onnx" for e in engines)


def test_quantize_with_nothing_in_scope_is_one_line(tmp_path, capsys) -> None:
    """A graph with no weight product in the scope is refused before any work: ONNX Runtime
    would read the empty selection as "quantize every node"."""
    import onnx
    from fakebundle import _replace_encoder, make_bundle, write_images

    from vlm_export.core.manifest import read_manifest
    from vlm_export.export.cli import main

    bundle = make_bundle(tmp_path / "bundle", method="tca")
    write_images(tmp_path / "calib", 2, seed=5)
    model = onnx.load(str(bundle / read_manifest(bundle)["engine"]["onnx"]))
    for node in model.graph.node:
        node.name = ""  # no "/mlp/" in any name: nothing in the default scope
    _replace_encoder(bundle, model)  # rehashed: quantize refuses a graph its manifest disowns
    before = sorted(p.name for p in bundle.iterdir())
    assert main(["quantize", str(bundle), "--calibration", str(tmp_path / "calib")]) == 2
    err = capsys.readouterr().err
    assert "has no weight products in scope 'mlp' (try --scope all)" in err, err
    assert len(err.strip().splitlines()) == 1 and "calibrating" not in err
    assert sorted(p.name for p in bundle.iterdir()) == before
