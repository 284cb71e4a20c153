"""A real tca export against the manifest schema: the text engine, tokenizer, class capacity and
engine records are described and typed, and a wrong type in each is one line naming the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from vlm_export.core import manifest as mf  # noqa: E402
from vlm_export.core.manifest_schema import schema_problem  # noqa: E402
from vlm_export.export import cli  # noqa: E402
from vlm_export.export.int8.quantize import GraphRecord  # noqa: E402
from vlm_export.export.tensorrt.build import EngineRecord  # noqa: E402
from vlm_export.runtime.engines.select import TEXT_ROLE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HASH = "0" * 64


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> dict:
    """The manifest of a tiny tca export, with a TensorRT text engine and an INT8 graph recorded
    as the exporter's own records write them."""
    out = tmp_path_factory.mktemp("schema") / "bundle"
    argv = ["--method", "tca", "--model", "vlm-test-tiny", "--pretrained", "none", "--quiet"]
    argv += ["--classes", str(REPO / "examples" / "cifar10_classes.txt"), "--out", str(out)]
    assert cli.main(argv) == 0
    result = json.loads((out / mf.MANIFEST_NAME).read_text())
    text_engine = EngineRecord(
        "text.engine", "10.3.0.30", "8.7", "fp16", 1024, "Orin", "2026-01-01T00:00:00+00:00",
        HASH, 10, parity={"passed": True}, role=TEXT_ROLE,
    )  # fmt: skip
    graph = GraphRecord("image_encoder.int8.onnx", HASH, 10, {"scope": "blocks"}, {"passed": True})
    result["engines"] = [text_engine.to_manifest(), graph.to_manifest()]
    return result


def test_real_export_conforms_with_the_new_sections(manifest: dict) -> None:
    assert schema_problem(manifest) is None
    mf.validate_manifest(manifest)
    assert manifest["text_encoder"]["inputs"][0]["shape"] == ["batch", "length"]
    assert manifest["tokenizer"]["kind"] == "clip_bpe"
    assert manifest["condensation"]["class_capacity"] >= manifest["labels"]["num_classes"]
    assert manifest["text"]["template_strings"]
    assert [e.get("role") for e in manifest["engines"]] == [TEXT_ROLE, None]
    assert [e.get("format") for e in manifest["engines"]] == [None, mf.ONNX_ENGINE_FORMAT]


WRONG = [
    (("text_encoder", "context_length"), "77", "text_encoder.context_length: expected an integer"),
    (("text_encoder", "context_length"), 1, "text_encoder.context_length: expected a number >= 2"),
    (("text_encoder", "onnx"), "../t.onnx", "text_encoder.onnx: expected a plain file name"),
    (("text_encoder", "inputs", 0, "shape", 1), 7.5, "inputs[0].shape[1]: expected an integer or"),
    (("text_encoder", "profile", "tokens", "max"), [77], "max: expected a list of exactly 2"),
    (("text_encoder", "geometry", "vocab_size"), "big", "geometry.vocab_size: expected an integer"),
    (("text_encoder", "parity", "passed"), "yes", "text_encoder.parity.passed: expected true or"),
    (("text_encoder", "embedding_normalized"), 1, "embedding_normalized: expected true or false"),
    (("tokenizer", "vocab"), ["v.gz"], "tokenizer.vocab: expected a file name (string), got a"),
    (("tokenizer", "sha256"), "ABC", "tokenizer.sha256: expected lower-case hex sha256"),
    (("tokenizer", "context_length"), None, "tokenizer.context_length: expected an integer"),
    (("condensation", "class_capacity"), "10", "condensation.class_capacity: expected an integer"),
    (("text", "template_strings"), "a {}", "text.template_strings: expected a list"),
    (("engines", 0, "role"), 3, "engines[0].role: expected one of 'image_encoder', 'text_encoder'"),
    (
        ("engines", 1, "format"),
        "plan",
        "engines[1].format: expected one of 'onnx', 'openvino', 'tensorrt'",
    ),
    (("engines", 1, "quantization"), [], "engines[1].quantization: expected an object, got a list"),
]


@pytest.mark.parametrize(("path", "value", "message"), WRONG)
def test_wrong_type_in_a_new_section_is_one_line(manifest, path, value, message) -> None:
    edited = copy.deepcopy(manifest)
    *parents, last = path
    node = edited
    for key in parents:
        node = node[key]
    node[last] = value
    problem = schema_problem(edited)
    assert problem is not None and "\n" not in problem
    assert message in problem
    with pytest.raises(mf.BundleError, match="manifest.json: "):
        mf.validate_manifest(edited)
