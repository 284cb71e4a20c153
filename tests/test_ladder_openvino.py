"""A ladder's OpenVINO rungs compiled as one model: ``ladder_rung`` picks the branch that runs,
each rung gives the outputs of its graph compiled alone, and every constant two rungs share is
one array (the mapped weights file where it is a row of it), so the plugin packs it once."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_ladder import RATES, anchor_cases, export_tiny_ladder

torch = pytest.importorskip("torch")
ov = pytest.importorskip("openvino")

from vlm_export.core.errors import BundleError  # noqa: E402
from vlm_export.runtime.bundle import Bundle  # noqa: E402
from vlm_export.runtime.engines.backends.openvino_backend import OpenVinoBackend  # noqa: E402
from vlm_export.runtime.engines.ladder.ladder import open_ladder  # noqa: E402
from vlm_export.runtime.engines.ladder.mapped_weights import MappedWeights  # noqa: E402
from vlm_export.runtime.engines.ladder.openvino_rungs import (  # noqa: E402
    RUNG_INPUT,
    OpenVinoRungs,
    SharedConstants,
    open_openvino_rungs,
    rung_switch_model,
    same_bytes,
)

OPS = ov.opset13


@pytest.fixture(scope="module")
def ladder_path(tmp_path_factory) -> Path:
    return export_tiny_ladder(tmp_path_factory.mktemp("ovladder"))


def test_each_rung_gives_the_outputs_of_its_graph_compiled_alone(ladder_path):
    bundle = Bundle.open(ladder_path)
    ladder = open_ladder(bundle, "openvino", threads=1)
    try:
        assert ladder.sharing == "prepacked" and isinstance(ladder.shared, OpenVinoRungs)
        for rung, engine in zip(ladder.rungs, ladder.engines, strict=True):
            alone = OpenVinoBackend(bundle, "fp32", 1, graph=bundle.path / rung.onnx)
            for image, anchors, valid in anchor_cases(bundle):
                engine.set_anchors(anchors, valid)
                alone.set_anchors(anchors, valid)
                got, want = engine.infer(image), alone.infer(image)
                assert list(got) == list(want)
                for name in want:
                    np.testing.assert_array_equal(got[name], want[name])
            alone.close()
        fates = [
            engine.infer(anchor_cases(bundle)[0][0])["token_fate"] for engine in ladder.engines
        ]
        assert not np.array_equal(fates[0], fates[-1]), "the rungs keep different tokens"
    finally:
        ladder.close()


def test_the_rungs_are_one_compiled_model_reading_one_copy_of_the_weights(ladder_path):
    bundle = Bundle.open(ladder_path)
    ladder = open_ladder(bundle, "openvino", threads=1)
    try:
        group = ladder.shared
        assert all(engine.compiled is group.compiled for engine in ladder.engines)
        assert RUNG_INPUT in {port.get_any_name() for port in group.compiled.inputs}
        mapped = group.constants.mapped
        start = np.frombuffer(mapped._map, np.uint8).ctypes.data
        table = bundle.manifest["ladder"]["weights"]["table"]
        for row in table:
            assert mapped.arrays[row["name"]].ctypes.data == start + row["offset"]
    finally:
        ladder.close()
    assert group.compiled is None and group.constants.mapped is None


def test_shared_constants_point_equal_bytes_of_every_rung_at_one_array(ladder_path):
    bundle = Bundle.open(ladder_path)
    mapped = MappedWeights(bundle, bundle.manifest["ladder"]["weights"], writable=True)
    constants = SharedConstants(mapped)
    core = ov.Core()
    models = [core.read_model(str(bundle.path / rung["onnx"])) for rung in _rungs(bundle)]
    for model in models:
        constants.share(ov.opset13, model)
    where: dict[bytes, set[int]] = {}
    for model in models:
        for node in model.get_ordered_ops():
            if node.get_type_name() == "Constant":
                data = node.get_data()
                key = data.dtype.str.encode() + str(data.shape).encode() + data.tobytes()
                where.setdefault(key, set()).add(data.ctypes.data)
    assert all(len(addresses) == 1 for addresses in where.values())
    start = np.frombuffer(mapped._map, np.uint8).ctypes.data
    end = start + len(mapped._map)
    in_file = {a for addresses in where.values() for a in addresses if start <= a < end}
    distinct_rows = {
        array.dtype.str + str(array.shape) + array.tobytes().hex()
        for array in mapped.arrays.values()
    }
    assert len(in_file) == len(distinct_rows), "every row of the file, once, read in place"


def _rungs(bundle: Bundle) -> list[dict]:
    return bundle.manifest["ladder"]["rungs"]


def _model(factor: float, outputs: tuple[str, ...] = ("y",), name: str = "m") -> ov.Model:
    """x [2] -> outputs named ``outputs``: output k is x * factor + 100 * k."""
    x = OPS.parameter([2], ov.Type.f32, name="x")
    results = []
    for k, output in enumerate(outputs):
        value = OPS.add(
            OPS.multiply(x, OPS.constant(np.float32(factor))), OPS.constant(np.float32(100 * k))
        )
        result = OPS.result(value)
        result.output(0).set_names({output})
        results.append(result)
    return ov.Model(results, [x], name)


def _switch(models: list) -> ov.InferRequest:
    return ov.Core().compile_model(rung_switch_model(ov, models), "CPU").create_infer_request()


def test_the_rung_input_picks_the_branch():
    request = _switch([_model(factor) for factor in (1.0, 2.0, 3.0)])
    for rung, factor in enumerate((1.0, 2.0, 3.0)):
        request.infer({"x": np.array([1.0, -2.0], np.float32), RUNG_INPUT: np.int32(rung)})
        np.testing.assert_array_equal(request.get_tensor("y").data, [factor, -2.0 * factor])


def test_outputs_are_paired_by_name_not_by_position():
    first = _model(1.0, ("a", "b"))
    second = _model(2.0, ("b", "a"))  # its first output is named b
    request = _switch([first, second])
    request.infer({"x": np.array([1.0, 2.0], np.float32), RUNG_INPUT: np.int32(1)})
    np.testing.assert_array_equal(request.get_tensor("b").data, [2.0, 4.0])
    np.testing.assert_array_equal(request.get_tensor("a").data, [102.0, 104.0])


def test_constants_of_types_numpy_cannot_hold_stay_as_they_are():
    """bf16 reads back from OpenVINO as float16 bits: such a constant must not be replaced (nor
    merged with a float16 constant of the same bytes)."""
    bf16 = ov.op.Constant(ov.Type.bf16, ov.Shape([3]), [1.0, 2.0, 3.0])
    half = OPS.constant(bf16.get_data().view(np.float16))  # the same bytes, as float16
    x = OPS.parameter([3], ov.Type.f32, name="x")
    total = OPS.add(OPS.add(x, OPS.convert(bf16, "f32")), OPS.convert(half, "f32"))
    model = ov.Model([OPS.result(total)], [x], "typed")
    SharedConstants(None).share(OPS, model)
    types = sorted(
        node.get_element_type().get_type_name()
        for node in model.get_ordered_ops()
        if node.get_type_name() == "Constant"
    )
    assert types == ["bf16", "f16"]
    request = ov.Core().compile_model(model, "CPU").create_infer_request()
    request.infer({"x": np.zeros(3, np.float32)})
    expected = np.array([1.0, 2.0, 3.0], np.float32) + half.get_data().astype(np.float32)
    np.testing.assert_allclose(request.get_output_tensor(0).data, expected)


def test_rungs_that_differ_in_inputs_or_outputs_are_one_line(tmp_path):
    paths = []
    for name, model in (("a", _model(1.0, ("y",))), ("b", _model(2.0, ("z",)))):
        paths.append(tmp_path / f"{name}.xml")
        ov.save_model(model, paths[-1])
    with pytest.raises(BundleError, match=r"b.xml has other outputs than a.xml"):
        OpenVinoRungs(ov, ov.Core(), paths, {}, None)


def test_same_bytes_tells_minus_zero_from_zero():
    assert same_bytes(np.zeros(3, np.float32), np.zeros(3, np.float32))
    assert not same_bytes(np.zeros(3, np.float32), -np.zeros(3, np.float32))


def test_unshared_rungs_compile_one_by_one(ladder_path):
    ladder = open_ladder(Bundle.open(ladder_path), "openvino", threads=1, share_memory=False)
    try:
        assert ladder.sharing == "per-rung" and ladder.shared is None
        assert len({id(engine.compiled) for engine in ladder.engines}) == len(RATES)
    finally:
        ladder.close()


def test_a_rung_graph_openvino_cannot_read_is_one_line(ladder_path, tmp_path):
    copy = Path(shutil.copytree(ladder_path, tmp_path / "bundle"))
    (copy / "image_encoder.rung1.onnx").write_bytes(b"not a model")
    bundle = Bundle.open(copy, verify=False)
    graphs = ["image_encoder.onnx", "image_encoder.rung1.onnx"]
    with pytest.raises(BundleError, match="OpenVINO cannot read image_encoder.rung1.onnx"):
        open_openvino_rungs(bundle, graphs, "fp32", 1)


def test_a_fixed_input_the_compiled_model_lacks_is_one_line(ladder_path):
    bundle = Bundle.open(ladder_path)
    compiled = ov.Core().compile_model(str(bundle.onnx_path), "CPU")
    with pytest.raises(BundleError, match="takes no int32 input 'ladder_rung'"):
        OpenVinoBackend(bundle, compiled=compiled, fixed_inputs={RUNG_INPUT: np.array(0, np.int32)})


def test_bf16_rungs_run_their_condensation_in_fp32(ladder_path):
    """On a CPU with bf16: every rung is cut into stages and no condensation node runs in bf16;
    each rung stays close to its fp32 graph (skipped elsewhere)."""
    from vlm_export.runtime.engines.backends import openvino_backend as ovb
    from vlm_export.runtime.engines.backends.openvino_precise import bf16_condensation_nodes
    from vlm_export.runtime.engines.backends.openvino_split import SplitCompiled

    if "BF16" not in ovb.cpu_capabilities(ov.Core()):
        pytest.skip("this CPU has no bf16 (OpenVINO's OPTIMIZATION_CAPABILITIES)")
    bundle = Bundle.open(ladder_path)
    ladder = open_ladder(bundle, "openvino", threads=1, precision="bf16")
    try:
        assert ladder.precision == "bf16" and len(ladder.engines) == len(ladder.rungs) > 1
        for rung, engine in zip(ladder.rungs, ladder.engines, strict=True):
            assert isinstance(engine.compiled, SplitCompiled)
            assert bf16_condensation_nodes(engine.compiled) == []
            alone = OpenVinoBackend(bundle, "fp32", 1, graph=bundle.path / rung.onnx)
            image, anchors, valid = anchor_cases(bundle)[0]
            engine.set_anchors(anchors, valid)
            alone.set_anchors(anchors, valid)
            got, want = engine.infer(image)["embedding"], alone.infer(image)["embedding"]
            assert float(np.sum(got * want)) > 0.99
            alone.close()
    finally:
        ladder.close()
