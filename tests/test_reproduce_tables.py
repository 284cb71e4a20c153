"""The tables script on a synthetic data root: one dataset present (EuroSAT's folder layout),
the others skipped with a line, the table printed beside the paper's averages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakebundle import write_images

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tables_on_a_synthetic_root(tmp_path: Path) -> None:
    for folder in ("AnnualCrop", "Forest", "River"):
        write_images(tmp_path / "data" / "eurosat" / "2750" / folder, 2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "reproduce_tca_tables.py"),
        str(tmp_path / "data"),
        "--pretrained",
        "none",
        "--model",
        "vlm-test-tiny",
        "--work",
        str(tmp_path / "work"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "skip DTD: not under" in out and "skip ImageNet: not under" in out
    assert "EuroSAT" in out and "paper (10 sets)" in out and "64.59" in out
    assert (tmp_path / "work" / "tables.json").is_file()
