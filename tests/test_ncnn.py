"""ncnn: ``vlm-export build-ncnn`` (pnnx) and ``--backend ncnn``, checked against ONNX Runtime.

The graph rewrites for pnnx are checked value for value on ONNX Runtime (no pnnx needed). The
conversion and the backend run where pnnx and the ncnn Python package are installed (the
``[ncnn-export]`` and ``[ncnn]`` extras) and are skipped, with one line saying so, elsewhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fakebundle import _replace_encoder, make_bundle
from onnx import TensorProto, helper, numpy_helper

from vlm_export.core import manifest as mf
from vlm_export.core.errors import UserError
from vlm_export.export import cli as export_cli
from vlm_export.export.ncnn import convert as ncnn_convert
from vlm_export.export.ncnn.graph import prepare_for_pnnx
from vlm_export.runtime import cli as runtime_cli
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.checks import parity as engine_parity
from vlm_export.runtime.engines.factory import open_backend

HAVE_PNNX = importlib.util.find_spec("pnnx") is not None
HAVE_NCNN = importlib.util.find_spec("ncnn") is not None
needs_pnnx = pytest.mark.skipif(not HAVE_PNNX, reason='pnnx missing: pip install ".[ncnn-export]"')
needs_ncnn = pytest.mark.skipif(not HAVE_NCNN, reason='ncnn missing: pip install ".[ncnn]"')


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()
    }


def _build(folder: Path, *extra: str) -> int:
    return export_cli.main(["build-ncnn", str(folder), *extra])


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def _sums_graph() -> onnx.ModelProto:
    """One-axis ReduceSums (negative axis, keepdims 0 and 1), a ReduceL2, and an int32 output
    made of two Casts joined by Unsqueeze + Concat (as token_fate is)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 6])
    outputs = [
        helper.make_tensor_value_info("last", TensorProto.FLOAT, [1, 4, 5]),
        helper.make_tensor_value_info("second", TensorProto.FLOAT, [1, 1, 5, 6]),
        helper.make_tensor_value_info("norm", TensorProto.FLOAT, [1, 4, 1, 6]),
        helper.make_tensor_value_info("codes", TensorProto.INT32, [1, 2, 4, 5, 6]),
    ]
    init = [
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array(3.0, np.float32), "three"),
    ]
    nodes = [
        helper.make_node("ReduceSum", ["x", "minus_one"], ["last"], keepdims=0),
        helper.make_node("ReduceSum", ["x", "one"], ["second"], keepdims=1),
        helper.make_node("ReduceL2", ["x"], ["norm"], axes=[2], keepdims=1),
        helper.make_node("Mul", ["x", "three"], ["x3"]),
        helper.make_node("Floor", ["x3"], ["floor"]),
        helper.make_node("Cast", ["floor"], ["code_a"], to=TensorProto.INT32),
        helper.make_node("Cast", ["x3"], ["code_b"], to=TensorProto.INT32),
        helper.make_node("Unsqueeze", ["code_a", "one"], ["ua"]),
        helper.make_node("Unsqueeze", ["code_b", "one"], ["ub"]),
        helper.make_node("Concat", ["ua", "ub"], ["codes"], axis=1),
    ]
    graph = helper.make_graph(nodes, "sums", [x], outputs, init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_rewrites_for_pnnx_keep_every_value() -> None:
    model = _sums_graph()
    prepared, rounded = prepare_for_pnnx(model)
    ops = [node.op_type for node in prepared.graph.node]
    assert "ReduceL2" not in ops and "Cast" not in ops and rounded == ["codes"]
    values = {i.name: numpy_helper.to_array(i) for i in prepared.graph.initializer}
    sums = [node for node in prepared.graph.node if node.op_type == "ReduceSum"]
    assert len(sums) == 3 and all(values[node.input[1]].size == 2 for node in sums)
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 6)).astype(np.float32)
    want, got = _ort(model, {"x": x}), _ort(prepared, {"x": x})
    for name in ("last", "second", "norm"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)
    assert got["codes"].dtype == np.float32
    # the runtime rounds; Cast truncates toward zero: the prepared graph keeps x3's fraction
    assert np.array_equal(np.trunc(got["codes"]).astype(np.int32), want["codes"])


def test_layers_pnnx_left_unconverted_are_named() -> None:
    param = "\n".join(
        [
            "7767517",
            "5 6",
            "Input        in0   0 1 in0",
            "TopK         TopK_1  2 2 a b c d",
            "GatherElements GE_2 2 1 c e f",
            "torch.eq     eq_3  2 1 f g h",
            "MatMul       mm_4  2 1 h i out0",
        ]
    )
    foreign = ncnn_convert.foreign_layers(param)
    assert dict(foreign) == {"TopK": 1, "GatherElements": 1, "torch.eq": 1}
    assert ncnn_convert.describe_foreign(foreign) == "TopK x1, GatherElements x1, torch.eq x1"
    assert ncnn_convert.io_blobs(param) == (["in0"], ["out0"])
    with pytest.raises(ncnn_convert.NcnnConversionError, match="7767517"):
        ncnn_convert.layers_of("not a param file")


def test_missing_converter_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    folder = make_bundle(tmp_path / "b", method="zeroshot")
    before = _hashes(folder)
    if HAVE_PNNX:  # hide the installed one: the same path as a machine without pnnx
        monkeypatch.setattr(ncnn_convert.importlib.util, "find_spec", lambda name: None)
    assert _build(folder) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vlm-export build-ncnn: error: {ncnn_convert.INSTALL_HINT}"]
    assert _hashes(folder) == before


def test_backend_without_graph_or_package_is_one_line(tmp_path) -> None:
    bundle = Bundle.open(make_bundle(tmp_path / "b", method="zeroshot"))
    with pytest.raises(UserError) as caught:
        open_backend(bundle, "ncnn")
    message = str(caught.value)
    assert "\n" not in message
    expected = "vlm-export build-ncnn" if HAVE_NCNN else '".[ncnn]"'
    assert expected in message
    with pytest.raises(UserError, match="runs fp32"):
        open_backend(bundle, "ncnn", precision="int8")


def _computed_fate(folder: Path) -> Path:
    """The fake condensing encoder with token_fate computed (float codes + 0 * anchor shift, then
    a Cast to int32, as the exported graph makes it) instead of an int32 constant."""
    model = onnx.load(folder / mf.IMAGE_ENCODER_ONNX)
    graph = model.graph
    fate = next(i for i in graph.initializer if i.name == "fate")
    codes = numpy_helper.to_array(fate).astype(np.float32)
    graph.initializer.remove(fate)
    graph.initializer.extend(
        [
            numpy_helper.from_array(codes, "fate_codes"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ]
    )
    identity = next(n for n in graph.node if n.output[0] == mf.FATE_OUTPUT)
    graph.node.remove(identity)
    graph.node.extend(
        [
            helper.make_node("Mul", ["anchor_shift", "zero"], ["no_shift"]),
            helper.make_node("Add", ["fate_codes", "no_shift"], ["fate_float"]),
            helper.make_node("Cast", ["fate_float"], [mf.FATE_OUTPUT], to=TensorProto.INT32),
        ]
    )
    _replace_encoder(folder, model)
    return folder


@needs_pnnx
@needs_ncnn
@pytest.mark.parametrize("method", ["zeroshot", "tca"])
def test_build_ncnn_records_a_graph_that_matches_onnxruntime(tmp_path, capsys, method) -> None:
    folder = make_bundle(tmp_path / "b", method=method)
    if method == "tca":
        _computed_fate(folder)
    assert _build(folder) == 0
    out = capsys.readouterr().out
    assert "image_encoder.ncnn.param + image_encoder.ncnn.bin" in out and "cosine" in out
    manifest = mf.read_manifest(folder)
    (record,) = mf.ncnn_engines(manifest)
    assert record["precision"] == "fp32" and record["parity"]["passed"]
    assert record["parity"]["embedding_cosine_min"] >= 0.9999
    assert record["rounded_outputs"] == ([mf.FATE_OUTPUT] if method == "tca" else [])
    for name in (record["file"], record["weights"]):
        assert manifest["files"][name] == mf.file_record(folder / name)
    assert not [p for p in folder.iterdir() if p.name.startswith(".engine-")]

    bundle = Bundle.open(folder)  # sha256 of every listed file, the .bin included
    engine = open_backend(bundle, "ncnn", threads=1)  # the reference-image check at open
    reference = engine_parity.open_reference(folder, manifest)
    try:
        assert engine.description.startswith("ncnn:")
        report = engine_parity.compare_backends(engine, reference, manifest, "fp32", images=3)
    finally:
        engine.close()
        reference.close()
    assert report["passed"] and report["embedding_cosine_min"] >= 0.9999
    assert runtime_cli.main(["info", str(folder)]) == 0
    assert "ncnn graph image_encoder.ncnn.param + image_encoder.ncnn.bin" in capsys.readouterr().out
    if method == "zeroshot":  # a layer this ncnn build lacks: one line naming it, at open
        param = folder / record["file"]
        lines = param.read_text().splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith("InnerProduct"))
        lines[at] = "ArgMax" + lines[at][len("InnerProduct") :]
        param.write_text("\n".join(lines) + "\n")
        with pytest.raises(UserError) as caught:
            open_backend(Bundle.open(folder, verify=False), "ncnn")
        assert str(caught.value) == (
            "this ncnn build has no layer ArgMax that image_encoder.ncnn.param uses"
        )
    if method == "tca":
        assert report["token_fate_agreement_min"] == 1.0
        image = np.zeros(bundle.engine_io("inputs")["image"]["shape"], np.float32)
        engine = open_backend(bundle, "ncnn")
        assert engine.infer(image)[mf.FATE_OUTPUT].dtype == np.int32
        engine.close()


@needs_pnnx
def test_a_listed_graph_is_rebuilt_only_with_overwrite(tmp_path, capsys) -> None:
    folder = make_bundle(tmp_path / "b", method="zeroshot")
    assert _build(folder) == 0
    before = _hashes(folder)
    capsys.readouterr()
    assert _build(folder) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0], err
    assert _hashes(folder) == before
    assert _build(folder, "--overwrite") == 0
    assert len(mf.ncnn_engines(mf.read_manifest(folder))) == 1


@needs_pnnx
def test_a_graph_with_ops_ncnn_lacks_is_refused_naming_them(tmp_path, capsys) -> None:
    """A TopK in the embedding path: pnnx leaves it unconverted; the error names it and the
    bundle is left byte for byte as it was."""
    folder = make_bundle(tmp_path / "b", method="zeroshot")
    model = onnx.load(folder / mf.IMAGE_ENCODER_ONNX)
    graph = model.graph
    embed = int(graph.output[0].type.tensor_type.shape.dim[1].dim_value)
    graph.initializer.append(numpy_helper.from_array(np.array([embed], np.int64), "k"))
    graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    first = next(i for i, node in enumerate(graph.node) if "raw" in node.input)
    for node in graph.node[first:]:
        node.input[:] = ["picked" if name == "raw" else name for name in node.input]
    nodes = list(graph.node)
    nodes[first:first] = [  # sorted values, plus 0 * indices (both TopK outputs used)
        helper.make_node("TopK", ["raw", "k"], ["sorted_raw", "order"], axis=1),
        helper.make_node("Cast", ["order"], ["order_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["order_float", "zero"], ["no_order"]),
        helper.make_node("Add", ["sorted_raw", "no_order"], ["picked"]),
    ]
    del graph.node[:]
    graph.node.extend(nodes)
    _replace_encoder(folder, model)
    before = _hashes(folder)
    assert _build(folder) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TopK x1" in err[0], err
    assert _hashes(folder) == before


@pytest.fixture(scope="module")
def tiny_topk_bundle(tmp_path_factory) -> Path:
    """vlm-test-tiny exported with today's graph (TopK, gathers, ArgMax)."""
    folder = tmp_path_factory.mktemp("tiny") / "bundle"
    classes = tmp_path_factory.mktemp("classes") / "classes.txt"
    classes.write_text("cat\ndog\nbird\n")
    argv = ["--method", "tca", "--model", "vlm-test-tiny", "--pretrained", "none"]
    assert export_cli.main([*argv, "--classes", str(classes), "--out", str(folder)]) == 0
    return folder


@needs_pnnx
def test_todays_condensing_graph_names_the_ops_ncnn_cannot_run(tiny_topk_bundle, capsys) -> None:
    before = _hashes(tiny_topk_bundle)
    capsys.readouterr()
    assert _build(tiny_topk_bundle) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for op in ("TopK x3", "GatherElements", "ArgMax", "ArgMin", "torch.eq", "torch.where"):
        assert op in err[0], err
    assert _hashes(tiny_topk_bundle) == before
    assert json.loads((tiny_topk_bundle / mf.MANIFEST_NAME).read_text())["engines"] == []


@needs_pnnx
@needs_ncnn
def test_the_ncnn_target_graph_converts_and_matches_onnxruntime(tmp_path_factory, capsys) -> None:
    """vlm-test-tiny exported with --target ncnn (no TopK, gathers, ArgMax or comparisons):
    every operation becomes an ncnn layer and ncnn matches ONNX Runtime in fp32."""
    folder = tmp_path_factory.mktemp("tiny_ncnn") / "bundle"
    classes = tmp_path_factory.mktemp("classes") / "classes.txt"
    classes.write_text("cat\ndog\nbird\n")
    argv = ["--method", "tca", "--model", "vlm-test-tiny", "--pretrained", "none"]
    argv += ["--classes", str(classes), "--target", "ncnn", "--out", str(folder)]
    assert export_cli.main(argv) == 0
    capsys.readouterr()
    assert _build(folder) == 0, capsys.readouterr().err
    (record,) = mf.ncnn_engines(mf.read_manifest(folder))
    parity = record["parity"]
    assert parity["passed"] and parity["embedding_cosine_min"] >= 0.9999
    assert parity["token_fate_agreement_min"] == 1.0
    engine = open_backend(Bundle.open(folder), "ncnn")  # the reference-image check at open
    engine.close()
