"""Pictures of vlm_export.runtime.draw, checked pixel by pixel against plain references."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlm_export.core.manifest import TOKEN_FATE
from vlm_export.runtime.draw.annotate import annotate_frame, banner_height, banner_text
from vlm_export.runtime.draw.bars import topk_bars
from vlm_export.runtime.draw.explain import explain_figure, upscale
from vlm_export.runtime.draw.fate import (
    FATE_STYLE,
    engine_view_box,
    fate_counts,
    fate_overlay,
    final_fate,
    patch_grid,
)
from vlm_export.runtime.draw.heatmap import SCALE, heatmap, scale_colour
from vlm_export.runtime.draw.style import ACCENT, ACCENT_LIGHT
from vlm_export.runtime.io.preprocess import shortest_side_size

GREY = (120, 130, 140)


def blend(base: tuple[int, ...], code: int) -> np.ndarray:
    """What a tinted cell must look like: the fate colour over the base at the fate's opacity."""
    _, colour, opacity = FATE_STYLE[code]
    alpha = round(255 * opacity) / 255
    return np.array([(1 - alpha) * b + alpha * c for b, c in zip(base, colour, strict=True)])


def cell_centre(box: tuple[float, ...], grid: tuple[int, int], index: int) -> tuple[int, int]:
    left, top, right, bottom = box
    rows, cols = grid
    row, col = divmod(index, cols)
    x = left + (col + 0.5) * (right - left) / cols
    y = top + (row + 0.5) * (bottom - top) / rows
    return int(x), int(y)


@pytest.mark.parametrize("size", [(80, 60), (333, 201)])
def test_fate_colours_land_on_their_patch_cells(size: tuple[int, int]) -> None:
    grid = (3, 4)
    rng = np.random.default_rng(0)
    fate = rng.choice(list(TOKEN_FATE.values()), size=12)
    image = Image.new("RGB", size, GREY)
    drawn = np.asarray(fate_overlay(image, fate, grid)).astype(float)
    box = (0, 0, *size)
    for index, code in enumerate(fate):
        x, y = cell_centre(box, grid, index)
        np.testing.assert_allclose(drawn[y, x], blend(GREY, int(code)), atol=1.5)
    assert drawn.shape == (size[1], size[0], 3)


def test_fate_overlay_inside_a_box_leaves_the_rest_alone() -> None:
    image = Image.new("RGB", (200, 100), GREY)
    box = (50.0, 0.0, 150.0, 100.0)  # the centre crop of a square engine view
    fate = np.array([TOKEN_FATE["pruned"], TOKEN_FATE["kept"], TOKEN_FATE["merged"], -1])
    drawn = np.asarray(fate_overlay(image, fate, (2, 2), box)).astype(float)
    assert (drawn[:, :50] == GREY).all() and (drawn[:, 150:] == GREY).all()
    for index, code in enumerate(fate):
        x, y = cell_centre(box, (2, 2), index)
        np.testing.assert_allclose(drawn[y, x], blend(GREY, int(code)), atol=1.5)


def test_fate_overlay_refuses_a_wrong_grid() -> None:
    with pytest.raises(ValueError, match="do not fill a 3 x 3"):
        fate_overlay(Image.new("RGB", (9, 9)), np.zeros(8), (3, 3))


def test_final_fate_and_counts() -> None:
    fate = np.array(
        [
            [0, 0, 1, 2, 0],
            [0, 2, -1, -1, 1],
            [0, -1, -1, -1, -1],
        ]
    )
    expected = []
    for patch in fate.T:  # literal: the first block where the patch left, else kept
        left = [code for code in patch if code in (1, 2)]
        expected.append(left[0] if left else 0)
    assert final_fate(fate).tolist() == expected == [0, 2, 1, 2, 1]
    assert fate_counts(fate[1]) == {"kept": 1, "merged": 1, "pruned": 1, "already gone": 2}


def test_patch_grid_from_the_manifest() -> None:
    manifest = {"preprocess": {"size": [224, 224]}, "model": {"patch_size": 16}}
    assert patch_grid(manifest) == (14, 14)
    manifest = {"preprocess": {"size": [384, 256]}, "model": {"patch_size": [32, 16]}}
    assert patch_grid(manifest) == (12, 16)


def test_engine_view_box_matches_the_preprocessing_crop() -> None:
    width, height = 640, 480
    new_h, new_w = shortest_side_size(height, width, 224)  # open_clip's resize, then crop
    left = round((new_w - 224) / 2) * width / new_w
    box = engine_view_box((width, height), (224, 224), "shortest")
    np.testing.assert_allclose(box, (left, 0, width - left, height), atol=1.0)
    assert engine_view_box((640, 480), (224, 224), "squash") == (0, 0, 640, 480)
    assert engine_view_box((640, 480), (224, 224), "longest") == (0, -80, 640, 560)


def test_annotate_frame_puts_the_banner_above_the_whole_frame() -> None:
    image = Image.new("RGB", (320, 240), GREY)
    drawn = np.asarray(annotate_frame(image, "cat", 0.873, 12.34))
    strip = banner_height(image.size)
    assert drawn.shape == (240 + strip, 320, 3)
    assert (drawn[strip:] == GREY).all()  # the whole frame, none of it covered
    banner = drawn[:strip]
    assert (banner.max(axis=2) > 200).any()  # white text
    assert (banner.mean(axis=2) < GREY[0] - 30).mean() > 0.5  # on a darkened strip
    assert banner_text("cat", 0.873, 12.34) == "cat  87.3%  |  12.3 fps"
    assert banner_text("cat", None, None) == "cat"


def test_topk_bars_are_as_long_as_the_scores() -> None:
    topk = [(0, "cat", 0.75), (1, "dog", 0.25), (2, "a bird", 0.0)]
    drawn = np.asarray(topk_bars(topk, 600, 16)).astype(int)
    rows = drawn.shape[0] // 3

    def bar_length(rank: int, colour: tuple[int, int, int]) -> int:
        band = drawn[rank * rows : (rank + 1) * rows]
        return int((np.abs(band - colour).sum(axis=2) == 0).sum(axis=1).max())

    first, second = bar_length(0, ACCENT), bar_length(1, ACCENT_LIGHT)
    assert first > 200 and abs(first - 3 * second) <= 3
    assert bar_length(2, ACCENT_LIGHT) == 0


def test_heatmap_cells_take_the_scale_colour() -> None:
    table = np.array([[0.0, 0.5], [1.0, np.nan]])
    drawn = np.asarray(heatmap(table, ["after a", "after b"], ["a", "b"], "title", cell=60))
    assert scale_colour(0.0) == SCALE[0] and scale_colour(1.0) == SCALE[-1]
    colours = {tuple(c) for c in drawn.reshape(-1, 3)}
    for value in (0.0, 0.5, 1.0):
        assert scale_colour(value) in colours


def test_heatmap_long_column_labels_stand_upright_and_whole() -> None:
    """A domain name wider than its column is turned upright: each heading stays over its own
    column, as tall as the name is wide (level, it was cut and ran into its neighbours)."""
    from vlm_export.runtime.draw.style import font, text_size

    names = ["a_rather_long_domain_name_here", "short", "another_long_one_for_columns"]
    drawn = np.asarray(heatmap(np.full((3, 3), 0.5), ["r1", "r2", "r3"], names, "t", cell=60))
    cells = np.all(drawn == scale_colour(0.5), axis=2)
    rows, columns = np.nonzero(cells)
    grid_top, left, right = rows.min(), columns.min(), columns.max()
    ink = drawn[:grid_top].astype(int).sum(axis=2) < 300
    assert not ink[:, right + 2 :].any()  # nothing past the last column
    for j, name in enumerate(names):
        heading = np.nonzero(ink[:, left + j * 60 : left + (j + 1) * 60 - 2].any(axis=1))[0]
        # the ink, within the side bearings of the first and last letters (a few pixels)
        assert heading.max() - heading.min() + 1 >= text_size(name, font(15))[0] - 4, name


def test_explain_figure_holds_every_block_in_its_colours() -> None:
    grid = (2, 3)
    fate = np.array([[0, 0, 1, 2, 0, 0], [0, -1, -1, -1, 2, 1]])
    seen = Image.new("RGB", (48, 32), GREY)
    figure = explain_figure(seen, [(0, "cat", 0.9)], "t", ["f"], grid, fate, blocks=[3, 6])
    pixels = np.asarray(figure).reshape(-1, 3).astype(float)
    view = upscale(seen, grid)
    cell_area = (view.width // grid[1]) * (view.height // grid[0])
    for code in TOKEN_FATE.values():
        cells = int((fate == code).sum())
        if code == TOKEN_FATE["kept"]:  # kept cells stay as they are, as in the view panel
            cells += fate.shape[1]
        close = np.abs(pixels - blend(GREY, code)).max(axis=1) <= 1.5
        # every tinted cell is there (less the grid lines), and nothing else has its colour
        assert 0.85 * cells * cell_area <= close.sum() <= cells * cell_area


def test_reliability_axis_label_stays_clear_of_the_title() -> None:
    from vlm_export.runtime.draw.reliability import MARGIN, PANEL, reliability_diagram

    edges = list(np.linspace(0, 1, 16))
    table = {"edges": edges, "accuracy": list(np.linspace(0.05, 0.95, 15)), "counts": [3] * 15}
    result = {"title": "zero-shot (condensing engine)", "top1": 0.7, "ece": 0.05}
    picture = np.asarray(reliability_diagram({"zeroshot": {**result, "reliability": table}}))
    dark = picture.min(axis=2) < 128
    top = MARGIN + 12
    assert not dark[top - 26 : top - 2, : MARGIN - 30].any()  # nothing left of the title's row
    assert dark[top - 26 : top - 2, MARGIN : MARGIN + 100].any()  # the title itself
    label = dark[top + PANEL // 2 - 30 : top + PANEL // 2 + 30, : MARGIN - 30]
    assert label.any()  # "accuracy", turned, beside the panel's middle


def test_a_long_label_is_cut_and_the_score_and_fps_stay() -> None:
    """The banner cuts a long class name, never the score or the frame rate."""
    from vlm_export.runtime.draw.annotate import banner_fitted, banner_font_size
    from vlm_export.runtime.draw.style import font, text_size

    face = font(banner_font_size((320, 240)))
    long_name = "a very long class name that a person typed into the page " * 3
    text = banner_fitted(long_name, 0.873, 12.4, face, 300)
    assert text.endswith("  87.3%  |  12.4 fps") and "..." in text
    assert text_size(text, face)[0] <= 300
    assert banner_fitted("cat", 0.5, 1.0, face, 300) == "cat  50.0%  |  1.0 fps"


def test_the_live_picture_is_enlarged_before_its_banner_is_drawn() -> None:
    from PIL import Image

    from vlm_export.runtime.serve.frames.views import LIVE_MIN_WIDTH, enlarged

    small = Image.new("RGB", (64, 48))
    assert enlarged(small).size == (64 * 10, 48 * 10)
    big = Image.new("RGB", (LIVE_MIN_WIDTH + 1, 10))
    assert enlarged(big) is big


def test_accented_letters_are_drawn_where_a_font_has_them() -> None:
    """PIL's own default font draws only ASCII: an ``é`` came out as the same box as any other
    missing letter. Where a Unicode font is installed, letters differ from each other."""
    from vlm_export.runtime.draw.style import font

    face = font(20)
    if getattr(face, "getname", lambda: ("",))()[0] not in (
        "DejaVu Sans",
        "Noto Sans",
        "Liberation Sans",
    ):
        pytest.skip("no Unicode font installed here: PIL's default draws ASCII only")
    masks = {ch: np.asarray(face.getmask(ch)) for ch in "éüø"}
    assert len({mask.tobytes() for mask in masks.values()}) == 3
