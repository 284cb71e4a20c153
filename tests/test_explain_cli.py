"""``vlm-edge explain``, ``run --save-annotated`` and ``eval --plot``: the pictures they write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fakebundle import DOMAINS, make_bundle, write_images
from PIL import Image

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import TOKEN_FATE
from vlm_export.runtime import cli
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.draw.annotate import banner_height
from vlm_export.runtime.draw.explain import upscale
from vlm_export.runtime.draw.fate import FATE_STYLE, OUTLINE_COLOUR
from vlm_export.runtime.draw.heatmap import scale_colour
from vlm_export.runtime.engines.factory import open_backend
from vlm_export.runtime.pipeline import Pipeline

GREY = (120, 130, 140)


@pytest.fixture(scope="module")
def tca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tca") / "bundle", method="tca")


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("zs") / "bundle", method="zeroshot")


def _edge(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, list[str]]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err.strip().splitlines()


def _blend(code: int) -> np.ndarray:
    _, colour, opacity = FATE_STYLE[code]
    alpha = round(255 * opacity) / 255
    return np.array([(1 - alpha) * b + alpha * c for b, c in zip(GREY, colour, strict=True)])


def test_frame_result_carries_the_engines_token_fate(tca_dir, full_dir, tmp_path) -> None:
    image = Image.new("RGB", (40, 50), GREY)
    for folder in (tca_dir, full_dir):
        bundle = Bundle.open(folder)
        pipeline = Pipeline(bundle, open_backend(bundle, "onnxruntime"), "zeroshot")
        result = pipeline.process(image)
        session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        if "token_fate" not in names:
            assert result.token_fate is None
            continue
        feed = {"image": pipeline.preprocessor(image)[None]}
        for item in session.get_inputs()[1:]:
            feed[item.name] = np.zeros(item.shape, np.float32)
        expected = session.run(["token_fate"], feed)[0][0]
        assert result.token_fate.dtype == np.int8
        np.testing.assert_array_equal(result.token_fate, expected)


def test_explain_draws_each_block_in_fate_colours(tca_dir, tmp_path, capsys) -> None:
    grey = tmp_path / "grey.png"
    Image.new("RGB", (64, 64), GREY).save(grey)  # square: no frame panel (the crop cuts nothing)
    others = write_images(tmp_path / "photos", 2)
    out = tmp_path / "pictures"
    code, stdout, err = _edge(capsys, "explain", tca_dir, grey, *others, "--out", out)
    assert code == 0 and stdout == ""
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grey.explain.png", "img_0000.explain.png", "img_0001.explain.png"]
    assert "3 of 3 pictures written" in err[-1]
    # The fake engine keeps the first half of its 4 x 4 patches and prunes the rest, at both
    # reduction blocks: each block panel holds 8 kept and 8 pruned cells of the uniform grey
    # (kept cells untinted, like the 16 cells of the engine's view beside them).
    figure = np.asarray(Image.open(out / "grey.explain.png").convert("RGB")).reshape(-1, 3)
    cell = upscale(Image.new("RGB", (32, 32)), (4, 4)).width // 4
    for code, cells in ((TOKEN_FATE["kept"], 2 * 8 + 16), (TOKEN_FATE["pruned"], 2 * 8)):
        count = (np.abs(figure - _blend(code)).max(axis=1) <= 1.5).sum()
        assert 0.9 * cells * cell**2 <= count <= cells * cell**2
    for code in (TOKEN_FATE["merged"], TOKEN_FATE["gone"]):
        assert (np.abs(figure - _blend(code)).max(axis=1) <= 1.5).sum() == 0


def test_explain_on_a_full_tower_says_so_in_one_line(full_dir, tmp_path, capsys) -> None:
    image = write_images(tmp_path / "photos", 1)[0]
    code, _, err = _edge(capsys, "explain", full_dir, image, "--out", tmp_path / "out")
    assert code == 0
    notes = [line for line in err if "condenses nothing" in line]
    assert len(notes) == 1 and "full tower" in notes[0]
    picture = Image.open(tmp_path / "out" / "img_0000.explain.png")
    picture.load()
    assert picture.width > 320


def test_explain_goes_on_past_an_unreadable_image(tca_dir, tmp_path, capsys) -> None:
    good = write_images(tmp_path / "photos", 2)
    bad = tmp_path / "photos" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    missing = tmp_path / "photos" / "missing.png"
    out = tmp_path / "out"
    code, _, err = _edge(capsys, "explain", tca_dir, good[0], bad, missing, good[1], "--out", out)
    assert code == 1
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 2 and "broken.jpg" in errors[0] and "missing.png" in errors[1]
    assert sorted(p.name for p in out.iterdir()) == ["img_0000.explain.png", "img_0001.explain.png"]
    assert "2 of 4 pictures written" in err[-1]


def test_explain_never_writes_among_its_inputs(tca_dir, tmp_path, capsys) -> None:
    folder = tmp_path / "photos"
    first = write_images(folder, 1, suffix=".png")[0]
    clash = folder / "img_0000.explain.png"  # an input named like the first image's output
    clash.write_bytes(first.read_bytes())
    before = sorted((p.name, p.read_bytes()) for p in folder.iterdir())
    code, _, err = _edge(capsys, "explain", tca_dir, first, clash, "--out", folder)
    assert code == 1 and len(err) == 1 and "among the inputs" in err[0], err
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir()) == before


def test_explain_gives_images_of_one_name_two_pictures(tca_dir, tmp_path, capsys) -> None:
    first = write_images(tmp_path / "a", 1, suffix=".png")[0]
    second = write_images(tmp_path / "b", 1, suffix=".png")[0]
    out = tmp_path / "out"
    code, _, _ = _edge(capsys, "explain", tca_dir, first, second, "--out", out)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "img_0000-2.explain.png",
        "img_0000.explain.png",
    ]


def test_explain_bad_output_and_arguments(tca_dir, tmp_path, capsys) -> None:
    image = write_images(tmp_path / "photos", 1)[0]
    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    code, _, err = _edge(capsys, "explain", tca_dir, image, "--out", a_file)
    assert code == 1 and len(err) == 1 and "is a file, not a folder" in err[0]
    code, _, err = _edge(capsys, "explain", tca_dir, image, "--out", a_file / "sub")
    assert code == 1 and len(err) == 1 and "is a file, not a folder" in err[0]
    code, _, err = _edge(capsys, "explain", tca_dir, image, "--out", tmp_path / "o", "--topk", 0)
    assert code == 1 and len(err) == 1 and "--topk" in err[0]
    assert not (tmp_path / "o").exists() and a_file.read_text() == "x"


# ------------------------------------------------------------------ run --save-annotated
def _video(path: Path, frames: int, size: tuple[int, int] = (96, 64)) -> Path:
    cv2 = pytest.importorskip("cv2")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, size)
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    writer.release()
    return path


def test_save_annotated_folder_of_images(tca_dir, tmp_path, capsys) -> None:
    photos = tmp_path / "photos"
    paths = write_images(photos, 3)
    (photos / "img_0001.jpg").write_bytes(b"broken")
    Image.new("RGB", (80, 40), GREY).save(photos / "grey.png")
    Image.new("RGB", (640, 480), GREY).save(photos / "large.png")
    out = tmp_path / "annotated"
    argv = ["run", tca_dir, photos, "--save-annotated", out, "--annotate-fate", "--quiet"]
    code, stdout, _ = _edge(capsys, *argv)
    assert code == 0 and len(stdout.splitlines()) == 5
    names = sorted(p.name for p in out.iterdir())
    expected = ["grey", "img_0000", "img_0002", "large"]
    assert names == [f"{name}.annotated.png" for name in expected]
    for name, source in (("img_0000", paths[0]), ("img_0002", paths[2])):
        width, height = Image.open(source).size  # the whole frame, under the banner strip
        expected_size = (width, height + banner_height((width, height)))
        assert Image.open(out / f"{name}.annotated.png").size == expected_size
    # the grey image: a 40 x 40 engine view in the middle, its lower half (patches 8-15) pruned
    drawn = np.asarray(Image.open(out / "grey.annotated.png").convert("RGB")).astype(float)
    drawn = drawn[banner_height((80, 40)) :]  # the frame itself
    assert (drawn[:, :15] == GREY).all() and (drawn[:, 65:] == GREY).all()
    np.testing.assert_allclose(drawn[35, 25], _blend(TOKEN_FATE["pruned"]), atol=1.5)
    np.testing.assert_allclose(drawn[35, 55], _blend(TOKEN_FATE["pruned"]), atol=1.5)
    assert (drawn[:, 20] == OUTLINE_COLOUR).all(axis=1).any()  # the centre crop's edge, outlined
    # a frame with room for it gets the legend in its bottom-left corner (pure swatch colours)
    large = np.asarray(Image.open(out / "large.annotated.png").convert("RGB"))
    corner = {tuple(c) for c in large[-60:, :320].reshape(-1, 3)}
    for code in (TOKEN_FATE["merged"], TOKEN_FATE["pruned"]):
        assert FATE_STYLE[code][1] in corner


def test_save_annotated_video(tca_dir, tmp_path, capsys) -> None:
    cv2 = pytest.importorskip("cv2")
    clip = _video(tmp_path / "clip.mp4", 7)
    out = tmp_path / "out" / "annotated.mp4"
    code, stdout, _ = _edge(capsys, "run", tca_dir, clip, "--save-annotated", out, "--quiet")
    assert code == 0 and len(stdout.splitlines()) == 7
    assert sorted(p.name for p in out.parent.iterdir()) == ["annotated.mp4"]  # no temp file left
    capture = cv2.VideoCapture(str(out))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    assert fps == pytest.approx(10.0)
    banner = banner_height((96, 64))  # the frame keeps its shape; the banner adds rows
    height = 64 + banner + (64 + banner) % 2  # mp4v takes even sides: one black row padded
    assert len(frames) == 7 and frames[0].shape == (height, 96, 3)
    assert frames[0][:8].mean() < frames[0][banner + 4 :].mean() - 40  # the dark banner on top
    strided = tmp_path / "out" / "strided.mp4"
    argv = ["run", tca_dir, clip, "--stride", "2", "--save-annotated", strided, "--quiet"]
    assert _edge(capsys, *argv)[0] == 0
    capture = cv2.VideoCapture(str(strided))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(5.0)  # every 2nd frame of 10 fps
    capture.release()


def test_save_annotated_video_is_not_left_half_written(
    tca_dir, tmp_path, capsys, monkeypatch
) -> None:
    clip = _video(tmp_path / "clip.mp4", 6)
    process = Pipeline.process

    def failing(self, frame, index=0, source=""):
        if index == 3:
            raise UserError("the engine went away")
        return process(self, frame, index, source)

    monkeypatch.setattr(Pipeline, "process", failing)
    out = tmp_path / "out"
    code, stdout, err = _edge(capsys, "run", tca_dir, clip, "--save-annotated", out / "a.mp4")
    assert code == 1 and len(stdout.splitlines()) == 3
    assert "the engine went away" in err[-1]
    assert list(out.iterdir()) == []  # the three frames drawn so far went with the temp file


def test_save_annotated_bad_targets(tca_dir, full_dir, tmp_path, capsys) -> None:
    clip = _video(tmp_path / "clip.mp4", 2)
    photos = tmp_path / "photos"
    write_images(photos, 1)
    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    cases = [
        ([tca_dir, photos, "--save-annotated", a_file], "is a file; for images it is a folder"),
        ([tca_dir, clip, "--save-annotated", tmp_path / "out.png"], "ending in .mp4"),
        ([tca_dir, clip, "--save-annotated", a_file / "v.mp4"], "is a file, not a folder"),
        ([full_dir, photos, "--save-annotated", tmp_path / "a", "--annotate-fate"], "full tower"),
        ([tca_dir, photos, "--annotate-fate"], "needs --save-annotated"),
    ]
    for argv, message in cases:
        code, stdout, err = _edge(capsys, "run", *argv, "--quiet")
        assert code == 1 and stdout == "", argv
        assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "photos", "taken.txt"]


def test_save_annotated_into_a_read_only_folder(tca_dir, tmp_path, capsys) -> None:
    clip = _video(tmp_path / "clip.mp4", 2)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who may write anywhere (root)")
        for target in (locked / "a.mp4", locked / "sub" / "a.mp4"):
            code, stdout, err = _edge(capsys, "run", tca_dir, clip, "--save-annotated", target)
            assert code == 1 and stdout == ""
            assert len(err) == 1 and "no write permission" in err[0]
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------ eval --plot
def test_eval_plot_draws_every_table(tca_dir, tmp_path, capsys) -> None:
    root = tmp_path / "data"
    for domain, names in DOMAINS.items():
        for offset, name in enumerate(names):
            write_images(root / domain / name, 3, seed=offset)
    plot, report = tmp_path / "plots" / "xtail.png", tmp_path / "xtail.json"
    argv = ["eval", tca_dir, root, "--order", "animals,vehicles", "--shots", 1, "--quiet"]
    argv += ["--hidden-dim", 16, "--json", report, "--plot", plot]
    code, _, err = _edge(capsys, *argv)
    assert code == 0, err
    assert any("heatmaps drawn in" in line for line in err)
    picture = Image.open(plot)
    picture.load()
    assert picture.format == "PNG" and list(plot.parent.iterdir()) == [plot]
    colours = {tuple(c) for c in np.asarray(picture.convert("RGB")).reshape(-1, 3)}
    results = json.loads(report.read_text())["results"]
    assert set(results) == {"zeroshot", "primal", "dual"}
    for result in results.values():  # every cell of every table is there in its colour
        for value in np.array(result["table"]).ravel():
            assert scale_colour(value) in colours


def test_eval_plot_refuses_before_any_work(tca_dir, tmp_path, capsys) -> None:
    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    argv = ["eval", tca_dir, tmp_path / "nowhere", "--order", "animals"]
    for target, message in ((tmp_path / "plot.jpg", "ending in .png"), (a_file / "p.png", "file")):
        code, stdout, err = _edge(capsys, *argv, "--plot", target)
        assert code == 1 and stdout == "" and len(err) == 1 and message in err[0]
