"""The static TensorRT operator check: small ONNX graphs and a torch-exported condensing tower."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlm_export.core.errors import UserError
from vlm_export.export.graph.trt_ops import (
    TENSORRT_SUPPORTED_OPS,
    TensorRTCompatibilityError,
    assert_tensorrt_compatible,
    check_onnx_for_tensorrt,
)


def _value(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, initializers=(), opset=17, functions=()):
    graph = helper.make_graph(list(nodes), "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        functions=list(functions),
    )


def _k(name="k", value=2):
    return numpy_helper.from_array(np.array([value], dtype=np.int64), name)


def _clean_model(opset=17):
    """MatMul, Softmax, constant-k TopK, GatherElements: the ops of a condensing block."""
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Softmax", ["h"], ["p"], name="sm", axis=-1),
        helper.make_node("TopK", ["p", "k"], ["values", "idx"], name="topk", axis=-1),
        helper.make_node("GatherElements", ["h", "idx"], ["y"], name="gather", axis=-1),
    ]
    return _model(nodes, [_value("x", [1, 4])], [_value("y", [1, 2])], [weight, _k()], opset)


def test_clean_graph_passes_and_lists_every_op():
    report = check_onnx_for_tensorrt(_clean_model(), opset=17)
    assert report.ok, report.errors
    assert report.op_types == ["GatherElements", "MatMul", "Softmax", "TopK"]
    assert report.unsupported == []
    assert "TensorRT-compatible" in report.summary()
    assert "TopK x1" in report.summary()


def _single(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, name=f"the_{op.lower()}", **attrs)


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        (
            _model(
                [_single("NonZero", ["x"], ["y"])],
                [_value("x", [1, 4])],
                [_value("y", [2, 4], TensorProto.INT64)],
            ),
            "NonZero",
        ),
        (
            _model(
                [_single("ScatterElements", ["x", "i", "u"], ["y"], reduction="add")],
                [_value("x", [1, 4]), _value("i", [1, 2], TensorProto.INT64), _value("u", [1, 2])],
                [_value("y", [1, 4])],
            ),
            "ScatterElements with reduction='add'",
        ),
        (
            _model(
                [_single("RandomUniform", [], ["y"], shape=[1, 4])],
                [],
                [_value("y", [1, 4])],
            ),
            "RandomUniform",
        ),
        (
            _model(
                [_single("Relu", ["x"], ["y"])],
                [_value("x", [1, "tokens", 4])],
                [_value("y", [1, "tokens", 4])],
            ),
            "dynamic dimension 'tokens' on axis 1",
        ),
        (
            _model(
                [_single("LayerNormalization", ["x", "s"], ["y"])],
                [_value("x", [1, 4]), _value("s", [4])],
                [_value("y", [1, 4])],
                opset=16,
            ),
            "LayerNormalization does not exist at opset 16",
        ),
    ],
    ids=["nonzero", "scatter-add", "random", "dynamic-dim", "layernorm-opset16"],
)
def test_forbidden_constructs_fail_naming_the_op(model, needle):
    report = check_onnx_for_tensorrt(model)
    assert not report.ok
    assert any(needle in error for error in report.errors), report.errors
    with pytest.raises(TensorRTCompatibilityError, match=needle.split()[0]) as caught:
        assert_tensorrt_compatible(model)
    assert isinstance(caught.value, UserError)


def test_loop_fails_and_its_body_ops_are_listed():
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Sigmoid", ["v_in"], ["v_out"], name="inside"),
        ],
        "body",
        [
            _value("i", [], TensorProto.INT64),
            _value("cond_in", [], TensorProto.BOOL),
            _value("v_in", [1, 4]),
        ],
        [_value("cond_out", [], TensorProto.BOOL), _value("v_out", [1, 4])],
    )
    trip = numpy_helper.from_array(np.array(3, np.int64), "trip")
    cond = numpy_helper.from_array(np.array(True), "cond")
    loop = helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="unrolled_not", body=body)
    model = _model([loop], [_value("x", [1, 4])], [_value("y", [1, 4])], [trip, cond])
    report = check_onnx_for_tensorrt(model)
    assert "Sigmoid" in report.op_types and "Loop" in report.op_types
    assert any(
        "Loop 'unrolled_not'" in error and "control flow" in error for error in report.errors
    )


def test_topk_with_computed_k_fails():
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "one"], ["k"], name="pick", axis=0),
        helper.make_node("TopK", ["x", "k"], ["values", "idx"], name="dyn_topk", axis=-1),
    ]
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    model = _model(
        nodes, [_value("x", [1, 4])], [_value("values", [1, 4]), _value("idx", [1, 4], 7)], [one]
    )
    report = check_onnx_for_tensorrt(model)
    assert any("TopK 'dyn_topk'" in error and "constant" in error for error in report.errors)


@pytest.mark.parametrize("attribute", [{"value": _k("kv", 3)}, {"value_ints": [3]}])
def test_topk_with_constant_node_k_passes(attribute):
    nodes = [
        helper.make_node("Constant", [], ["k"], **attribute),
        helper.make_node("TopK", ["x", "k"], ["values", "idx"], axis=-1),
    ]
    model = _model(
        nodes, [_value("x", [1, 4])], [_value("values", [1, 3]), _value("idx", [1, 3], 7)]
    )
    assert check_onnx_for_tensorrt(model).ok


def test_topk_beyond_tensorrt_limit_or_unsorted_fails():
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="big", axis=-1, sorted=0)]
    model = _model(
        nodes,
        [_value("x", [1, 5000])],
        [_value("v", [1, 4000]), _value("i", [1, 4000], 7)],
        [_k("k", 4000)],
    )
    errors = check_onnx_for_tensorrt(model).errors
    assert any("sorted=0" in error for error in errors)
    assert any("k=[4000]" in error and "limit of 3839" in error for error in errors)


def test_scatter_without_reduction_passes():
    node = helper.make_node("ScatterElements", ["x", "i", "u"], ["y"], axis=1)
    inputs = [_value("x", [1, 4]), _value("i", [1, 2], TensorProto.INT64), _value("u", [1, 2])]
    assert check_onnx_for_tensorrt(_model([node], inputs, [_value("y", [1, 4])])).ok


def test_dynamic_batch_is_a_note_not_an_error():
    node = helper.make_node("Relu", ["x"], ["y"])
    model = _model([node], [_value("x", ["batch", 4])], [_value("y", ["batch", 4])])
    report = check_onnx_for_tensorrt(model)
    assert report.ok
    assert any("dynamic batch axis" in note for note in report.notes)


def test_unsupported_and_custom_domain_ops_are_named():
    nodes = [
        helper.make_node("Unique", ["x"], ["u"]),
        helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft"),
    ]
    model = _model(nodes, [_value("x", [4])], [_value("u", [4]), _value("y", [4])])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    report = check_onnx_for_tensorrt(model)
    assert report.unsupported == ["Unique", "com.microsoft.FastGelu"]
    assert "Unique" not in TENSORRT_SUPPORTED_OPS
    assert "does not support: Unique, com.microsoft.FastGelu" in report.errors[0]


def test_local_function_bodies_are_checked():
    inner = helper.make_node("NonZero", ["a"], ["b"])
    function = helper.make_function(
        "local", "Finder", ["a"], ["b"], [inner], [helper.make_opsetid("", 17)]
    )
    call = helper.make_node("Finder", ["x"], ["y"], domain="local")
    model = _model(
        [call], [_value("x", [4])], [_value("y", [1, 4], TensorProto.INT64)], functions=[function]
    )
    model.opset_import.append(helper.make_opsetid("local", 1))
    report = check_onnx_for_tensorrt(model)
    assert "Finder" not in report.op_types
    assert any("NonZero" in error and "function Finder" in error for error in report.errors)


def test_opset_mismatch_and_range():
    assert (
        "opset 17, but opset 16 was asked for"
        in check_onnx_for_tensorrt(_clean_model(17), opset=16).errors[0]
    )
    assert any("outside" in error for error in check_onnx_for_tensorrt(_clean_model(21)).errors)


def test_reads_files_and_refuses_missing_or_corrupt(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_clean_model(), path)
    assert check_onnx_for_tensorrt(path, 17).ok
    with pytest.raises(UserError, match="not found"):
        check_onnx_for_tensorrt(tmp_path / "absent.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        check_onnx_for_tensorrt(tmp_path / "bad.onnx")


@pytest.mark.parametrize("opset", [17, 16])
def test_torch_exported_condensing_tower_passes(tiny_clip, tmp_path, opset):
    pytest.importorskip("torch")
    from vlm_export.export.graph.onnx_export import export_onnx
    from vlm_export.export.tensorrt.build import fp32_node_names
    from vlm_export.models.condensing_tower import CondensingVisionTower
    from vlm_export.models.schedule import CondensationConfig

    config = CondensationConfig(drop_rate=0.1, reduction_layers=(1, 2))
    tower = CondensingVisionTower(tiny_clip.model.visual, config, num_classes=3).eval()
    path = tmp_path / "tower.onnx"
    export_onnx(tower, path, opset)
    report = check_onnx_for_tensorrt(path, opset)
    assert report.ok, report.summary()
    assert report.op_counts["TopK"] == 2  # one constant-k TopK per reduction block
    assert ("LayerNormalization" in report.op_types) == (opset >= 17)
    names = fp32_node_names(path)
    assert any("Softmax" in name for name in names)
    decomposed = ("LayerNormalization",) if opset >= 17 else ("ReduceMean", "Pow", "Sqrt")
    for op in decomposed:
        assert any(op in name for name in names), (op, names)
    # ranking, merging and anchor choice stay fp32: every arithmetic node of those modules
    for prefix in ("/condensers.0/", "/condensers.1/", "/anchor_select/"):
        pinned = {name.split("/")[-1].split("_")[0] for name in names if name.startswith(prefix)}
        assert {"TopK", "ReduceSum", "Sqrt", "Div"} <= pinned or prefix == "/anchor_select/"
        assert not any(op in pinned for op in ("Constant", "Shape", "Unsqueeze"))
    assert any(name.startswith("/anchor_select/ReduceL2") for name in names)
    # every reduction block's call of a module is pinned, not only the first (``_1`` suffix)
    assert any(name.startswith("/anchor_select_1/ReduceL2") for name in names)
    for scores in ("/anchored_scores/", "/anchored_scores_1/"):
        pinned = {name[len(scores) :].split("_")[0] for name in names if name.startswith(scores)}
        assert {"MatMul", "Softmax"} <= pinned, (scores, pinned)
    model = onnx.load(str(path))
    unpinned_ranking = [
        node.name for node in model.graph.node if node.op_type == "TopK" and node.name not in names
    ]
    assert not unpinned_ranking
