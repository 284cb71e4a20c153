"""Split/Transpose/Identity of weights folded into initializers at export: the same outputs, bit
for bit, no data-movement node on weights left, nothing else touched."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from vlm_export.export.graph.weight_folding import fold_weight_transforms  # noqa: E402


def _model(split_as_input: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    packed = rng.standard_normal((6, 4)).astype(np.float32)  # q/k/v rows, as in_proj_weight
    extra = rng.standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node(
            "Constant",
            [],
            ["sizes"],
            value=numpy_helper.from_array(np.array([2, 2, 2], np.int64)),
        ),
        helper.make_node(
            "Split",
            ["packed", "sizes"] if split_as_input else ["packed"],
            ["q", "k", "v"],
            axis=0,
            **({} if split_as_input else {"num_outputs": 3}),
        ),
        *[helper.make_node("Transpose", [n], [f"{n}_t"], perm=[1, 0]) for n in "qkv"],
        *[helper.make_node("MatMul", ["x", f"{n}_t"], [f"{n}_out"]) for n in "qkv"],
        helper.make_node("Identity", ["extra"], ["extra_alias"]),
        helper.make_node("MatMul", ["x", "extra_alias"], ["extra_out"]),
        helper.make_node("Transpose", ["x"], ["x_t"], perm=[1, 0]),  # an activation: kept
    ]
    outputs = [f"{n}_out" for n in "qkv"] + ["extra_out"]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
            for name, shape in zip([*outputs, "x_t"], [[1, 2]] * 3 + [[1, 3], [4, 1]], strict=True)
        ],
        [numpy_helper.from_array(packed, "packed"), numpy_helper.from_array(extra, "extra")],
    )
    opset = 13 if split_as_input else 18
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


@pytest.mark.parametrize("split_as_input", [True, False])
def test_folded_graph_gives_the_same_outputs_without_data_movement_on_weights(split_as_input):
    model = _model(split_as_input)
    x = np.random.default_rng(1).standard_normal((1, 4)).astype(np.float32)
    before = _run(model, x)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_weight_transforms(folded.graph) == 5  # split, three transposes, identity
    onnx.checker.check_model(folded, full_check=True)
    ops = [node.op_type for node in folded.graph.node]
    assert ops == ["MatMul"] * 4 + ["Transpose"], "only the activation's transpose is left"
    names = {tensor.name for tensor in folded.graph.initializer}
    assert names == {"q_t", "k_t", "v_t", "extra_alias"}, "unused originals and constants gone"
    for got, want in zip(_run(folded, x), before, strict=True):
        np.testing.assert_array_equal(got, want)
    packed = numpy_helper.to_array(model.graph.initializer[0])
    q_t = next(t for t in folded.graph.initializer if t.name == "q_t")
    np.testing.assert_array_equal(numpy_helper.to_array(q_t), packed[:2].T)


def test_a_graph_without_foldable_weights_is_left_as_it_is():
    model = _model(True)
    graph = model.graph
    keep = [node for node in graph.node if node.op_type == "Transpose" and node.input[0] == "x"]
    del graph.node[:]
    graph.node.extend(keep)
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [4, 1])])
    before = graph.SerializeToString()
    assert fold_weight_transforms(graph) == 0
    assert graph.SerializeToString() == before
