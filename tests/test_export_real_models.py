"""Real architectures (random weights): export, ONNX Runtime parity and the manifest's numbers."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from vlm_export.core.manifest import read_manifest, verify_files  # noqa: E402
from vlm_export.export.pipeline import ExportOptions, export_bundle  # noqa: E402
from vlm_export.models.schedule import CondensationConfig  # noqa: E402

CLASSES = [f"class_{index}" for index in range(20)]


def _export(tmp_path, model, config, ranking="mean"):
    options = ExportOptions(
        method="tca",
        model=model,
        domains=[("demo", CLASSES)],
        out=tmp_path / model,
        templates="single",
        condensation=CondensationConfig(config[0], config[1], ranking),
        quiet=True,
    )
    bundle = export_bundle(options)
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    return manifest


def _assert_parity(manifest):
    parity = manifest["parity"]
    assert parity["passed"] and parity["cosine_min"] > 0.99999 and parity["max_abs"] < 1e-5
    for case in parity["cases"]:
        assert case["token_fate_agreement"] == 1.0, case["case"]


def test_vit_b32_tca_export_parity(tmp_path):
    manifest = _export(tmp_path, "ViT-B-32", (0.1, 2), "consensus")
    _assert_parity(manifest)
    schedule = manifest["condensation"]["schedule"]
    assert [row["tokens_in"] for row in schedule] == [50, 39, 31]


@pytest.mark.slow
def test_vit_b16_tca_export_parity_and_gflops(tmp_path):
    manifest = _export(tmp_path, "ViT-B-16", (0.035, 2))
    _assert_parity(manifest)
    assert manifest["flops"]["full_gflops"] == pytest.approx(17.56, abs=0.05)
    assert manifest["flops"]["condensed_gflops"] == pytest.approx(15.44, abs=0.05)
    assert [row["tokens_out"] for row in manifest["condensation"]["schedule"]] == [180, 163, 149]
    assert manifest["engine"]["opset"] == 17 and manifest["model"]["untrained"]
