"""The README's device quick start and embedding example, run as written on tiny bundles.

The copy (``scp``) is played by building the bundle where the copy puts it; ``pip install``
lines must name extras that exist (and keep torch out of the device's); every ``vlm-edge`` line
runs as a subprocess. The camera and service lines need a camera and a long-running process:
they are checked against the command's parser instead.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle, write_images

from vlm_export.runtime.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _extras() -> dict[str, str]:
    """pyproject.toml's extras: name -> its requirement list as written (tomllib is 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    table = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    pattern = r"^([\w-]+) = (\[.*?\])[ \t]*(?:#[^\n]*)?$"  # to the ] that ends a line
    return dict(re.findall(pattern, table, re.DOTALL | re.MULTILINE))


EXTRAS = _extras()


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)


def _commands(block: str) -> list[list[str]]:
    lines = [line.split("#", 1)[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line) for line in lines if line]


def _check_pip(words: list[str]) -> None:
    assert words[:2] == ["pip", "install"], words
    extras = re.fullmatch(r"\.\[([\w,]+)\]", words[2]).group(1).split(",")
    assert set(extras) <= set(EXTRAS), extras
    assert {"cpu"} <= set(EXTRAS) and not any("torch" in EXTRAS[extra] for extra in extras)


def _edge(words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a vlm-edge line, its wildcards expanded as a shell would."""
    assert words[0] == "vlm-edge"
    argv = []
    for word in words[1:]:
        matches = sorted(str(p.relative_to(cwd)) for p in cwd.glob(word)) if "*" in word else []
        argv += matches or [word]
    command = [sys.executable, "-m", "vlm_export.runtime", *argv]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_device_quick_start_runs_as_written(tmp_path) -> None:
    first, camera = _blocks(_section("Device quick start"), "bash")
    commands = _commands(first)
    copy = commands[0]
    assert copy[:2] == ["scp", "-r"] and copy[3].endswith(":bundles/")
    bundle = Path("bundles") / Path(copy[2]).name  # where the copy lands on the device
    make_bundle(tmp_path / bundle, method="tca")
    photos = write_images(tmp_path / "photos", 4)
    ran = []
    for words in commands[1:]:
        if words[0] == "pip":
            _check_pip(words)
            continue
        done = _edge(words, tmp_path)
        assert done.returncode == 0, (words, done.stderr[-2000:])
        assert "Traceback" not in done.stderr
        ran.append(words[1])
    assert ran == ["info", "run", "explain"]
    records = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert len(records) == len(photos) and all("class" in record for record in records)
    assert (tmp_path / "reservoir.npz").is_file()
    assert len(list((tmp_path / "explained").glob("*.explain.png"))) == len(photos)
    for words in _commands(camera):  # a camera cannot be run here: the line must parse
        if words[0] == "pip":
            _check_pip(words)
        else:
            args = build_parser().parse_args(words[1:])
            assert args.command == "run" and Path(args.bundle) == bundle


def test_camera_service_lines_parse_as_written() -> None:
    """The service needs cameras and runs until stopped (tests/test_serve_* run it for real):
    its README lines must install what it imports and parse as one `serve` command."""
    (block,) = _blocks(_section("Camera service"), "bash")
    commands = _commands(block)
    _check_pip(commands[0])
    assert "serve" in commands[0][2]
    args = build_parser().parse_args(commands[1][1:])
    assert args.command == "serve" and len(args.source) == 2


def test_ci_runs_the_readme_test_command_as_written() -> None:
    """`.ci/run` runs the README's test line itself, and that install brings the service's
    packages (tests/liveserver.py imports uvicorn): a fresh machine collects every test."""
    (block,) = _blocks(_section("Tests"), "bash")
    (line,) = block.strip().splitlines()
    install = shlex.split(line.split("&&", 1)[0])
    assert install[:3] == ["pip", "install", "-e"], line
    extras = re.fullmatch(r"\.\[([\w,]+)\]", install[3]).group(1).split(",")
    assert set(extras) <= set(EXTRAS) and "dev" in extras, extras
    assert "vlm-export[serve]" in EXTRAS["dev"]
    ci = ROOT / ".ci" / "run"
    if not ci.exists():
        pytest.skip("the checkout's .ci/run is not here (the device-side copy of the tests)")
    assert line in ci.read_text(encoding="utf-8").splitlines()


def test_workstation_quick_start_runs_as_written(tmp_path) -> None:
    pytest.importorskip("torch")  # the exporter
    first = _blocks(_section("Workstation quick start"), "bash")[0]
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "cifar10_classes.txt").write_text(
        (ROOT / "examples" / "cifar10_classes.txt").read_text()
    )
    ran = []
    for words in _commands(first):
        if words[0] == "pip":
            assert words[:3] == ["pip", "install", "-e"] and words[3] == ".[export]"
            continue
        if words[0] == "vlm-export":
            command = [sys.executable, "-m", "vlm_export.export.cli", *words[1:]]
            done = subprocess.run(
                command, cwd=tmp_path, capture_output=True, text=True, timeout=600
            )
        else:
            done = _edge(words, tmp_path)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        ran.append(words[0])
    assert ran == ["vlm-export", "vlm-edge"]
    assert "vlm-test-tiny" in (tmp_path / "bundles" / "tiny" / "manifest.json").read_text()


def test_embedding_example_runs_as_written(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("torch")  # a bundle with a text engine comes from the exporter
    from vlm_export.export.cli import main as export_main

    code = _blocks(_section("Python API"), "python")[1]
    assert "embed(" in code and "embed_text(" in code
    monkeypatch.chdir(tmp_path)
    (tmp_path / "classes.txt").write_text("cat\ntruck\n")
    argv = ["--method", "tca", "--model", "vlm-test-tiny", "--pretrained", "none"]
    argv += ["--classes", "classes.txt", "--templates", "single", "--quiet"]
    assert export_main([*argv, "--out", "bundles/vitb16-tca"]) == 0
    write_images(tmp_path, 1)[0].rename(tmp_path / "photo.jpg")
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example
    printed = capsys.readouterr().out
    values = np.array(re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", printed), dtype=float)
    assert values.shape == (2,) and np.all(np.abs(values) <= 1.0 + 1e-5)
    from vlm_export.runtime import open_pipeline
    from vlm_export.runtime.text.encoder import TextEncoder

    with open_pipeline("bundles/vitb16-tca") as pipeline:
        texts = pipeline.embed_text(["a photo of a cat", "truck"])
        one = pipeline.embed_text("truck")
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    raw = TextEncoder.open("bundles/vitb16-tca").embed_prompts(["truck"])
    np.testing.assert_allclose(one[0], raw[0] / np.linalg.norm(raw[0]), atol=1e-6)
    np.testing.assert_allclose(one[0], texts[1], atol=1e-6)
