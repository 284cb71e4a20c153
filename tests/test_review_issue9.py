"""Hostile-user review of issue 9 (explain, --save-annotated, text output, the Python API)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fakebundle import make_bundle
from PIL import Image

from vlm_export.runtime import cli


@pytest.fixture(scope="module")
def tca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tca") / "bundle", method="tca")


def _edge(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, list[str]]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err.strip().splitlines()


def test_explain_with_a_link_loop_among_the_images(tca_dir, tmp_path, capsys) -> None:
    Image.new("RGB", (40, 40), (90, 120, 200)).save(tmp_path / "ok.png")
    os.symlink("loop", tmp_path / "loop")
    out = tmp_path / "out"
    code, _, err = _edge(capsys, "explain", tca_dir, tmp_path / "loop", tmp_path / "ok.png",
                         "--out", out, "--quiet")  # fmt: skip
    assert code == 1
    assert any("cannot read image" in line and "loop" in line for line in err)
    assert sorted(p.name for p in out.iterdir()) == ["ok.explain.png"]
