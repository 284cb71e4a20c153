"""Hostile-user review of issue 9 (explain, --save-annotated, text output, the Python API)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle, write_images
from PIL import Image

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import TOKEN_FATE
from vlm_export.runtime import cli, open_pipeline
from vlm_export.runtime.draw.annotate import annotate_frame, banner_height
from vlm_export.runtime.draw.fate import fate_overlay
from vlm_export.runtime.draw.style import fit_text, font, text_block
from vlm_export.runtime.io.preprocess import ImageError
from vlm_export.runtime.terminal import printable, width


@pytest.fixture(scope="module")
def tca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tca") / "bundle", method="tca")


def _edge(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, list[str]]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err.strip().splitlines()


def test_explain_with_a_link_loop_among_the_images(tca_dir, tmp_path, capsys) -> None:
    Image.new("RGB", (40, 40), (90, 120, 200)).save(tmp_path / "ok.png")
    os.symlink("loop", tmp_path / "loop")
    out = tmp_path / "out"
    code, _, err = _edge(capsys, "explain", tca_dir, tmp_path / "loop", tmp_path / "ok.png",
                         "--out", out, "--quiet")  # fmt: skip
    assert code == 1
    assert any("cannot read image" in line and "loop" in line for line in err)
    assert sorted(p.name for p in out.iterdir()) == ["ok.explain.png"]


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (1, 300), (300, 1)])
def test_fate_overlay_on_a_frame_smaller_than_the_patch_grid(size) -> None:
    image = Image.new("RGB", size, (10, 20, 30))
    fate = np.full(16, TOKEN_FATE["pruned"], dtype=np.int8)
    drawn = fate_overlay(image, fate, (4, 4))
    assert drawn.size == size and drawn.mode == "RGB"


def test_save_annotated_tiny_images_with_fate(tca_dir, tmp_path, capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, size in (("dot", (1, 1)), ("line", (80, 1)), ("column", (1, 80))):
        Image.new("RGB", size, (200, 40, 40)).save(photos / f"{name}.png")
    out = tmp_path / "annotated"
    argv = ["run", tca_dir, photos, "--save-annotated", out, "--annotate-fate", "--quiet"]
    code, stdout, _ = _edge(capsys, *argv)
    assert code == 0 and len(stdout.splitlines()) == 3
    for name, (wide, high) in (("dot", (1, 1)), ("line", (80, 1)), ("column", (1, 80))):
        expected = (wide, high + banner_height((wide, high)))  # the banner strip above
        assert Image.open(out / f"{name}.annotated.png").size == expected


def test_save_annotated_never_replaces_an_input_image(tca_dir, tmp_path, capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 40), (200, 40, 40)).save(photos / "a.png")
    Image.new("RGB", (30, 20), (40, 200, 40)).save(photos / "a.annotated.png")
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    argv = ["run", tca_dir, photos, "--save-annotated", photos, "--quiet"]
    code, stdout, err = _edge(capsys, *argv)  # never among the inputs (issue 18)
    assert code == 1 and stdout == "" and len(err) == 1 and "is SOURCE" in err[0], err
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
    out = tmp_path / "annotated"  # elsewhere: an image named like an output keeps its own name
    code, stdout, _ = _edge(capsys, *argv[:3], "--save-annotated", out, "--quiet")
    assert code == 0 and len(stdout.splitlines()) == 2
    assert sorted(p.name for p in out.iterdir()) == ["a.annotated.annotated.png", "a.annotated.png"]


def test_save_annotated_refuses_the_source_video(tca_dir, tmp_path, capsys) -> None:
    cv2 = pytest.importorskip("cv2")
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 48))
    for value in range(5):
        writer.write(np.full((48, 64, 3), 40 * value, dtype=np.uint8))
    writer.release()
    data = clip.read_bytes()
    os.symlink(clip.name, tmp_path / "link.mp4")
    for target in (clip, tmp_path / "link.mp4"):
        code, stdout, err = _edge(capsys, "run", tca_dir, clip, "--save-annotated", target)
        assert code == 1 and stdout == ""
        assert err == [f"vlm-edge: error: --save-annotated {target} is SOURCE {clip}, which "
                       "this run reads: write it to another path"]  # fmt: skip
        assert clip.read_bytes() == data


@pytest.fixture(scope="module")
def api_pipeline(tca_dir):
    with open_pipeline(tca_dir) as pipeline:
        yield pipeline


@pytest.mark.parametrize(
    ("array", "channels", "message"),
    [
        (np.zeros((0, 0, 3), np.uint8), "RGB", "the image array is empty: got shape 0x0x3"),
        (np.zeros((0, 5), np.uint8), None, "the image array is empty: got shape 0x5"),
        (np.zeros((8, 8, 4), np.uint8), None, "channels='RGBA' or 'BGRA'"),
        (
            np.zeros((8, 8, 4), np.uint8),
            "GRAY",
            "does not fit a 8x8x4 array: give channels='RGBA' or 'BGRA'",
        ),
        (
            np.zeros((8, 8, 3), np.uint8),
            "GRAY",
            "does not fit a 8x8x3 array: give channels='RGB' or 'BGR'",
        ),
    ],
)
def test_classify_refuses_empty_arrays_and_a_wrong_gray(api_pipeline, array, channels, message):
    with pytest.raises(ImageError) as caught:
        api_pipeline.classify(array, channels=channels)
    assert str(caught.value).endswith(message)


def test_classify_pil_images_that_cannot_be_decoded_or_are_empty(api_pipeline, tmp_path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    lazy = Image.open(tmp_path / "cut.jpg")  # PIL decodes only when the pixels are needed
    with pytest.raises(ImageError, match=r"cannot read image .*cut\.jpg: image file is truncated"):
        api_pipeline.classify(lazy)
    with pytest.raises(ImageError, match=r"the image is empty \(0x0 pixels\)"):
        api_pipeline.classify(Image.new("RGB", (0, 0)))


@pytest.mark.parametrize("topk", [2.5, "3", None, True])
def test_classify_topk_that_is_not_a_whole_number(api_pipeline, topk) -> None:
    with pytest.raises(UserError, match="topk must be at least 1"):
        api_pipeline.classify(np.zeros((8, 8), np.uint8), topk=topk)


ODD_NAMES = ["line\nbreak", "\x1b[31mred\x1b[0m", "tab\there", "\u202eevil", "漢字😀", "x" * 300]


def test_printable_and_width_against_literal_expectations() -> None:
    assert printable("cat") == "cat"
    assert printable("line\nbreak") == "line\\nbreak"
    assert printable("\x1b[31mred") == "\\x1b[31mred"
    assert printable("\u202eevil") == "\\u202eevil"
    assert printable(os.fsdecode(b"bad\xff.png")) == "bad\\xff.png"
    assert printable("漢字😀 ok") == "漢字😀 ok"
    assert (width("abc"), width("漢字"), width("😀"), width("e\u0301")) == (3, 4, 2, 1)


def test_text_output_with_odd_class_and_file_names(tca_dir, tmp_path, capsys) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tca_dir, bundle)
    listing = json.loads((bundle / "classes.json").read_text())
    for entry, name in zip(listing["classes"], ODD_NAMES, strict=True):
        entry["name"] = name
    (bundle / "classes.json").write_text(json.dumps(listing))
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for index in range(12):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"p{index:02d}\x1b[2J.png")
    (photos / "broken\nname.png").write_bytes(b"not an image")
    argv = ["run", bundle, photos, "--format", "text", "--no-verify", "--quiet"]
    code, stdout, err = _edge(capsys, *argv)
    assert code == 0
    lines = stdout.splitlines()
    frames = [line for line in lines if line[:6].strip().isdigit()]
    assert len(frames) == 13  # one line per frame, whatever the names hold
    assert not any(char in stdout for char in "\x1b\t\u202e")
    assert "broken\\nname.png" in stdout and "p00\\x1b[2J.png" in stdout
    ends = {width(line) for line in frames if "error" not in line}
    assert len(ends) == 1  # the columns line up, wide characters included
    assert all(line.startswith("vlm-edge: ") for line in err)


def test_a_state_that_cannot_be_saved_does_not_hide_the_blocks_own_error(
    tca_dir, tmp_path, caplog
) -> None:
    folder = tmp_path / "states"

    def block_the_folder() -> None:  # after open_pipeline checked it: the save fails
        if folder.is_dir():
            folder.rmdir()
        folder.write_text("now a file")

    folder.mkdir()
    with (
        pytest.raises(ValueError, match="the user's own bug"),
        open_pipeline(tca_dir, state=folder / "state.npz") as pipeline,
    ):
        pipeline.classify(np.zeros((8, 8), np.uint8))
        block_the_folder()
        raise ValueError("the user's own bug")
    assert any("state not saved" in record.getMessage() for record in caplog.records)
    folder.unlink()
    folder.mkdir()
    with (
        pytest.raises(UserError, match="cannot write"),
        open_pipeline(  # no error in the block
            tca_dir, state=folder / "state.npz"
        ) as pipeline,
    ):
        pipeline.classify(np.zeros((8, 8), np.uint8))
        block_the_folder()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "{bundle}", ""], "SOURCE is empty: give a path"),
        (["run", "{bundle}", "{image}", "--save-annotated", ""], "--save-annotated is empty"),
        (["run", "{bundle}", "{image}", "--out", " "], "--out is empty"),
        (["run", "{bundle}", "{image}", "--state", ""], "--state is empty"),
        (["explain", "{bundle}", "{image}", "--out", ""], "--out is empty: give a folder"),
    ],
)
def test_empty_paths_are_refused_not_taken_as_the_current_folder(
    tca_dir, tmp_path, capsys, monkeypatch, argv, message
) -> None:
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 40), (90, 120, 200)).save(image)
    monkeypatch.chdir(tmp_path)
    argv = [arg.format(bundle=tca_dir, image=image) for arg in argv]
    code, stdout, err = _edge(capsys, *argv)
    assert code == 1 and stdout == ""
    assert err == [f"vlm-edge: error: {message}" + err[0].split(message, 1)[1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]


def test_pictures_keep_each_name_on_its_line() -> None:
    one_line = text_block(["cat (99.0%)"], 16)
    for odd in ("line\nbreak (99.0%)", "a\r\nb\x1b[2J (99.0%)", "tab\there\v (99.0%)"):
        assert text_block([odd], 16).height == one_line.height
        assert "\n" not in fit_text(odd, font(16), 400)
    grey = Image.new("RGB", (320, 240), (120, 130, 140))
    banner_rows = [
        int((np.asarray(annotate_frame(grey, label, 0.5)).mean(axis=(1, 2)) < 100).sum())
        for label in ("cat", "line\nbreak\nagain")
    ]
    assert banner_rows[0] == banner_rows[1]  # the dark banner is as tall for both


@pytest.mark.parametrize("name", ["out.mp4", "out.AVI", "out.png"])
def test_save_annotated_of_images_refuses_a_file_name(tca_dir, tmp_path, capsys, name) -> None:
    Image.new("RGB", (40, 40), (90, 120, 200)).save(tmp_path / "photo.png")
    argv = ["run", tca_dir, tmp_path / "photo.png", "--save-annotated", tmp_path / name]
    code, stdout, err = _edge(capsys, *argv)
    assert code == 1 and stdout == ""
    assert err[-1].endswith("give a folder name") and "image sources give a folder" in err[-1]
    assert not (tmp_path / name).exists()  # no folder named like a video


def test_eval_plot_refuses_the_json_path_and_a_place_inside_data_root(
    tca_dir, tmp_path, capsys
) -> None:
    data = tmp_path / "data"
    write_images(data / "animals" / "cat", 2)
    argv = ["eval", tca_dir, data, "--order", "animals"]
    for extra, message in (
        (["--plot", tmp_path / "r.png", "--json", tmp_path / "r.png"], "are the same file"),
        (["--plot", data / "animals" / "cat" / "plot.png"], "is inside DATA_ROOT"),
        (["--plot", ""], "--plot is empty: give a path"),
        (["--plot", tmp_path / ".png"], "--plot writes a PNG"),
    ):  # fmt: skip
        code, stdout, err = _edge(capsys, *argv, *extra)
        assert code == 1 and stdout == "" and len(err) == 1 and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert len(list((data / "animals" / "cat").iterdir())) == 2
