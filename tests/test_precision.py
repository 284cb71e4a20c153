"""Reduced precision on the CPU: the OpenVINO backend, INT8 QDQ graphs and ``vlm-edge bench``."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from fakebundle import write_images
from tiny_tca import export_tiny_tca

from vlm_export.core.errors import BundleError
from vlm_export.core.manifest import (
    CONDENSATION_NODE_PREFIXES,
    MANIFEST_NAME,
    onnx_engines,
    sha256_file,
)
from vlm_export.export.cli import main as export_main
from vlm_export.export.int8 import gate as int8_gate
from vlm_export.export.int8 import quantize
from vlm_export.runtime import cli
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.factory import open_backend

CLASSES = ["cat", "dog", "bird", "car", "bus"]


@pytest.fixture(scope="module")
def tiny_tca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A condensing vlm-test-tiny bundle (random weights) from the real exporter."""
    pytest.importorskip("torch")
    return export_tiny_tca(tmp_path_factory.mktemp("precision") / "bundle", CLASSES)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("calibration")
    write_images(folder, 10, seed=5)
    return folder


@pytest.fixture(scope="module")
def quantized(tiny_tca: Path, images: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("quantized") / "bundle"
    shutil.copytree(tiny_tca, folder)
    quantize.quantize_bundle(folder, images)
    return folder


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _run_labels(bundle: Path, images: Path, out: Path, *extra: str) -> list[int]:
    argv = ["run", str(bundle), str(images), "--method", "tca", "--quiet", "--out", str(out)]
    assert cli.main([*argv, *extra]) == 0
    return [json.loads(line)["label"] for line in out.read_text().splitlines()]


# --- OpenVINO backend -------------------------------------------------------------------------


def test_openvino_fp32_run_decides_as_onnxruntime(tiny_tca, images, tmp_path) -> None:
    pytest.importorskip("openvino")
    ort = _run_labels(tiny_tca, images, tmp_path / "ort.jsonl", "--backend", "onnxruntime")
    ov = _run_labels(tiny_tca, images, tmp_path / "ov.jsonl", "--backend", "openvino")
    assert ov == ort and len(ort) == 10


def test_openvino_anchor_rows_update_in_place(tiny_tca) -> None:
    pytest.importorskip("openvino")
    bundle = Bundle.open(tiny_tca)
    ov = open_backend(bundle, "openvino")
    ort = open_backend(bundle, "onnxruntime", providers=["cpu"])
    anchors_shape = ov.bound_anchors()[0].shape
    rng = np.random.default_rng(0)
    anchors = rng.standard_normal(anchors_shape).astype(np.float32)
    valid = np.ones(anchors_shape[0], np.float32)
    ov.set_anchors(anchors, valid)
    bound, bound_valid = ov.bound_anchors()
    # OpenVINO reads the backend's own arrays: no copy per frame
    assert np.shares_memory(ov.request.get_tensor("anchors").data, bound)
    moved = anchors.copy()
    moved[2] += 1.0
    valid_moved = valid.copy()
    valid_moved[4] = 0.0
    ov.update_anchor_rows(moved, valid_moved, np.array([2, 4]))
    with pytest.raises(ValueError, match="do not fit"):  # [C, 1, D] would fill every layer
        ov.update_anchor_rows(moved[:, :1], valid_moved, np.array([2]))
    assert ov.bound_anchors()[0] is bound and bound_valid[4] == 0.0
    np.testing.assert_array_equal(bound, moved)
    image = rng.standard_normal(ov.image_shape).astype(np.float32)
    ort.set_anchors(moved, valid_moved)
    got, want = ov.infer(image), ort.infer(image)
    np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-4)
    np.testing.assert_array_equal(got["token_fate"], want["token_fate"])


def test_bf16_pins_condensation_layernorm_and_softmax(tiny_tca) -> None:
    ov = pytest.importorskip("openvino")
    from vlm_export.runtime.engines.backends import openvino_precise as pins

    core = ov.Core()
    model = core.read_model(str(tiny_tca / "image_encoder.onnx"))
    pinned, names = pins.pinned_model(ov, core, model)
    # every chosen node carries OpenVINO's typed attribute (an attribute object, not a string)
    assert pins.pinned_names(pinned) == names
    ops = [op for op in pinned.get_ordered_ops() if op.get_type_name() not in pins.UNMARKED_TYPES]
    condensing = [op for op in ops if op.get_friendly_name().startswith(CONDENSATION_NODE_PREFIXES)]
    assert condensing and all(op.get_friendly_name() in names for op in condensing)
    for kind in ("MVN", "Softmax"):
        typed = [op for op in ops if op.get_type_name() == kind]
        assert typed and all(op.get_friendly_name() in names for op in typed)
    # the transformer's own matrix products stay free to run in bf16
    assert any(op.get_type_name() == "MatMul" and op.get_friendly_name() not in names for op in ops)
    # the pinned model computes what the ONNX graph computes
    shape = [int(v) for v in model.input("image").get_partial_shape().get_min_shape()]
    image = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    feeds = {
        p.get_any_name(): np.zeros(p.get_partial_shape().get_min_shape(), np.float32)
        for p in model.inputs
    }
    feeds["image"] = image
    fp32 = {"INFERENCE_PRECISION_HINT": "f32"}  # a bf16 CPU would otherwise default to bf16
    got = core.compile_model(pinned, "CPU", fp32).infer_new_request(feeds)
    want = core.compile_model(model, "CPU", fp32).infer_new_request(feeds)
    np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-5)


def test_python_rt_info_strings_are_not_the_typed_pin(tiny_tca) -> None:
    """Why the pin goes through an IR: a string set from Python is not OpenVINO's attribute."""
    ov = pytest.importorskip("openvino")
    from vlm_export.runtime.engines.backends import openvino_precise as pins

    model = ov.Core().read_model(str(tiny_tca / "image_encoder.onnx"))
    node = next(op for op in model.get_ordered_ops() if op.get_type_name() == "Softmax")
    node.get_rt_info()[pins.PIN_RT_KEY] = pins.PIN_VALUE
    assert pins.PIN_RT_KEY in node.get_rt_info() and not pins.carries_typed_pin(node)
    assert pins.pinned_names(model) == []


def test_bf16_compiled_model_runs_the_condensation_in_fp32(tiny_tca) -> None:
    """On a CPU with bf16: the compiled model's runtime precisions (skipped elsewhere)."""
    ov = pytest.importorskip("openvino")
    from vlm_export.runtime.engines.backends import openvino_backend as ovb
    from vlm_export.runtime.engines.backends import openvino_precise as pins

    if "BF16" not in ovb.cpu_capabilities(ov.Core()):
        pytest.skip("this CPU has no bf16 (OpenVINO's OPTIMIZATION_CAPABILITIES)")
    backend = open_backend(Bundle.open(tiny_tca), "openvino", precision="bf16")
    precisions = pins.runtime_precisions(backend.compiled)
    condensing = {n: p for n, p in precisions.items() if n.startswith(CONDENSATION_NODE_PREFIXES)}
    assert condensing and all(
        p in ("f32", "i32", "i64", "u8", "boolean") for p in condensing.values()
    )
    assert pins.bf16_condensation_nodes(backend.compiled) == []
    assert "bf16" in precisions.values()  # the rest of the graph does run in bf16


def test_split_stages_alternate_and_take_in_the_readers_own_helpers() -> None:
    """A hand-made graph: relu, the condensation (a product, a helper the ONNX reader would make,
    a clip), then an add: three stages, the unnamed helper inside the condensation's."""
    ov = pytest.importorskip("openvino")
    from vlm_export.runtime.engines.backends import openvino_split as split

    ops = ov.opset13
    x = ops.parameter([1, 4], np.float32, name="x")
    relu = ops.relu(x, name="/block/Relu")
    product = ops.multiply(relu, ops.constant(np.full((1, 4), 2.0, np.float32)))
    product.set_friendly_name("/condensers.0/Mul")
    helper = ops.maximum(product, ops.constant(np.zeros((1, 4), np.float32)))
    helper.set_friendly_name("Maximum_7")  # a name the ONNX reader gives what it adds
    clip = ops.minimum(helper, ops.constant(np.ones((1, 4), np.float32)))
    clip.set_friendly_name("/condensers.0/Clip")
    out = ops.add(clip, relu, name="/block/Add")
    model = ov.Model([ops.result(out)], [x], "toy")
    chosen = split.condensation_nodes(model)
    assert chosen == {"/condensers.0/Mul", "Maximum_7", "/condensers.0/Clip"}
    numbers = split.stage_numbers(model, chosen)
    assert numbers == {
        "/block/Relu": 0,
        "/condensers.0/Mul": 1,
        "Maximum_7": 1,
        "/condensers.0/Clip": 1,
        "/block/Add": 2,
    }
    stages = split.cut_stages(ov, model, chosen)
    assert [(stage.number, stage.precise) for stage, _ in stages] == [
        (0, False),
        (1, True),
        (2, False),
    ]
    # the relu's output is handed to both later stages; the graph output leaves the last
    assert set(stages[1][0].parameters) == set(stages[2][0].parameters) - {
        next(iter(stages[1][0].results))
    }


def test_split_gives_every_output_also_one_a_later_stage_reads_and_a_constant_one() -> None:
    """Outputs the cut must not lose: one that a later stage also reads (it keeps its name and
    one Result), one that is a constant, one named twice; all equal to the whole model's."""
    ov = pytest.importorskip("openvino")
    from vlm_export.runtime.engines.backends import openvino_split as split

    ops = ov.opset13

    def model() -> object:  # built anew each time: the cut takes its model apart
        x = ops.parameter([2, 3], np.float32, name="x")
        relu = ops.relu(x, name="/block/Relu")
        relu.output(0).get_tensor().set_names({"early", "/block/Relu_output_0"})
        scaled = ops.multiply(relu, ops.constant(np.full((2, 3), 3.0, np.float32)))
        scaled.set_friendly_name("/condensers.0/Mul")
        late = ops.add(scaled, relu, name="/block/Add")
        late.output(0).get_tensor().set_names({"late"})
        fixed = ops.constant(np.arange(4, dtype=np.int32))
        fixed.output(0).get_tensor().set_names({"fixed"})
        return ov.Model([ops.result(relu), ops.result(late), ops.result(fixed)], [x], "toy")

    core = ov.Core()
    staged = split.SplitCompiled(ov, core, model(), {"INFERENCE_PRECISION_HINT": "f32"})
    assert [port.get_any_name() for port in staged.outputs] == [
        o.get_any_name() for o in model().outputs
    ]
    assert [stage.precise for stage, _ in staged.stages] == [False, True, False]
    request = staged.create_infer_request()
    value = np.array([[-1.0, 0.5, 2.0], [3.0, -4.0, 0.0]], np.float32)
    request.set_tensor("x", ov.Tensor(value))
    request.infer()
    want = core.compile_model(model(), "CPU").infer_new_request({"x": value})
    for port in staged.outputs:
        np.testing.assert_array_equal(np.array(request.get_tensor(port.name).data), want[port.name])
    with pytest.raises(KeyError, match="no input"):
        request.set_tensor("nothing", ov.Tensor(value))


def test_an_input_given_out_as_it_is_leaves_the_anchors_stage_alone() -> None:
    """A graph output that is an input passed through goes to a stage that runs every frame, so
    binding that input does not rerun the anchors' stage; each frame gives its own value."""
    ov = pytest.importorskip("openvino")
    from vlm_export.runtime.engines.backends import openvino_split as split

    ops = ov.opset13
    x = ops.parameter([2], np.float32, name="x")
    anchors = ops.parameter([2], np.float32, name="anchors")
    unit = ops.relu(anchors, name="/anchor_select/Relu")
    block = ops.relu(ops.multiply(x, x, name="/blk/Mul"), name="/blk/Relu")
    out = ops.add(block, unit, name="/condensers.0/Add")
    out.output(0).get_tensor().set_names({"y"})
    model = ov.Model([ops.result(out), ops.result(x)], [x, anchors], "passthrough")
    staged = split.SplitCompiled(
        ov, ov.Core(), model, {"INFERENCE_PRECISION_HINT": "f32"}, frozenset({"anchors"})
    )
    rare = [stage for stage, _ in staged.stages if stage.number == split.RARE_STAGE]
    assert [set(stage.parameters) for stage in rare] == [{"anchors"}]
    request = staged.create_infer_request()
    request.set_tensor("anchors", ov.Tensor(np.ones(2, np.float32)))
    for value in (1.0, 5.0):
        request.set_tensor("x", ov.Tensor(np.full(2, value, np.float32)))
        request.infer()
        np.testing.assert_array_equal(np.array(request.get_tensor("x").data), [value, value])
        np.testing.assert_array_equal(np.array(request.get_tensor("y").data), [value**2 + 1] * 2)


def test_split_copies_what_is_computed_from_constants_and_keeps_unread_inputs() -> None:
    """A dequantized int8 weight and a bf16 constant read in two stages are copied into each
    (only the activation crosses the cut; the copies compute what the originals do), an input
    no stage reads can still be bound,
    and a shape known only at run time crossing a cut is refused in one line."""
    ov = pytest.importorskip("openvino")
    from vlm_export.runtime.engines.backends import openvino_split as split

    ops = ov.opset13
    rng = np.random.default_rng(0)
    weight = rng.integers(-5, 5, (8, 8)).astype(np.int8)
    half = rng.standard_normal((2, 8)).astype(np.float32)

    def model() -> object:
        x = ops.parameter([2, 8], np.float32, name="x")
        unread = ops.parameter([3], np.float32, name="unread")
        scale = ops.constant(np.float32(0.1))
        dequantized = ops.multiply(ops.convert(ops.constant(weight), "f32"), scale)
        dequantized.set_friendly_name("/w/Scale")
        bf16 = ops.convert(ov.op.Constant(ov.Type.bf16, ov.Shape([2, 8]), half.ravel()), "f32")
        bf16.set_friendly_name("/w/Bf16")
        block = ops.add(ops.matmul(x, dequantized, False, False), bf16, name="/blk/MatMul")
        condensed = ops.matmul(block, dequantized, False, False, name="/condensers.0/MatMul")
        out = ops.add(condensed, bf16, name="/condensers.0/Add")
        out.output(0).get_tensor().set_names({"out"})
        return ov.Model([ops.result(out)], [x, unread], "m")

    fp32 = {"INFERENCE_PRECISION_HINT": "f32"}
    core = ov.Core()
    staged = split.SplitCompiled(ov, core, model(), fp32)
    assert [stage.precise for stage, _ in staged.stages] == [False, True]
    assert [sorted(stage.parameters) for stage, _ in staged.stages] == [["x"], ["/blk/MatMul:0"]]
    request = staged.create_infer_request()
    x = rng.standard_normal((2, 8)).astype(np.float32)
    request.set_tensor("x", ov.Tensor(x))
    request.set_tensor("unread", ov.Tensor(np.zeros(3, np.float32)))
    request.infer()
    want = core.compile_model(model(), "CPU", fp32).infer_new_request(
        {"x": x, "unread": np.zeros(3, np.float32)}
    )["out"]
    np.testing.assert_allclose(np.array(request.get_tensor("out").data), want, rtol=1e-6)

    x = ops.parameter([-1, 8], np.float32, name="x")
    block = ops.relu(x, name="/blk/Relu")
    condensed = ops.relu(block, name="/condensers.0/Relu")
    dynamic = ov.Model([ops.result(condensed)], [x], "dynamic")
    with pytest.raises(RuntimeError, match="known only when it runs"):
        split.SplitCompiled(ov, core, dynamic, fp32)


def test_split_model_computes_what_the_whole_model_computes(tiny_tca) -> None:
    """Cut into stages (all in fp32 here, on any CPU), the model gives the whole model's outputs,
    anchors on, through the backend; moved anchors reach every stage that reads them, and the
    stage that reads only the anchors runs again when they moved, not on every frame."""
    ov = pytest.importorskip("openvino")
    from vlm_export.runtime.engines.backends import openvino_backend as ovb
    from vlm_export.runtime.engines.backends import openvino_split as split

    bundle = Bundle.open(tiny_tca)
    core = ov.Core()
    staged = split.SplitCompiled(
        ov,
        core,
        core.read_model(str(bundle.onnx_path)),
        ovb.compile_config("fp32", 1),
        ovb.ANCHOR_INPUTS,
    )
    numbers = [stage.number for stage, _ in staged.stages]
    assert numbers[0] == split.RARE_STAGE and staged.stages[0][0].precise
    assert set(staged.stages[0][0].parameters) == set(ovb.ANCHOR_INPUTS)
    kinds = [stage.precise for stage, _ in staged.stages[1:]]
    assert len(kinds) >= 5 and kinds == [i % 2 == 1 for i in range(len(kinds))]
    for stage, compiled in staged.stages:  # every named condensation node is in an fp32 stage
        computing = [
            op.get_rt_info()["originalLayersNames"].astype(str)
            for op in compiled.get_runtime_model().get_ordered_ops()
            if op.get_rt_info()["layerType"].astype(str) not in ("Input", "Output", "Const")
        ]
        named = [name for name in computing if name.startswith(CONDENSATION_NODE_PREFIXES)]
        assert computing and (stage.precise or not named), (stage.number, named[:3])
    got = ovb.OpenVinoBackend(bundle, "fp32", compiled=staged)
    want = open_backend(bundle, "openvino", precision="fp32")
    rng = np.random.default_rng(4)
    shape = tuple(int(v) for v in bundle.engine_io("inputs")["anchors"]["shape"])
    anchors = rng.standard_normal(shape).astype(np.float32)
    valid = np.ones(shape[0], np.float32)
    for engine in (got, want):
        engine.update_anchor_rows(anchors, valid, np.arange(shape[0]))
    moved = anchors.copy()
    moved[1] = -moved[1]
    for step, (rows_anchors, rows) in enumerate(((anchors, []), (moved, [1]))):
        if step:
            for engine in (got, want):
                engine.update_anchor_rows(rows_anchors, valid, np.array(rows))
        for seed in range(3):
            image = np.random.default_rng(seed).standard_normal(got.image_shape)
            image = image.astype(np.float32)
            a, b = got.infer(image), want.infer(image)
            assert set(a) == set(b)
            np.testing.assert_array_equal(a["token_fate"], b["token_fate"])
            np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-5)
    # written behind the backend's back, the anchors are not read again until it is told
    image = np.random.default_rng(9).standard_normal(got.image_shape).astype(np.float32)
    before = got.infer(image)
    got.bound_anchors()[0][:] = -got.bound_anchors()[0]
    np.testing.assert_array_equal(got.infer(image)["embedding"], before["embedding"])
    got.request.inputs_changed()
    want.update_anchor_rows(-moved, valid, np.arange(shape[0]))
    after, expected = got.infer(image), want.infer(image)
    assert not np.array_equal(after["embedding"], before["embedding"])
    np.testing.assert_allclose(after["embedding"], expected["embedding"], atol=1e-5)
    # an update refused for its shapes (valid one short) writes nothing: the frames go on alike
    with pytest.raises(ValueError, match="do not fit"):
        got.update_anchor_rows(anchors, valid[:-1], np.arange(shape[0]))
    np.testing.assert_allclose(
        got.infer(image)["embedding"], want.infer(image)["embedding"], atol=1e-5
    )


def test_openvino_checks_the_graph_against_the_manifest_before_closing_its_shapes(
    tiny_tca,
) -> None:
    """A graph whose fixed shape disagrees with the manifest is refused as the manifest's check
    says it, before any reshape could hide it; only open dimensions take the manifest's size."""
    ov = pytest.importorskip("openvino")
    from vlm_export.runtime.engines.backends import openvino_backend as ovb

    bundle = Bundle.open(tiny_tca)
    inputs, outputs = bundle.engine_io("inputs"), bundle.engine_io("outputs")
    model = ov.Core().read_model(str(bundle.onnx_path))
    ovb.check_ports(model, inputs, outputs)
    smaller = {
        **inputs,
        "anchors": {**inputs["anchors"], "shape": [5, *inputs["anchors"]["shape"][1:]]},
    }
    with pytest.raises(BundleError, match="model input 'anchors' has shape"):
        ovb.check_ports(model, smaller, outputs)
    assert ovb.closed_shapes(model, inputs) == {}
    model.reshape({"anchors": ov.PartialShape([-1, *inputs["anchors"]["shape"][1:]])})
    assert ovb.closed_shapes(model, smaller) == {"anchors": smaller["anchors"]["shape"]}
    model.reshape({"image": ov.PartialShape([1, 3, -1, -1])})
    wider = {**inputs, "image": {**inputs["image"], "shape": [7, 3, 32, 48]}}
    assert ovb.closed_shapes(model, wider)["image"] == [1, 3, 32, 48]


def test_openvino_errors_give_the_line_that_says_why() -> None:
    from vlm_export.runtime.engines.backends.openvino_backend import openvino_reason

    compile_error = RuntimeError(
        "Exception from src/inference/src/cpp/core.cpp:117:\n"
        "Exception from src/inference/src/dev/plugin.cpp:54:\n"
        "Check '!shape.rank().is_dynamic()' failed at src/plugins/intel_cpu/src/node.cpp:108:\n"
        "Unexpected: CPU plug-in doesn't support Reshape operation with dynamic rank.\n"
    )
    assert openvino_reason(compile_error).startswith("Unexpected: CPU plug-in doesn't support")
    read_error = RuntimeError(
        "Exception from src/frontends/onnx/frontend/src/frontend.cpp:124:\n"
        "FrontEnd API failed with GeneralFailure:\n"
        "Errors during ONNX translation: \n"
        "Check 'axis in range' failed at src/core/shape_util.cpp:42:\n"
        "While validating ONNX node '<Node(Gather): /resblocks.0/attn/Gather>':\n"
        "Axis 7 out of the tensor rank range [-4, 3].\n"
        "Summary:\n"
        "-- Conversion is failed for: Gather-17\n"
    )
    assert openvino_reason(read_error) == "Axis 7 out of the tensor rank range [-4, 3]."
    assert openvino_reason(RuntimeError("plain")) == "plain"


def test_bf16_runs_a_graph_with_an_open_dimension_and_an_unread_input(tiny_tca, tmp_path) -> None:
    """On a CPU with bf16: a graph whose anchors' class dimension is left open (the manifest
    gives it) and one that reads no ``anchors_valid`` open and run like fp32 (skipped
    elsewhere)."""
    ov = pytest.importorskip("openvino")
    import onnx

    from vlm_export.runtime.engines.backends import openvino_backend as ovb

    if "BF16" not in ovb.cpu_capabilities(ov.Core()):
        pytest.skip("this CPU has no bf16 (OpenVINO's OPTIMIZATION_CAPABILITIES)")
    bundle = Bundle.open(tiny_tca)
    graph = onnx.load(str(bundle.onnx_path))
    for port in graph.graph.input[1:]:
        dim = port.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "K"
    del graph.graph.value_info[:]
    open_dimension = tmp_path / "open.onnx"
    onnx.save(graph, str(open_dimension))
    graph = onnx.load(str(bundle.onnx_path))
    for node in graph.graph.node:  # read a constant instead of anchors_valid
        node.input[:] = ["unread_ones" if name == "anchors_valid" else name for name in node.input]
    shape = bundle.engine_io("inputs")["anchors_valid"]["shape"]
    graph.graph.initializer.append(
        onnx.numpy_helper.from_array(np.ones(shape, np.float32), "unread_ones")
    )
    unread = tmp_path / "unread.onnx"
    onnx.save(graph, str(unread))
    image = (
        np.random.default_rng(2)
        .standard_normal(bundle.engine_io("inputs")["image"]["shape"])
        .astype(np.float32)
    )
    for path in (open_dimension, unread):
        bf16 = ovb.OpenVinoBackend(bundle, "bf16", 1, graph=path)
        fp32 = ovb.OpenVinoBackend(bundle, "fp32", 1, graph=path)
        got, want = bf16.infer(image)["embedding"], fp32.infer(image)["embedding"]
        assert float(np.sum(got * want)) > 0.99, path.name


def test_bf16_without_cpu_support_refuses_or_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    from vlm_export.runtime.engines.backends import openvino_backend as ovb

    with pytest.raises(ovb.PrecisionUnavailable, match="no bf16 support"):
        ovb.resolve_precision("bf16", ["FP32", "INT8"], fallback=False)
    with caplog.at_level("WARNING", logger="vlm_export"):
        assert ovb.resolve_precision("bf16", ["FP32", "INT8"], fallback=True) == "fp32"
    assert any("running fp32" in record.getMessage() for record in caplog.records)
    assert ovb.resolve_precision("bf16", ["FP32", "BF16"], fallback=False) == "bf16"


def test_missing_backend_and_precision_are_one_line_errors(tiny_tca, images, tmp_path, capsys):
    before = _hashes(tiny_tca)
    saved = sys.modules.get("openvino")
    sys.modules["openvino"] = None  # type: ignore[assignment]  # import fails as if absent
    try:
        code = cli.main(["run", str(tiny_tca), str(images), "--backend", "openvino", "--quiet"])
    finally:
        if saved is None:
            sys.modules.pop("openvino", None)
        else:
            sys.modules["openvino"] = saved
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and 'pip install ".[openvino]"' in err[-1]
    code = cli.main(["run", str(tiny_tca), str(images), "--precision", "int8", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "no INT8 graph" in err[-1] and "vlm-export quantize" in err[-1]
    assert _hashes(tiny_tca) == before


# --- INT8 -------------------------------------------------------------------------------------


def test_quantize_adds_a_gated_qdq_graph(quantized) -> None:
    onnx = pytest.importorskip("onnx")
    manifest = json.loads((quantized / MANIFEST_NAME).read_text())
    (record,) = onnx_engines(manifest, "int8")
    path = quantized / record["file"]
    assert record["sha256"] == sha256_file(path) == manifest["files"][record["file"]]["sha256"]
    parity = record["parity"]
    assert parity["passed"] and parity["embedding_cosine_min"] >= int8_gate.MIN_COSINE
    assert parity["calibration"]["images"] == 8 and parity["held_out"]["images"] == 2
    assert 0.0 <= parity["held_out"]["top1_agreement"] <= 1.0
    graph = onnx.load(str(path)).graph
    kinds = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds
    produced_by = {out: node for node in graph.node for out in node.output}
    for node in graph.node:  # condensation, LayerNorm and softmax read float tensors
        floating = node.name.startswith(CONDENSATION_NODE_PREFIXES) or node.op_type in (
            "LayerNormalization",
            "Softmax",
        )
        if floating:
            sources = [produced_by.get(name) for name in node.input]
            assert not any(s is not None and s.op_type == "DequantizeLinear" for s in sources)
    Bundle.open(quantized)  # the manifest and the hashes still check out


def test_int8_runs_on_both_backends_with_the_gate_numbers(quantized, images, tmp_path) -> None:
    labels = _run_labels(quantized, images, tmp_path / "ort8.jsonl", "--precision", "int8")
    reference = _run_labels(quantized, images, tmp_path / "ref.jsonl", "--backend", "onnxruntime")
    assert len(labels) == len(reference) == 10
    if pytest.importorskip("openvino"):
        ov = _run_labels(
            quantized,
            images,
            tmp_path / "ov8.jsonl",
            "--backend",
            "openvino",
            "--precision",
            "int8",
        )
        assert len(ov) == 10


def test_failing_gate_writes_nothing(tiny_tca, images, tmp_path, monkeypatch, capsys) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_tca, folder)
    before = _hashes(folder)
    monkeypatch.setattr(int8_gate, "MIN_COSINE", 1.000001)
    code = export_main(["quantize", str(folder), "--calibration", str(images), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "was not added to the bundle" in err[0]
    assert _hashes(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(before)


def test_quantize_reports_progress_and_where_it_wrote(tiny_tca, images, tmp_path, capsys):
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_tca, folder)
    assert export_main(["quantize", str(folder), "--calibration", str(images)]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    steps = [line.split(" ...")[0] for line in err if line.startswith("[")]
    assert steps == [
        "[1/2] calibrating and quantizing the image encoder (8 images)",
        "[2/2] comparing with the fp32 graph (8 calibration, 2 held-out images)",
    ]
    assert sum("done in" in line for line in err) == 2 and any("8/8" in line for line in err)
    (line,) = captured.out.splitlines()
    name = json.loads((folder / MANIFEST_NAME).read_text())["engines"][-1]["file"]
    assert line.startswith(f"added {name} to {folder}: int8 QDQ") and (folder / name).is_file()


@pytest.mark.parametrize("kind", ["empty", "unreadable", "missing"])
def test_bad_calibration_folder_is_one_line(tiny_tca, tmp_path, capsys, kind) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_tca, folder)
    before = _hashes(folder)
    calibration = tmp_path / "calib"
    if kind != "missing":
        calibration.mkdir()
    if kind == "unreadable":
        (calibration / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    code = export_main(["quantize", str(folder), "--calibration", str(calibration)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("vlm-export quantize: error:")
    assert _hashes(folder) == before


def test_attention_scope_quantizes_the_blocks_attention_products(tiny_tca, images, tmp_path):
    onnx = pytest.importorskip("onnx")
    from vlm_export.export.int8 import calibration as int8_calibration
    from vlm_export.export.int8 import graph as int8_graph
    from vlm_export.runtime.io.preprocess import Preprocessor

    source = tiny_tca / "image_encoder.onnx"
    blocks = set(int8_graph.quantized_node_names(source, "blocks"))
    attention = set(int8_graph.quantized_node_names(source, "attention"))
    added = attention - blocks
    assert blocks < attention and added
    assert all("/attn/MatMul" in name for name in added)
    assert not any(name.startswith(CONDENSATION_NODE_PREFIXES) for name in attention)
    manifest = json.loads((tiny_tca / MANIFEST_NAME).read_text())
    arrays = int8_calibration.preprocess_all(
        int8_calibration.image_paths(images), Preprocessor.from_manifest(manifest)
    )
    out = tmp_path / "attention.onnx"
    int8_graph.quantize_graph(source, out, manifest, arrays[:4], "attention")
    graph = onnx.load(str(out)).graph
    produced_by = {name: node for node in graph.node for name in node.output}
    for node in graph.node:
        if node.op_type == "MatMul" and node.name in added:  # both activations dequantized
            assert all(produced_by[name].op_type == "DequantizeLinear" for name in node.input)
        if node.op_type == "Softmax":  # the softmax still reads float scores
            assert produced_by[node.input[0]].op_type != "DequantizeLinear"


def test_nncf_quantize_adds_a_gated_openvino_ir(tiny_tca, images, tmp_path, capsys) -> None:
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_tca, folder)
    argv = ["quantize", str(folder), "--calibration", str(images), "--method", "nncf", "--quiet"]
    assert export_main(argv) == 0
    (line,) = capsys.readouterr().out.splitlines()  # NNCF's own progress bars kept quiet
    assert line.startswith(f"added image_encoder.int8.xml to {folder}: int8 OpenVINO IR (NNCF)")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    (record,) = [r for r in manifest["engines"] if r.get("format") == "openvino"]
    assert record["precision"] == "int8" and record["parity"]["passed"]
    assert record["quantization"]["model_type"] == "transformer"
    for name, sha in ((record["file"], record["sha256"]), (record["weights"]["file"], None)):
        assert sha256_file(folder / name) == manifest["files"][name]["sha256"]
        assert sha in (None, manifest["files"][name]["sha256"])
    assert record["weights"]["sha256"] == sha256_file(folder / record["weights"]["file"])
    model = ov.Core().read_model(str(folder / record["file"]))
    fake = [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    assert fake
    for op in model.get_ordered_ops():  # NNCF's ignored scope: the condensation reads float
        if op.get_friendly_name().startswith(CONDENSATION_NODE_PREFIXES):
            sources = [port.get_source_output().get_node() for port in op.inputs()]
            assert not any(s.get_type_name() == "FakeQuantize" for s in sources)
    bundle = Bundle.open(folder)  # hashes of the .xml and .bin check out
    engine = open_backend(bundle, "openvino", precision="int8")
    assert engine.description == "openvino:CPU:int8"
    assert (
        len(
            _run_labels(
                folder,
                images,
                tmp_path / "ov.jsonl",
                "--backend",
                "openvino",
                "--precision",
                "int8",
            )
        )
        == 10
    )


def test_nncf_method_refuses_a_scope_and_a_missing_nncf(tiny_tca, images, tmp_path, capsys):
    import importlib.util

    folder = tmp_path / "bundle"
    shutil.copytree(tiny_tca, folder)
    before = _hashes(folder)
    argv = ["quantize", str(folder), "--calibration", str(images), "--method", "nncf"]
    assert export_main([*argv, "--scope", "mlp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "vlm-export quantize: error: --scope applies to --method qdq; NNCF chooses what to quantize"
    ]
    if importlib.util.find_spec("nncf") is None:
        assert export_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "needs nncf" in err[0] and "pip install" in err[0]
    assert _hashes(folder) == before


# --- bench ------------------------------------------------------------------------------------


def test_bench_table_json_record_and_auto(quantized, images, tmp_path, capsys) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(quantized, folder)
    out = tmp_path / "bench.json"
    argv = ["bench", str(folder), "--rounds", "2", "--warmup", "1", "--json", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    record = json.loads(out.read_text())
    rows = {(r["backend"], r["precision"]): r for r in record["results"]}
    assert rows[("onnxruntime", "fp32")]["embedding_cosine_min"] == pytest.approx(1.0)
    assert rows[("onnxruntime", "int8")]["passed"]
    assert "skipped" in rows[("tensorrt", "engine")]
    for row in rows.values():
        assert "skipped" in row or row["median_ms"] <= row["p90_ms"]
    assert "median ms" in printed.out and "onnxruntime  int8" in printed.out
    recorded = list(folder.glob("bench.*.json"))
    assert len(recorded) == 1 and json.loads(recorded[0].read_text()) == record
    fastest = min((r for r in rows.values() if r.get("passed")), key=lambda r: r["median_ms"])
    bundle = Bundle.open(folder)
    chosen = open_backend(bundle, "auto")
    assert chosen.notes[0].startswith(f"auto chose {fastest['backend']} {fastest['precision']}")


@pytest.mark.exporter
def test_export_checks_int8_calibration_folder_first(tmp_path, capsys) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    argv = ["--model", "vlm-test-tiny", "--pretrained", "none", "--classes", str(classes)]
    argv += ["--method", "tca", "--out", str(tmp_path / "b"), "--quiet"]
    code = export_main([*argv, "--int8-calibration", str(tmp_path / "nothing")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        f"vlm-export: error: calibration folder not found: {tmp_path / 'nothing'}"
    ]
    assert not (tmp_path / "b").exists()


def _export_argv(out: Path) -> list[str]:
    """vlm-export's arguments for a tiny bundle at ``out``, its classes in a file beside it."""
    classes = out.parent / "classes.txt"
    classes.write_text("cat\ndog\n")
    argv = ["--model", "vlm-test-tiny", "--pretrained", "none", "--classes", str(classes)]
    return [*argv, "--method", "tca", "--templates", "single", "--out", str(out), "--quiet"]


@pytest.mark.exporter
def test_export_whose_int8_step_fails_writes_no_bundle_and_keeps_the_old_one(
    tiny_tca, tmp_path, capsys
) -> None:
    unreadable = tmp_path / "calib"
    unreadable.mkdir()
    (unreadable / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    fresh = tmp_path / "fresh"
    code = export_main([*_export_argv(fresh), "--int8-calibration", str(unreadable)])
    err = capsys.readouterr().err
    assert code == 2 and "calibration images can be read" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "classes.txt"]

    old = tmp_path / "old"
    shutil.copytree(tiny_tca, old)
    before = _hashes(old)
    argv = [*_export_argv(old), "--overwrite", "--int8-calibration", str(unreadable)]
    assert export_main(argv) == 2
    assert _hashes(old) == before and sorted(p.name for p in old.iterdir()) == sorted(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "classes.txt", "old"]


@pytest.mark.exporter
def test_export_with_int8_calibration_adds_the_graph_before_the_bundle_appears(
    images, tmp_path, capsys
) -> None:
    out = tmp_path / "b"
    assert export_main([*_export_argv(out), "--int8-calibration", str(images)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == str(out)
    assert any(line.startswith(f"added image_encoder.int8.onnx to {out}:") for line in printed)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    int8 = [e for e in onnx_engines(manifest) if e.get("precision") == "int8"]
    assert int8 and int8[0]["sha256"] == sha256_file(out / int8[0]["file"])
    assert Bundle.open(out).manifest == manifest  # every file listed, hashes verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "classes.txt"]


@pytest.mark.parametrize("kind", ["missing", "empty", "a file"])
def test_a_bad_held_out_folder_is_named_as_held_out(tiny_tca, images, tmp_path, capsys, kind):
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_tca, folder)
    held = tmp_path / "held"
    if kind == "empty":
        held.mkdir()
    elif kind == "a file":
        held.write_text("x")
    argv = ["quantize", str(folder), "--calibration", str(images), "--held-out", str(held)]
    code = export_main([*argv, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "held-out folder" in err[0], err
