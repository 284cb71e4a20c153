"""``vlm-edge bench --baseline FULL_BUNDLE``: the full tower timed beside the condensed engines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakebundle import make_bundle

from vlm_export.core.manifest import sha256_file
from vlm_export.runtime import cli
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.factory import open_backend

BENCH = ["--backends", "onnxruntime", "--precisions", "fp32", "--rounds", "2", "--warmup", "0"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("baseline")
    return {
        "tca": make_bundle(root / "tca", method="tca"),
        "full": make_bundle(root / "full", method="zeroshot"),
        "other": make_bundle(root / "other", method="zeroshot", image_size=48),
    }


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def test_baseline_rows_are_timed_shown_and_kept_apart(bundles, tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    before = _hashes(bundles["full"])
    argv = ["bench", str(bundles["tca"]), "--baseline", str(bundles["full"]), *BENCH]
    assert cli.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    full = record["baseline"]
    assert full["bundle"] == Bundle.open(bundles["full"]).fingerprint
    (row,) = full["rows"]
    assert (row["backend"], row["precision"]) == ("onnxruntime", "fp32")
    assert row["rounds"] == 2 and row["median_ms"] <= row["p90_ms"]
    assert "full tower (--baseline)" in printed and "condensed runs in" in printed
    assert [(r["backend"], r["precision"]) for r in record["results"]] == [("onnxruntime", "fp32")]
    assert _hashes(bundles["full"]) == before  # the baseline is only read
    chosen = open_backend(Bundle.open(bundles["tca"]), "auto")
    assert "onnxruntime fp32" in chosen.notes[0]


@pytest.mark.parametrize(
    ("which", "words"), [("tca", "must be a full tower"), ("other", "another model (image_size")]
)
def test_a_baseline_that_is_not_the_full_tower_is_refused(bundles, capsys, which, words) -> None:
    before = _hashes(bundles["tca"])
    argv = ["bench", str(bundles["tca"]), "--baseline", str(bundles[which]), *BENCH]
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and words in err[0], err
    assert _hashes(bundles["tca"]) == before  # refused before anything was recorded
