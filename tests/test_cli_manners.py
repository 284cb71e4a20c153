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
