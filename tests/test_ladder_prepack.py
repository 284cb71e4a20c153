"""A ladder's ONNX Runtime CPU rungs share one pre-packed copy of the weights (C API container):
each rung's outputs equal its graph run alone in a plain session, the weights are held once (one
mapping of the weights file, one initializer value per tensor, one container for every rung
session), and `vlm-edge bench` warms every rung before timing any."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_ladder import RATES, anchor_cases, export_tiny_ladder

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from vlm_export.core.errors import BundleError  # noqa: E402
from vlm_export.runtime.bundle import Bundle  # noqa: E402
from vlm_export.runtime.engines.backends import ort_capi  # noqa: E402
from vlm_export.runtime.engines.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from vlm_export.runtime.engines.checks import measure  # noqa: E402
from vlm_export.runtime.engines.factory import graph_view  # noqa: E402
from vlm_export.runtime.engines.ladder.ladder import open_ladder  # noqa: E402
from vlm_export.runtime.engines.ladder.prepacked_rungs import open_prepacked_rungs  # noqa: E402


@pytest.fixture(scope="module")
def ladder_path(tmp_path_factory) -> Path:
    return export_tiny_ladder(tmp_path_factory.mktemp("prepack"))


def test_each_prepacked_rung_gives_the_outputs_of_its_graph_run_alone(ladder_path):
    bundle = Bundle.open(ladder_path)
    ladder = open_ladder(bundle, "onnxruntime", threads=1)
    try:
        assert ladder.sharing == "prepacked"
        for rung, engine in zip(ladder.rungs, ladder.engines, strict=True):
            alone = OnnxRuntimeBackend(graph_view(bundle, rung.onnx), ["cpu"], threads=1)
            for image, anchors, valid in anchor_cases(bundle):
                engine.set_anchors(anchors, valid)
                alone.set_anchors(anchors, valid)
                got, want = engine.infer(image), alone.infer(image)
                assert list(got) == list(want)
                np.testing.assert_array_equal(got["token_fate"], want["token_fate"])
                np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-6)
                np.testing.assert_allclose(got["cls_per_layer"], want["cls_per_layer"], atol=1e-6)
            alone.close()
    finally:
        ladder.close()


def test_the_rungs_hold_the_weights_once(ladder_path):
    """One mapping of the weights file, one initializer value per tensor of its table, read by
    every rung session, one pre-packed weights container for all of them."""
    bundle = Bundle.open(ladder_path)
    ladder = open_ladder(bundle, "onnxruntime", threads=1)
    try:
        group = ladder.shared
        assert isinstance(group, ort_capi.SharedWeightsGroup) and group.container
        assert [engine.session for engine in ladder.engines] == group.sessions
        table = bundle.manifest["ladder"]["weights"]["table"]
        assert sorted(group.values) == sorted(row["name"] for row in table)
        mapping = group.mapping._map
        size = (bundle.path / "image_encoder.weights").stat().st_size
        assert len(mapping) == size
        start = np.frombuffer(mapping, np.uint8).ctypes.data
        for row in table:
            array = group.arrays[row["name"]]
            assert array.ctypes.data == start + row["offset"], "read in place from the mapping"
    finally:
        ladder.close()
    assert not group.sessions and not group.values and not group.container


def test_without_the_c_api_library_the_rungs_share_the_mapped_weights(ladder_path, monkeypatch):
    def missing(_ort):
        raise ort_capi.CApiMissing("no libonnxruntime.so")

    monkeypatch.setattr(ort_capi, "_api", None)
    monkeypatch.setattr(ort_capi, "library_path", missing)
    ladder = open_ladder(Bundle.open(ladder_path), "onnxruntime", threads=1)
    try:
        assert ladder.sharing == "mapped" and ladder.shared is None
    finally:
        ladder.close()


def test_prepack_off_or_unshared_rungs(ladder_path):
    bundle = Bundle.open(ladder_path)
    for kwargs, sharing in (({"prepack": False}, "mapped"), ({"share_memory": False}, "per-rung")):
        ladder = open_ladder(bundle, "onnxruntime", threads=1, **kwargs)
        assert ladder.sharing == sharing
        ladder.close()


def test_a_rung_graph_onnx_runtime_cannot_load_is_one_line(ladder_path, tmp_path):
    copy = Path(shutil.copytree(ladder_path, tmp_path / "bundle"))
    (copy / "image_encoder.rung1.onnx").write_bytes(b"not a model")
    bundle = Bundle.open(copy, verify=False)
    with pytest.raises(BundleError, match="ONNX Runtime cannot load image_encoder.rung1.onnx"):
        open_prepacked_rungs(bundle, ort, ["image_encoder.onnx", "image_encoder.rung1.onnx"], 1)


def test_every_runner_is_warmed_before_any_is_timed_then_rounds_interleave():
    calls: list[str] = []
    runners = {name: (lambda n=name: calls.append(n)) for name in ("rung0", "rung1", "rung2")}
    timings = measure.interleaved_latency(runners, rounds=2, warmup=1, warm_each=2, settle_s=0)
    warm = ["rung0", "rung0", "rung1", "rung1", "rung2", "rung2"]
    interleaved = ["rung0", "rung1", "rung2"] * 3  # one untimed round, two timed
    assert calls == warm + interleaved
    assert all(timings[name]["rounds"] == 2 for name in runners)


def test_bench_warms_every_rung_before_timing(ladder_path, tmp_path, monkeypatch):
    """`vlm-edge bench` on a ladder: each rung runs RUNG_WARM_RUNS times in a row before the
    first timed round, even with --warmup 0."""
    from vlm_export.runtime.cli import main as edge_main
    from vlm_export.runtime.commands import bench

    seen: dict[str, object] = {}
    real = measure.interleaved_latency

    def spy(runners, rounds, warmup=2, settle_s=measure.SETTLE_S, warm_each=0):
        if len(runners) == len(RATES):  # the rung timing (the engines' own has other keys)
            seen.update(warm_each=warm_each, keys=list(runners))
        return real(runners, rounds, warmup, settle_s, warm_each)

    monkeypatch.setattr(measure, "interleaved_latency", spy)
    bundle = Path(shutil.copytree(ladder_path, tmp_path / "bundle"))
    argv = ["bench", str(bundle), "--backends", "onnxruntime", "--precisions", "fp32"]
    assert edge_main([*argv, "--rounds", "1", "--warmup", "0"]) == 0
    assert seen == {"warm_each": bench.RUNG_WARM_RUNS, "keys": [0, 1, 2]}
    assert bench.RUNG_WARM_RUNS >= 1


def test_the_exported_rungs_move_no_weights_at_run_time(ladder_path):
    """Split/Transpose/Identity of weights were folded at export (weight_folding), so the
    q/k/v parts are shared initializers, not constants every session folds for itself."""
    import onnx

    from vlm_export.export.graph.weight_folding import FOLDABLE_OPS

    manifest = Bundle.open(ladder_path).manifest
    for rung in manifest["ladder"]["rungs"]:
        graph = onnx.load(str(ladder_path / rung["onnx"]), load_external_data=False).graph
        weights = {tensor.name for tensor in graph.initializer}
        moved = [
            node.name
            for node in graph.node
            if node.op_type in FOLDABLE_OPS and node.input and node.input[0] in weights
        ]
        assert moved == [], rung["onnx"]
