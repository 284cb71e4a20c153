"""The bundle's text engine and tokenizer: export, parity, TextEncoder == exporter, bad input."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vlm_export.core.errors import UserError  # noqa: E402
from vlm_export.core.manifest import TEXT_ENCODER_ONNX, read_manifest  # noqa: E402
from vlm_export.export import pipeline  # noqa: E402
from vlm_export.export.graph.text_embeddings import encode_class_texts  # noqa: E402
from vlm_export.export.graph.text_engine import TextEngineSkipped, text_engine_problem  # noqa: E402
from vlm_export.export.pipeline import ExportOptions, export_bundle  # noqa: E402
from vlm_export.models.loading import TEST_MODEL, load_clip  # noqa: E402
from vlm_export.models.text_tower import TextTower  # noqa: E402
from vlm_export.runtime.text.encoder import NoTextEngineError, TextEncoder  # noqa: E402
from vlm_export.runtime.text.templates import IMAGENET7, TemplateError  # noqa: E402
from vlm_export.runtime.text.tokenizer import VOCAB_FILE, ClipTokenizer, TokenizerError  # noqa: E402

CLASSES = ["cat", "golden_retriever", "Crème brûlée", "東京タワー"]
LONG = "very " * 80 + "long class"


def _export(out: Path, text_encoder: bool = True) -> Path:
    torch.manual_seed(0)
    options = ExportOptions(
        method="zeroshot",
        model=TEST_MODEL,
        domains=[("d", CLASSES)],
        out=out,
        templates="imagenet7",
        quiet=True,
        text_encoder=text_encoder,
    )
    return export_bundle(options)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("text") / "bundle")


@pytest.fixture(scope="module")
def same_model():
    """The bundle's model: the same random weights (same seed)."""
    torch.manual_seed(0)
    return load_clip(TEST_MODEL, "none")


def test_manifest_records_text_engine_and_tokenizer(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    section, tokenizer = manifest["text_encoder"], manifest["tokenizer"]
    assert section["onnx"] == TEXT_ENCODER_ONNX and TEXT_ENCODER_ONNX in manifest["files"]
    assert section["inputs"][0] == {
        "name": "tokens",
        "shape": ["batch", "length"],
        "dtype": "int64",
    }
    assert section["outputs"][0]["shape"] == ["batch", 32]
    assert section["context_length"] == 77
    assert section["profile"]["tokens"]["max"][1] == 77
    assert section["parity"]["passed"] and section["parity"]["cosine_min"] >= 0.9999
    assert section["parity"]["max_abs"] <= 1e-4
    assert section["tensorrt_operator_check"]["passed"]
    assert tokenizer["vocab"] == VOCAB_FILE and tokenizer["kind"] == "clip_bpe"
    assert manifest["files"][VOCAB_FILE]["sha256"] == tokenizer["sha256"]


def test_text_encoder_reproduces_the_exported_embeddings(bundle: Path) -> None:
    encoder = TextEncoder.open(bundle, backend="onnxruntime")
    got = encoder.embed_classes(CLASSES, IMAGENET7)
    want = np.load(bundle / "text_embeddings.npy")
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5


def test_new_classes_equal_the_exporter(bundle: Path, same_model) -> None:
    exported = np.load(bundle / "text_embeddings.npy")
    model, tokenizer = same_model.model, same_model.tokenizer
    assert np.abs(encode_class_texts(model, tokenizer, CLASSES, IMAGENET7) - exported).max() < 1e-6
    names = ["tree frog", "ping-pong ball", "&amp; O'Neil's 🐱"]
    templates = ("a photo of a {}.", "itap of my {}!", "{}")
    want = encode_class_texts(model, tokenizer, names, templates)
    got = TextEncoder.open(bundle).embed_classes(names, templates)
    assert np.abs(got - want).max() <= 1e-5


def test_text_tower_cut_context_equals_open_clip(same_model) -> None:
    model, tokenizer = same_model.model, same_model.tokenizer
    tokens = tokenizer(["a photo of a cat.", "x", "Crème &amp; brûlée " * 3])
    tower = TextTower(model).eval()
    longest = int(tokens.argmax(dim=-1).max()) + 1
    assert longest < 40
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        for length in (longest, 40, 77):
            assert (tower(tokens[:, :length]) - want).abs().max() < 1e-5
        cut = tokenizer([LONG])
        want = torch.nn.functional.normalize(model.encode_text(cut), dim=-1)
        assert (tower(cut) - want).abs().max() < 1e-5


def test_long_prompt_is_cut_with_a_warning_naming_the_class(
    bundle: Path, same_model, caplog: pytest.LogCaptureFixture
) -> None:
    encoder = TextEncoder.open(bundle)
    with caplog.at_level("WARNING", logger="vlm_export"):
        got = encoder.embed_classes(["cat", LONG], ("a photo of a {}.", "{}"))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "very very" in messages[0] and "2 of its 2 prompts" in messages[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlm_export"):
        want = encode_class_texts(
            same_model.model, same_model.tokenizer, ["cat", LONG], ("a photo of a {}.", "{}")
        )
    assert any("very very" in r.getMessage() for r in caplog.records)
    assert np.abs(got - want).max() <= 1e-5


def test_template_without_placeholder(bundle: Path) -> None:
    with pytest.raises(TemplateError, match="exactly one"):
        TextEncoder.open(bundle).embed_classes(["cat"], ("a photo of a cat",))


def test_vocabulary_failing_its_sha256_is_refused(bundle: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(bundle, tmp_path / "copy")
    with open(copy / VOCAB_FILE, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(TokenizerError, match="sha256"):
        ClipTokenizer.from_bundle(copy)
    with pytest.raises(TokenizerError, match="sha256"):
        TextEncoder.open(copy)
    (copy / VOCAB_FILE).unlink()
    with pytest.raises(TokenizerError, match="missing"):
        TextEncoder.open(copy)


def test_bundle_without_text_engine(tmp_path: Path) -> None:
    out = _export(tmp_path / "plain", text_encoder=False)
    manifest = read_manifest(out)
    assert "text_encoder" not in manifest and "tokenizer" not in manifest
    assert not (out / TEXT_ENCODER_ONNX).exists() and not (out / VOCAB_FILE).exists()
    with pytest.raises(NoTextEngineError, match="no text engine") as caught:
        TextEncoder.open(out)
    assert "\n" not in str(caught.value)
    with pytest.raises(TokenizerError, match="no tokenizer"):
        ClipTokenizer.from_bundle(out)


def test_model_with_another_tokenizer_is_exported_without_text_engine(
    tmp_path: Path, monkeypatch
) -> None:
    from open_clip.tokenizer import SimpleTokenizer

    class HFLike:
        pass

    assert "HFLike" in text_engine_problem(torch.nn.Linear(1, 1), HFLike())
    assert "reduction" in text_engine_problem(
        torch.nn.Linear(1, 1), SimpleTokenizer(reduction_mask="simple")
    )
    monkeypatch.setattr(pipeline, "text_engine_problem", lambda model, tok: "a SigLIP tokenizer")
    with pytest.warns(TextEngineSkipped, match="without a text engine: a SigLIP tokenizer"):
        out = _export(tmp_path / "siglip")
    assert "text_encoder" not in read_manifest(out)


def test_unknown_backend_is_one_line(bundle: Path) -> None:
    with pytest.raises(UserError, match="unknown backend"):
        TextEncoder.open(bundle, backend="cuda")


def test_no_warning_for_ordinary_prompts(bundle: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TextEncoder.open(bundle).embed_classes(["dog"], IMAGENET7)


def test_cuda_device_without_gpu_is_one_line(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    options = ExportOptions(
        method="zeroshot", model=TEST_MODEL, domains=[("d", ["cat"])], out=tmp_path / "x",
        device="cuda", quiet=True,
    )  # fmt: skip
    with pytest.raises(UserError, match="--device cuda"):
        export_bundle(options)
    assert not (tmp_path / "x").exists()


def test_info_shows_text_engine_and_tokenizer(bundle: Path) -> None:
    from vlm_export.runtime.bundle import Bundle
    from vlm_export.runtime.commands.info import describe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = "\n".join(describe(Bundle.open(bundle)))
    assert "text engine text_encoder.onnx" in text
    assert "tokens [batchxlength] int64" in text and "max [256, 77]" in text
    assert "tokenizer clip_bpe" in text and VOCAB_FILE in text


def test_manifest_needs_both_text_sections(bundle: Path) -> None:
    from vlm_export.core.errors import BundleError
    from vlm_export.core.manifest import validate_manifest

    manifest = read_manifest(bundle)
    del manifest["tokenizer"]
    with pytest.raises(BundleError, match="both a text_encoder and a tokenizer"):
        validate_manifest(manifest)


@pytest.mark.slow
def test_vit_b16_text_engine_parity_and_text_encoder(tmp_path: Path) -> None:
    """ViT-B-16 (random weights): the exported text engine passes parity vs open_clip, and
    TextEncoder.embed_classes equals the exporter's embeddings."""
    from vlm_export.export.graph.text_engine import export_text_engine
    from vlm_export.runtime.text.encoder import OnnxRuntimeTextRunner

    torch.manual_seed(0)
    loaded = load_clip("ViT-B-16", "none")
    sections = export_text_engine(tmp_path, loaded.model, loaded.tokenizer, 17)
    parity = sections["text_encoder"]["parity"]
    assert parity["passed"] and parity["cosine_min"] >= 0.9999 and parity["max_abs"] <= 1e-4
    names = ["golden_retriever", "tabby cat", "Crème brûlée"]
    want = encode_class_texts(loaded.model, loaded.tokenizer, names, IMAGENET7)
    runner = OnnxRuntimeTextRunner(tmp_path / TEXT_ENCODER_ONNX)
    encoder = TextEncoder(runner, ClipTokenizer.from_file(tmp_path / VOCAB_FILE), 77)
    assert np.abs(encoder.embed_classes(names, IMAGENET7) - want).max() <= 1e-5
