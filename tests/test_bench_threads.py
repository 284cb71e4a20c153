"""``vlm-edge bench --threads N``: capped at the core count, as run, eval and learn cap it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fakebundle import make_bundle

from vlm_export.runtime import cli
from vlm_export.runtime.commands import bench

BENCH = ["--backends", "onnxruntime", "--precisions", "fp32", "--rounds", "2", "--warmup", "0"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bench") / "tca", method="tca")


@pytest.mark.parametrize("threads", [100_000, 2**31])
def test_threads_above_the_core_count_are_capped_with_a_warning(
    bundle_dir, tmp_path, capsys, monkeypatch, threads
) -> None:
    cores = os.cpu_count() or 1
    asked: list[int | None] = []

    def counting_open(*args, **kwargs):  # an uncapped count would start that many threads
        asked.append(kwargs["threads"] if "threads" in kwargs else args[3])
        assert asked[-1] is None or asked[-1] <= cores, asked
        return real_open(*args, **kwargs)

    real_open = bench.open_backend
    monkeypatch.setattr(bench, "open_backend", counting_open)
    out = tmp_path / "bench.json"
    argv = ["bench", str(bundle_dir), *BENCH, "--threads", str(threads), "--no-record"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"--threads {threads} is more than the {cores} cores here; using {cores}" in err
    assert asked and set(asked) == {cores}
    assert json.loads(out.read_text())["threads"] == cores


def test_negative_threads_are_one_line(bundle_dir, capsys) -> None:
    assert cli.main(["bench", str(bundle_dir), *BENCH, "--threads", "-2", "--no-record"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vlm-edge: error: --threads must be 0 (the default) or more, got -2"]
