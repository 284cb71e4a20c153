"""`vlm-export quantize` on a ladder bundle: one INT8 graph per rung, gated against its own fp32
rung, int8 weights stored once; the INT8 rungs run shared and pre-packed in ONNX Runtime and in
OpenVINO (one compiled model), each equal to its graph run alone, and `vlm-edge bench` /
`--target-ms` use them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fakebundle import write_images
from tiny_ladder import RATES, export_tiny_ladder

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from vlm_export.core.errors import UserError  # noqa: E402
from vlm_export.core.manifest import read_manifest, verify_files  # noqa: E402
from vlm_export.export.int8.quantize import INT8_WEIGHTS, quantize_bundle  # noqa: E402
from vlm_export.runtime.bundle import Bundle  # noqa: E402
from vlm_export.runtime.cli import main as edge_main  # noqa: E402
from vlm_export.runtime.engines.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from vlm_export.runtime.engines.checks import measure  # noqa: E402
from vlm_export.runtime.engines.factory import graph_view  # noqa: E402
from vlm_export.runtime.engines.ladder.ladder import open_ladder  # noqa: E402


@pytest.fixture(scope="module")
def ladders(tmp_path_factory) -> tuple[Path, Path]:
    """(fp32-only ladder, the same ladder with INT8 rungs)."""
    folder = tmp_path_factory.mktemp("int8ladder")
    plain = export_tiny_ladder(folder)
    quantized = Path(shutil.copytree(plain, folder / "quantized"))
    calibration = folder / "calibration"
    calibration.mkdir()
    write_images(calibration, 12)
    quantize_bundle(quantized, calibration)
    return plain, quantized


def test_quantize_writes_one_gated_int8_graph_per_rung_with_weights_stored_once(ladders):
    _, quantized = ladders
    manifest = read_manifest(quantized)
    verify_files(quantized, manifest)
    int8 = manifest["ladder"]["int8"]
    files = [rung["onnx"] for rung in int8["rungs"]]
    assert files == [
        "image_encoder.int8.onnx",
        "image_encoder.rung1.int8.onnx",
        "image_encoder.rung2.int8.onnx",
    ]
    assert all(rung["parity"]["passed"] for rung in int8["rungs"])
    assert [e["file"] for e in manifest["engines"] if e["precision"] == "int8"] == [files[0]]
    weights = int8["weights"]
    assert weights["file"] == INT8_WEIGHTS and weights["tensors"] == len(weights["table"]) > 0
    assert len({row["name"] for row in weights["table"]}) == weights["tensors"]
    # every rung's graph reads the shared file; the file is about one rung's int8 weights
    graph_bytes = [manifest["files"][name]["bytes"] for name in files]
    assert manifest["files"][INT8_WEIGHTS]["bytes"] > max(graph_bytes)


def test_each_int8_rung_gives_the_outputs_of_its_graph_run_alone(ladders):
    _, quantized = ladders
    bundle = Bundle.open(quantized)
    ladder = open_ladder(bundle, "onnxruntime", threads=1, precision="int8")
    shape = [int(v) for v in bundle.engine_io("inputs")["image"]["shape"]]
    try:
        assert (ladder.sharing, ladder.precision) == ("prepacked", "int8")
        for rung, engine in zip(ladder.rungs, ladder.engines, strict=True):
            assert engine.description.endswith(":int8")
            alone = OnnxRuntimeBackend(graph_view(bundle, str(rung.int8)), ["cpu"], threads=1)
            for image in measure.synthetic_images(shape, 2, seed=4):
                got, want = engine.infer(image), alone.infer(image)
                np.testing.assert_array_equal(got["token_fate"], want["token_fate"])
                np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-6)
            alone.close()
    finally:
        ladder.close()


def test_openvino_runs_the_int8_rungs_as_one_model(ladders):
    pytest.importorskip("openvino")
    from vlm_export.runtime.engines.backends.openvino_backend import OpenVinoBackend

    bundle = Bundle.open(ladders[1])
    ladder = open_ladder(bundle, "openvino", threads=1, precision="int8")
    shape = [int(v) for v in bundle.engine_io("inputs")["image"]["shape"]]
    try:
        assert ladder.precision == "int8" and len(ladder.engines) == len(RATES)
        assert ladder.sharing == "prepacked"
        table = bundle.manifest["ladder"]["int8"]["weights"]["table"]
        assert sorted(ladder.shared.constants.mapped.arrays) == sorted(r["name"] for r in table)
        for rung, engine in zip(ladder.rungs, ladder.engines, strict=True):
            assert engine.description == "openvino:CPU:int8"
            alone = OpenVinoBackend(bundle, "int8", 1, graph=bundle.path / str(rung.int8))
            for image in measure.synthetic_images(shape, 2, seed=4):
                got, want = engine.infer(image), alone.infer(image)
                np.testing.assert_array_equal(got["token_fate"], want["token_fate"])
                np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-5)
            alone.close()
    finally:
        ladder.close()


def test_a_ladder_without_int8_rungs_says_how_to_add_them(ladders):
    with pytest.raises(UserError, match="vlm-export quantize BUNDLE --calibration DIR"):
        open_ladder(Bundle.open(ladders[0]), "onnxruntime", precision="int8")


def test_bench_times_the_int8_rungs_and_target_ms_picks_among_them(ladders, tmp_path, capsys):
    bundle = Path(shutil.copytree(ladders[1], tmp_path / "bundle"))
    images = write_images(tmp_path / "images", 2)
    argv = ["bench", str(bundle), "--backends", "onnxruntime", "--precisions", "fp32,int8"]
    assert edge_main([*argv, "--rounds", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "ladder rungs" in out
    record = json.loads(next(bundle.glob("bench.*.json")).read_text())
    rows = [(row["precision"], row["rung"]) for row in record["ladder"]]
    assert rows == [("fp32", 0), ("fp32", 1), ("fp32", 2), ("int8", 0), ("int8", 1), ("int8", 2)]
    run = ["run", str(bundle), str(images[0].parent), "--precision", "int8", "--target-ms", "1e6"]
    assert edge_main([*run, "--format", "jsonl"]) == 0
    captured = capsys.readouterr()
    assert "rung 0 (drop rate 0) is the largest budget" in captured.err
    assert {json.loads(line)["drop_rate"] for line in captured.out.splitlines()} == {0.0}
