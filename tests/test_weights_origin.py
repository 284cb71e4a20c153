"""A checkpoint builds the model its weights were trained with (QuickGELU for OpenAI's CLIP).

Random-weight checkpoints written here in OpenAI's formats (a state dict with OpenAI's extra
entries, a TorchScript archive) and in open_clip's; the built model's activation module and the
manifest's record are checked, and a file that does not say gives one warning line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from vlm_export.core.manifest import read_manifest  # noqa: E402
from vlm_export.export.cli import main  # noqa: E402
from vlm_export.models.loading import TEST_MODEL, ModelLoadError, load_clip  # noqa: E402
from vlm_export.models.weights_origin import checkpoint_origin  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OPENAI_EXTRAS = {"input_resolution": 64, "context_length": 77, "vocab_size": 49408}


def _activation_module(model: torch.nn.Module) -> str:
    return type(model.visual.transformer.resblocks[0].mlp.gelu).__name__


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return load_clip(TEST_MODEL, "none").model.state_dict()


@pytest.fixture()
def open_clip_file(tmp_path: Path, tiny_weights) -> Path:
    path = tmp_path / "open_clip_format.pt"
    torch.save(tiny_weights, path)
    return path


@pytest.fixture()
def openai_file(tmp_path: Path, tiny_weights) -> Path:
    """A state dict as OpenAI's released checkpoints hold it: fp16, with their extra entries."""
    weights = {key: value.half() for key, value in tiny_weights.items()}
    weights.update({key: torch.tensor(value) for key, value in OPENAI_EXTRAS.items()})
    path = tmp_path / "ViT-tiny.pt"
    torch.save(weights, path)
    return path


def test_openai_format_state_dict_builds_quick_gelu(openai_file, tiny_weights):
    loaded = load_clip(TEST_MODEL, str(openai_file))
    assert _activation_module(loaded.model) == "QuickGELU"
    assert loaded.activation == "quick_gelu" and loaded.activation_source == "checkpoint"
    proj = loaded.model.visual.proj.detach()
    assert torch.equal(proj, tiny_weights["visual.proj"].half().float())  # the file's weights


def test_safetensors_in_either_format(tmp_path, tiny_weights):
    from safetensors.torch import save_file

    plain = {key: value.contiguous() for key, value in tiny_weights.items()}
    openai = {**plain, **{key: torch.tensor(value) for key, value in OPENAI_EXTRAS.items()}}
    for name, weights, module in (("oa", openai, "QuickGELU"), ("oc", plain, "GELU")):
        path = tmp_path / f"{name}.safetensors"
        save_file(weights, str(path))
        loaded = load_clip(TEST_MODEL, str(path))
        assert _activation_module(loaded.model) == module, name
        assert torch.equal(loaded.model.visual.proj.detach(), tiny_weights["visual.proj"])


def test_torchscript_archive_builds_quick_gelu(tmp_path, tiny_weights):
    """OpenAI's .pt files are TorchScript archives: torch.load(weights_only=True) refuses them."""
    model = load_clip(TEST_MODEL, "none").model
    model.load_state_dict(tiny_weights)
    model.register_buffer("input_resolution", torch.tensor(64))
    traced = torch.jit.trace_module(
        model.eval(), {"encode_image": torch.zeros(1, 3, 64, 64)}, check_trace=False
    )
    path = tmp_path / "ViT-tiny-jit.pt"
    traced.save(str(path))
    loaded = load_clip(TEST_MODEL, str(path))
    assert _activation_module(loaded.model) == "QuickGELU"
    assert loaded.activation_source == "checkpoint"
    assert torch.equal(loaded.model.visual.proj.detach(), tiny_weights["visual.proj"])


def test_open_clip_format_says_nothing_and_warns(open_clip_file, caplog):
    with caplog.at_level("WARNING", logger="vlm_export"):
        loaded = load_clip(TEST_MODEL, str(open_clip_file))
    assert _activation_module(loaded.model) == "GELU"
    assert loaded.activation == "gelu" and loaded.activation_source == "unknown"
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "cannot tell which activation" in warnings[0]
    assert "\n" not in warnings[0] and "--force-quick-gelu" in warnings[0]


def test_force_quick_gelu_still_forces(open_clip_file, caplog):
    with caplog.at_level("WARNING", logger="vlm_export"):
        loaded = load_clip(TEST_MODEL, str(open_clip_file), force_quick_gelu=True)
    assert _activation_module(loaded.model) == "QuickGELU" and loaded.activation_source == "flag"
    assert not caplog.records


def test_the_folders_open_clip_config_says_it(open_clip_file, caplog):
    config = json.loads((REPO / "vlm_export/models/model_configs/vlm-test-tiny.json").read_text())
    config["quick_gelu"] = True
    (open_clip_file.parent / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    with caplog.at_level("WARNING", logger="vlm_export"):
        loaded = load_clip(TEST_MODEL, str(open_clip_file))
    assert _activation_module(loaded.model) == "QuickGELU"
    assert loaded.activation_source == "hub-config" and not caplog.records


def test_a_hub_cache_folder_names_its_tag(tmp_path):
    """huggingface_hub keeps a repo's files under models--ORG--NAME: the repo is a tag's."""
    snapshot = tmp_path / "hub/models--timm--vit_base_patch16_clip_224.openai/snapshots/abc"
    origin = checkpoint_origin("ViT-B-16", snapshot / "open_clip_pytorch_model.bin", False)
    assert (origin.quick_gelu, origin.source, origin.tag) == (True, "hub-config", "openai")
    laion = tmp_path / "hub/models--laion--CLIP-ViT-B-16-laion2B-s34B-b88K/snapshots/abc/w.bin"
    origin = checkpoint_origin("ViT-B-16", laion, False)
    assert (origin.quick_gelu, origin.tag) == (False, "laion2b_s34b_b88k")
    assert checkpoint_origin("ViT-B-16", tmp_path / "w.bin", False).source == "unknown"


@pytest.fixture()
def tiny_tag(monkeypatch) -> str:
    """A pretrained tag of the tiny model in open_clip's table, as a tag of QuickGELU weights
    prepared with other mean and std (ViT-L-14's laion2b_s32b_b82k has mean 0.5)."""
    from open_clip import pretrained

    record = {"hf_hub": "", "url": "", "mean": (0.5,) * 3, "std": (0.5,) * 3, "quick_gelu": True}
    monkeypatch.setitem(pretrained._PRETRAINED, TEST_MODEL, {"halfmean": record})
    return "halfmean"


def test_pretrained_tag_builds_as_the_tag(tmp_path, open_clip_file, tiny_tag, caplog):
    """The file says nothing; --pretrained-tag names the tag: its activation and preprocessing."""
    from vlm_export.export.pipeline import ExportOptions, export_bundle

    with caplog.at_level("WARNING", logger="vlm_export"):
        loaded = load_clip(TEST_MODEL, str(open_clip_file), pretrained_tag=tiny_tag)
    assert _activation_module(loaded.model) == "QuickGELU" and not caplog.records
    assert (loaded.activation_source, loaded.pretrained_tag) == ("tag", tiny_tag)
    assert tuple(loaded.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)
    options = ExportOptions(
        method="zeroshot",
        model=TEST_MODEL,
        pretrained=str(open_clip_file),
        pretrained_tag=tiny_tag,
        domains=[("things", ["cat", "dog"])],
        templates="single",
        out=tmp_path / "bundle",
        quiet=True,
    )
    manifest = read_manifest(export_bundle(options))
    assert manifest["model"]["pretrained_tag"] == tiny_tag
    assert manifest["model"]["activation"] == "quick_gelu"
    assert manifest["preprocess"]["mean"] == [0.5, 0.5, 0.5]


def test_a_tag_that_contradicts_the_file_is_refused(openai_file):
    with pytest.raises(ModelLoadError, match="leave --pretrained-tag out"):
        load_clip("ViT-B-32", str(openai_file), pretrained_tag="laion2b_s34b_b79k")
    with pytest.raises(ModelLoadError, match="no pretrained tag 'nope'"):
        load_clip("ViT-B-32", str(openai_file), pretrained_tag="nope")
    with pytest.raises(ModelLoadError, match="local checkpoint file"):
        load_clip(TEST_MODEL, "none", pretrained_tag="openai")


def _export(tmp_path: Path, checkpoint: Path, capsys, *extra: str) -> tuple[int, str, Path]:
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    out = tmp_path / "bundle"
    argv = ["--method", "tca", "--model", TEST_MODEL, "--pretrained", str(checkpoint)]
    argv += ["--templates", "single", "--quiet", "--classes", str(classes), "--out", str(out)]
    code = main([*argv, *extra])
    return code, capsys.readouterr().err, out


def _image_graph_ops(bundle: Path) -> set[str]:
    import onnx

    graph = onnx.load(str(bundle / "image_encoder.onnx"), load_external_data=False).graph
    return {node.op_type for node in graph.node}


def test_export_records_the_activation_and_how(tmp_path, openai_file, capsys):
    code, err, out = _export(tmp_path, openai_file, capsys)
    assert code == 0, err
    assert "activation" not in err  # known: no warning
    model = read_manifest(out)["model"]  # read_manifest checks the schema
    assert model["activation"] == "quick_gelu" and model["activation_source"] == "checkpoint"
    assert "pretrained_tag" not in model  # the tiny model has no tags
    ops = _image_graph_ops(out)  # QuickGELU is x * sigmoid(1.702 x); GELU exports as Erf
    assert "Sigmoid" in ops and "Erf" not in ops


def test_export_of_a_file_that_does_not_say_warns_in_one_line(tmp_path, open_clip_file, capsys):
    code, err, out = _export(tmp_path, open_clip_file, capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "activation" in line]
    assert len(lines) == 1 and lines[0].startswith("vlm-export: WARNING: cannot tell"), err
    model = read_manifest(out)["model"]
    assert model["activation"] == "gelu" and model["activation_source"] == "unknown"
    assert "Erf" in _image_graph_ops(out)


@pytest.mark.parametrize(
    ("pretrained", "tag", "message"),
    [
        ("none", "openai", "names the tag of the weights in a local checkpoint file"),
        ("FILE", "no-such-tag", "has no pretrained tag 'no-such-tag'"),
    ],
)
def test_pretrained_tag_mistakes_are_one_line(
    tmp_path, openai_file, capsys, pretrained, tag, message
):
    checkpoint = openai_file if pretrained == "FILE" else Path(pretrained)
    code, err, out = _export(
        tmp_path, checkpoint, capsys, "--model", "ViT-B-32", "--pretrained-tag", tag
    )
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not out.exists()


@pytest.mark.slow
def test_openai_tag_and_its_weights_by_file_build_quick_gelu(tmp_path):
    """ViT-B-32 random weights in a Hugging Face cache as the openai tag's: the tag, the cached
    file by path, and a copy elsewhere with --pretrained-tag openai all build QuickGELU."""
    repo = "models--timm--vit_base_patch32_clip_224.openai"
    snapshot = tmp_path / "hf/hub" / repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "hf/hub" / repo / "refs").mkdir()
    (tmp_path / "hf/hub" / repo / "refs/main").write_text("0" * 40)
    weights = load_clip("ViT-B-32", "none").model.state_dict()
    torch.save({key: value.half() for key, value in weights.items()}, snapshot / "w.bin")
    os.replace(snapshot / "w.bin", snapshot / "open_clip_pytorch_model.bin")
    elsewhere = tmp_path / "vit-b-32.bin"
    os.link(snapshot / "open_clip_pytorch_model.bin", elsewhere)
    child = (
        "import json, sys\n"
        "from vlm_export.models.loading import load_clip\n"
        "rows = []\n"
        "for pretrained, tag in [('openai', None), (sys.argv[1], None), (sys.argv[2], 'openai')]:\n"
        "    loaded = load_clip('ViT-B-32', pretrained, pretrained_tag=tag)\n"
        "    block = loaded.model.visual.transformer.resblocks[0]\n"
        "    rows.append([type(block.mlp.gelu).__name__, loaded.activation_source,\n"
        "                 loaded.pretrained_tag])\n"
        "print(json.dumps(rows))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf")}
    env["HF_HUB_OFFLINE"] = "1"
    args = [str(snapshot / "open_clip_pytorch_model.bin"), str(elsewhere)]
    result = subprocess.run(
        [sys.executable, "-c", child, *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert rows == [
        ["QuickGELU", "tag", "openai"],
        ["QuickGELU", "hub-config", "openai"],
        ["QuickGELU", "tag", "openai"],
    ]


def test_random_weights_are_seeded_and_leave_the_global_generator_alone():
    """--pretrained none draws the same weights whatever the global torch seed (so build-litert
    can rebuild a random-weight bundle), records the seed, and does not move the global RNG."""
    torch.manual_seed(1)
    first = load_clip(TEST_MODEL, "none")
    after_first = torch.rand(1)
    torch.manual_seed(1)
    _ = torch.rand(0)
    second = load_clip(TEST_MODEL, "none")
    assert torch.equal(torch.rand(1), after_first)  # the global stream was not consumed
    assert first.random_seed == second.random_seed == 0
    pairs = zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
