"""The vlm-export command end to end on the tiny model, and its one-line errors."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from vlm_export.core.manifest import read_manifest, verify_files  # noqa: E402
from vlm_export.export.cli import main  # noqa: E402

BASE = ["--model", "vlm-test-tiny", "--pretrained", "none", "--templates", "single", "--quiet"]


@pytest.fixture()
def classes(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat\ndog\nbird\nsea_lion\n")
    return path


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tca_export_writes_a_complete_bundle(tmp_path, classes, capsys):
    out = tmp_path / "bundle"
    code, stdout, stderr = _run(
        [
            "--method",
            "tca",
            *BASE,
            "--classes",
            str(classes),
            "--drop-rate",
            "0.1",
            "--merge-centers",
            "2",
            "--ranking",
            "consensus",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, stderr
    assert "RANDOM" in stderr
    manifest = read_manifest(out)
    verify_files(out, manifest)
    assert manifest["model"]["untrained"] is True
    cond = manifest["condensation"]
    assert cond["reduction_layers"] == [1, 2, 3] and cond["anchor_layers"] == [0, 1, 2]
    assert [row["tokens_out"] for row in cond["schedule"]] == [48, 37, 29]
    assert cond["ranking"] == "consensus"
    assert manifest["parity"]["passed"] and manifest["parity"]["cosine_min"] > 0.9999
    flops = manifest["flops"]
    assert flops["condensed_gflops"] < flops["full_gflops"]
    assert flops["torch_counter"]["full"] == pytest.approx(flops["closed_form"]["full"], rel=1e-6)
    names = {entry["name"]: entry["shape"] for entry in manifest["engine"]["inputs"]}
    # default class capacity: 1000 anchor rows for 4 classes
    assert names == {"image": [1, 3, 64, 64], "anchors": [1000, 3, 64], "anchors_valid": [1000]}
    assert cond["class_capacity"] == 1000
    assert set(manifest["files"]) == {
        "image_encoder.onnx",
        "text_embeddings.npy",
        "classes.json",
        "text_encoder.onnx",  # the text engine and its vocabulary (on by default)
        "bpe_simple_vocab_16e6.txt.gz",
        "image_encoder.reference.npy",  # the reference images' embeddings (the check at open)
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary leftovers"


def test_rail_export_records_union_label_space(tmp_path, capsys):
    pets, cars = tmp_path / "pets.txt", tmp_path / "cars.txt"
    pets.write_text("cat\ndog\n")
    cars.write_text("sedan\ncat\n")
    out = tmp_path / "rail"
    code, _, err = _run(
        [
            "--method",
            "rail",
            *BASE,
            "--domain",
            f"pets={pets}",
            "--domain",
            f"cars={cars}",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    manifest = read_manifest(out)
    assert manifest["condensation"] is None
    assert [i["name"] for i in manifest["engine"]["inputs"]] == ["image"]
    labels = json.loads((out / "classes.json").read_text())
    assert labels["domains"] == ["pets", "cars"]
    assert [(c["name"], c["domain"]) for c in labels["classes"]] == [
        ("cat", "pets"),
        ("dog", "pets"),
        ("sedan", "cars"),
        ("cat", "cars"),
    ]
    assert manifest["labels"]["shared_names"] == {"cat": ["pets", "cars"]}


def test_target_gflops_picks_largest_budget(tmp_path, classes, capsys):
    out = tmp_path / "budget"
    code, _, err = _run(
        [
            "--method",
            "tca",
            *BASE,
            "--classes",
            str(classes),
            "--target-gflops",
            "0.0135",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    manifest = read_manifest(out)
    rate = manifest["condensation"]["drop_rate"]
    assert manifest["flops"]["condensed_gflops"] <= 0.0135
    from vlm_export.models.condensing_tower import CondensingVisionTower
    from vlm_export.models.flops import closed_form_gflops
    from vlm_export.models.loading import load_clip
    from vlm_export.models.schedule import CondensationConfig

    visual = load_clip("vlm-test-tiny").model.visual
    looser = CondensingVisionTower(visual, CondensationConfig(drop_rate=round(rate - 0.001, 6)))
    assert closed_form_gflops(looser) > 0.0135, "a larger budget would also have met the target"


def _bad(tmp_path, classes, extra):
    return [
        "--method",
        "tca",
        *BASE,
        "--classes",
        str(classes),
        "--out",
        str(tmp_path / "never"),
        *extra,
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "ViT-B-99"], "unknown model 'ViT-B-99'"),
        (["--pretrained", "missing/ckpt.pt"], "checkpoint file not found"),
        (["--drop-rate", "0.45"], "impossible token budget at block"),
        (["--reduction-layers", "1,9"], "out of range"),
        (["--templates", "TEMPLATE_FILE"], "{}"),
        (["--pretrained", "no-such-tag"], "has no pretrained tag"),
        (["--merge-centers", "40"], "fewer than the 40 merge centres"),
        (["--tca-preset", "bogus"], "unknown TCA preset 'bogus'"),
        (["--drop-rate", "0.001"], "does not condense at block 1"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, classes, capsys, extra, message):
    template = tmp_path / "templates.txt"
    template.write_text("a photo of a thing\n")
    extra = [str(template) if item == "TEMPLATE_FILE" else item for item in extra]
    code, _, err = _run(_bad(tmp_path, classes, extra), capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vlm-export: error:"), err
    assert message in lines[0]
    assert not (tmp_path / "never").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.txt", "templates.txt"]


def test_bad_class_lists(tmp_path, capsys):
    empty, dup = tmp_path / "empty.txt", tmp_path / "dup.txt"
    empty.write_text("\n# nothing\n")
    dup.write_text("cat\ndog\ncat\n")
    for path, message in ((empty, "empty"), (dup, "cat")):
        code, _, err = _run(
            ["--method", "tca", *BASE, "--classes", str(path), "--out", str(tmp_path / "x")], capsys
        )
        assert code == 2 and message in err and "Traceback" not in err


def test_checkpoint_that_does_not_fit(tmp_path, classes, capsys):
    import torch

    checkpoint = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, checkpoint)
    code, _, err = _run(_bad(tmp_path, classes, ["--pretrained", str(checkpoint)]), capsys)
    assert code == 2 and "does not fit vlm-test-tiny" in err and "missing keys" in err


class Opaque:
    """A class that weights-only loading refuses to unpickle."""


def test_checkpoint_with_pickled_objects_or_garbage(tmp_path, classes, capsys):
    import torch

    pickled, garbage = tmp_path / "pickled.pt", tmp_path / "garbage.pt"
    torch.save({"weights": Opaque()}, pickled)
    garbage.write_bytes(b"not a checkpoint")
    for path, message in ((pickled, "beyond plain weights"), (garbage, "not a readable")):
        code, _, err = _run(_bad(tmp_path, classes, ["--pretrained", str(path)]), capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_output_below_a_file_is_refused_before_work(tmp_path, classes, capsys):
    code, _, err = _run(
        ["--method", "tca", *BASE, "--classes", str(classes), "--out", str(classes / "sub")],
        capsys,
    )
    assert code == 2 and "is a file, not a folder" in err


def test_existing_output_needs_overwrite(tmp_path, classes, capsys):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = ["--method", "zeroshot", *BASE, "--classes", str(classes), "--out", str(out)]
    code, _, err = _run(args, capsys)
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "user data"
    code, _, err = _run([*args, "--overwrite"], capsys)  # not a bundle: refused
    assert code == 2 and "only a vlm-export bundle" in err and "keep.txt" in err
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    for _ in range(2):  # an empty folder, then the bundle itself, are replaced
        code, _, err = _run([*args, "--overwrite"], capsys)
        assert code == 0, err
        assert (out / "manifest.json").is_file()


def test_pretrained_tag_without_network_names_alternatives(tmp_path, classes, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _run(
        [
            "--method",
            "zeroshot",
            "--model",
            "ViT-B-32",
            "--pretrained",
            "openai",
            "--quiet",
            "--classes",
            str(classes),
            "--out",
            str(tmp_path / "x"),
        ],
        capsys,
    )
    assert code == 2
    assert "local checkpoint file" in err and "--pretrained none" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_tensorrt_flag_fails_before_exporting_without_tensorrt(tmp_path, classes, capsys):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    out = tmp_path / "trt"
    code, _, err = _run(
        ["--method", "tca", *BASE, "--classes", str(classes), "--out", str(out), "--tensorrt"],
        capsys,
    )
    assert code == 2 and "TensorRT is not installed" in err and "build-engine" in err
    assert not out.exists()


def test_failed_parity_fails_the_export_and_leaves_nothing(tmp_path, classes, capsys, monkeypatch):
    import vlm_export.export.graph.parity as parity

    monkeypatch.setattr(parity, "MIN_COSINE", 1.1)  # no graph can meet this
    out = tmp_path / "bundle"
    code, _, err = _run(
        ["--method", "tca", *BASE, "--classes", str(classes), "--out", str(out)], capsys
    )
    assert code == 2 and "ONNX Runtime output differs from PyTorch" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.txt"]


def test_parity_gates_cls_stack_and_token_fate(tiny_clip, tmp_path, monkeypatch):
    import numpy as np

    import vlm_export.export.graph.parity as parity
    from vlm_export.export.graph.onnx_export import export_onnx
    from vlm_export.models.condensing_tower import CondensingVisionTower
    from vlm_export.models.schedule import CondensationConfig

    tower = CondensingVisionTower(tiny_clip.model.visual, CondensationConfig(0.1, 2), 3).eval()
    path = tmp_path / "t.onnx"
    export_onnx(tower, path)
    report = parity.check_parity(tower, path)
    assert report["passed"] and report["token_fate_agreement_min"] == 1.0
    assert report["cls_cosine_min"] > 0.9999

    real_run = parity.ort.InferenceSession.run

    def corrupt(self, names, feeds):  # an engine that condenses other tokens, same embedding
        outputs = real_run(self, names, feeds)
        if "token_fate" in names:
            fate = outputs[names.index("token_fate")]
            outputs[names.index("token_fate")] = np.roll(fate, 1, axis=-1)
        return outputs

    monkeypatch.setattr(parity.ort.InferenceSession, "run", corrupt)
    with pytest.raises(parity.ParityError, match="token fate agreement"):
        parity.check_parity(tower, path)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-classes", "100000000", "--max-classes must be 1 to 100,000, got 100,000,000"),
        ("--max-classes", "0", "--max-classes must be 1 to 100,000, got 0"),
        ("--batch-size", "100000", "--batch-size must be 1 to 256, got 100,000"),
        ("--batch-size", "0", "--batch-size must be 1 to 256, got 0"),
    ],
)
def test_engine_sizes_are_bounded_before_torch_loads(
    tmp_path, classes, capsys, option, value, message
):
    out = tmp_path / "b"
    argv = ["--method", "tca", *BASE, "--classes", str(classes), "--out", str(out), option, value]
    code, _, err = _run(argv, capsys)
    assert code == 2 and err.strip().splitlines() == [f"vlm-export: error: {message}"]
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-gflops", "0"], "--target-gflops must be a positive number, got 0.0"),
        (["--target-gflops", "nan"], "--target-gflops must be a positive number, got nan"),
        (["--drop-rates", "0,,0.1"], "--drop-rates has an empty item: '0,,0.1'"),
    ],
)
def test_budget_options_say_what_is_wrong(tmp_path, classes, capsys, extra, message):
    out = tmp_path / "b"
    argv = ["--method", "tca", *BASE, "--classes", str(classes), "--out", str(out), *extra]
    code, _, err = _run(argv, capsys)
    assert code == 2 and err.strip().splitlines() == [f"vlm-export: error: {message}"]
    assert not out.exists()


@pytest.mark.parametrize("method", ["zeroshot", "rail"])
def test_condensation_options_are_refused_for_a_full_tower(tmp_path, classes, capsys, method):
    out = tmp_path / "b"
    argv = [*BASE, "--classes", str(classes), "--out", str(out), "--drop-rate", "0.1"]
    code, _, err = _run(["--method", method, *argv], capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"vlm-export: error: --drop-rate needs method tca or tca+rail (exporting {method}, "
        "which keeps every token)"
    ]
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--drop-rate", "0.45"], "impossible token budget at block"),
        (["--reduction-layers", "1,9"], "out of range"),
        (["--merge-centers", "40"], "fewer than the 40 merge centres"),
        (["--drop-rate", "0.001"], "does not condense at block 1"),
        (["--drop-rates", "0,0.45"], "--drop-rates rung 1 (drop rate 0.45): impossible"),
    ],
)
def test_an_impossible_token_budget_is_refused_before_the_model_loads(
    tmp_path, classes, capsys, monkeypatch, extra, message
):
    """The schedule comes from the model's config: a wrong budget costs no weights loading."""
    from vlm_export.export import pipeline

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_clip", never)
    code, _, err = _run(_bad(tmp_path, classes, extra), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


@pytest.mark.parametrize("after", ["the old bundle moved aside", "the new bundle moved in"])
def test_ctrl_c_during_the_overwrite_swap_keeps_one_whole_bundle(
    tmp_path, classes, capsys, monkeypatch, after
):
    """A real SIGINT through vlm-export's own handling right after either rename of the swap:
    the new bundle stands whole, the command succeeds, nothing is left parked."""
    import os
    import signal

    from vlm_export.core import atomic

    out = tmp_path / "bundle"
    argv = ["--method", "tca", *BASE, "--classes", str(classes), "--out", str(out)]
    assert _run(argv, capsys)[0] == 0
    real = os.replace

    def replace(src, dst, *args, **kwargs) -> None:
        real(src, dst, *args, **kwargs)
        moved_aside = str(src) == str(out) and atomic.TEMP_MARK in str(dst)
        if moved_aside == (after == "the old bundle moved aside"):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(atomic.os, "replace", replace)
    pets = tmp_path / "pets.txt"
    pets.write_text("cat\ndog\n")
    argv = ["--method", "tca", *BASE, "--classes", str(pets), "--out", str(out), "--overwrite"]
    code, _, stderr = _run(argv, capsys)
    assert code == 0 and "interrupted" not in stderr, stderr
    manifest = read_manifest(out)
    verify_files(out, manifest)
    assert manifest["labels"]["num_classes"] == 2  # the new bundle's classes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "classes.txt", "pets.txt"]
