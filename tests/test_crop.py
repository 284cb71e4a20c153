"""--crop center|letterbox|squash: what the engine sees of a wide frame, and the outline of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle
from PIL import Image

from vlm_export.core.errors import UserError
from vlm_export.runtime import cli
from vlm_export.runtime.draw.explain import explain_figure
from vlm_export.runtime.draw.fate import OUTLINE_COLOUR, engine_view_box, outline_view
from vlm_export.runtime.io.preprocess import Preprocessor

CONFIG = {
    "size": [32, 32],
    "resize_mode": "shortest",
    "interpolation": "bicubic",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tca") / "bundle", method="tca")


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16:9 frame: left third red, middle green, right third blue."""
    pixels = np.zeros((90, 160, 3), np.uint8)
    pixels[:, :53, 0] = pixels[:, 53:107, 1] = pixels[:, 107:, 2] = 255
    path = tmp_path_factory.mktemp("frames") / "wide.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize(("crop", "mode"), [("letterbox", "longest"), ("squash", "squash")])
def test_crop_is_the_resize_mode_of_the_same_name(wide, crop, mode) -> None:
    image = Image.open(wide)
    chosen = Preprocessor(CONFIG, crop=crop)(image)
    assert np.array_equal(chosen, Preprocessor({**CONFIG, "resize_mode": mode})(image))
    assert not np.array_equal(chosen, Preprocessor(CONFIG)(image))  # not the centre square
    assert Preprocessor(CONFIG, crop=crop).crop == crop and Preprocessor(CONFIG).crop == "center"


def test_what_each_crop_keeps_of_a_wide_frame(wide) -> None:
    image = Image.open(wide)
    red = lambda tensor: float((tensor[0] > 1.5).mean())  # noqa: E731 - red (255) normalises to 2
    center = Preprocessor(CONFIG, crop="center")(image)
    letterbox = Preprocessor(CONFIG, crop="letterbox")(image)
    squash = Preprocessor(CONFIG, crop="squash")(image)
    # the centre square is columns 35..125 of 160: 18 of its 90 columns are red
    assert red(center) == pytest.approx((53 - 35) / 90, abs=0.05)
    assert red(squash) == pytest.approx(1 / 3, abs=0.05)
    assert red(letterbox) == pytest.approx(9 / 16 / 3, abs=0.05)
    padding = (0 - 0.5) / 0.25  # black fill, normalised
    assert np.allclose(letterbox[:, 0, :], padding) and np.allclose(letterbox[:, -1, :], padding)


def test_an_unknown_crop_is_refused() -> None:
    with pytest.raises(UserError, match="unknown crop 'middle'"):
        Preprocessor(CONFIG, crop="middle")


def test_outline_drawn_only_where_the_engine_did_not_see_the_whole_frame() -> None:
    frame = Image.new("RGB", (160, 90), "black")
    center = engine_view_box(frame.size, (32, 32), "shortest")
    outlined = np.asarray(outline_view(frame, center))
    left = round(center[0])
    assert tuple(outlined[0, left]) == OUTLINE_COLOUR and tuple(outlined[0, 0]) == (0, 0, 0)
    assert not np.asarray(frame).any()  # the caller's frame is not drawn on
    for mode in ("longest", "squash"):
        box = engine_view_box(frame.size, (32, 32), mode)
        assert outline_view(frame, box) is frame


def test_explain_figure_shows_the_frame_when_the_crop_cut_it(wide) -> None:
    frame = Image.open(wide).convert("RGB")
    seen = Preprocessor(CONFIG).resize_crop(frame)
    topk = [(0, "cat", 0.7), (1, "dog", 0.3)]
    plain = explain_figure(seen, topk, "t", ["f"], (4, 4))
    box = engine_view_box(frame.size, (32, 32), "shortest")
    with_frame = explain_figure(seen, topk, "t", ["f"], (4, 4), frame=frame, box=box)
    assert with_frame.width > plain.width
    whole = engine_view_box(frame.size, (32, 32), "squash")
    same = explain_figure(seen, topk, "t", ["f"], (4, 4), frame=frame, box=whole)
    assert same.size == plain.size


def test_run_save_annotated_outlines_the_centre_crop(bundle, wide, tmp_path, capsys) -> None:
    for crop in ("center", "letterbox"):
        out = tmp_path / crop
        argv = ["run", str(bundle), str(wide), "--crop", crop, "--save-annotated", str(out)]
        assert cli.main([*argv, "--out", str(tmp_path / f"{crop}.jsonl"), "--quiet"]) == 0
        assert f"crop {crop}" in capsys.readouterr().err
        picture = np.asarray(Image.open(out / "wide.annotated.png").convert("RGB"))
        box = engine_view_box((160, 90), (32, 32), "shortest")
        column = picture[60:, round(box[0])]  # below the banner, on the crop's left edge
        has_outline = bool((column == OUTLINE_COLOUR).all(axis=1).any())
        assert has_outline == (crop == "center")


def test_eval_tta_records_the_crop(bundle, tmp_path) -> None:
    data = tmp_path / "data"
    for name in ("cat", "dog"):
        (data / name).mkdir(parents=True)
        Image.new("RGB", (64, 36), name == "cat" and "red" or "blue").save(data / name / "a.png")
    report = tmp_path / "tta.json"
    argv = ["eval-tta", str(bundle), str(data), "--crop", "squash", "--json", str(report)]
    assert cli.main([*argv, "--quiet"]) == 0
    assert json.loads(report.read_text())["crop"] == "squash"
