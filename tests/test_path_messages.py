"""Messages name paths so that a user can tell which file: a long path keeps its file name."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakebundle import make_bundle
from PIL import Image

from vlm_export.core.errors import SHOWN_PATH_CHARS, shown, shown_path
from vlm_export.runtime import cli


def test_a_path_up_to_the_limit_is_shown_whole() -> None:
    path = "/" + "d" * (SHOWN_PATH_CHARS - 10) + "/clip.mp4"
    assert len(path) == SHOWN_PATH_CHARS
    assert shown_path(path) == path
    assert shown_path(Path("frames/a.png")) == "frames/a.png"


@pytest.mark.parametrize("extra", [1, 7, 500, 5000])
def test_a_longer_path_keeps_its_start_and_its_file_name(extra: int) -> None:
    path = "/media/sd/" + "x" * (SHOWN_PATH_CHARS + extra) + "/front-camera-2026-12-07.mp4"
    text = shown_path(path)
    assert len(text) == SHOWN_PATH_CHARS
    assert text.startswith("/media/sd/") and text.endswith("/front-camera-2026-12-07.mp4")
    assert "..." in text
    # other user strings are still cut at their end, shorter
    assert shown(path).endswith("...") and len(shown(path)) == 80


def test_a_refused_output_deep_in_folders_names_its_file(tmp_path: Path, capsys) -> None:
    bundle = make_bundle(tmp_path / "bundle", method="zeroshot")
    deep = tmp_path.joinpath(*["recordings-of-the-front-door"] * 8)
    deep.mkdir(parents=True)
    image = deep / "frame-000123.png"
    Image.new("RGB", (40, 40), (90, 120, 200)).save(image)
    assert len(str(image)) > SHOWN_PATH_CHARS

    code = cli.main(["run", str(bundle), str(image), "--save-annotated", str(image)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "Traceback" not in err[0]
    assert err[0].count("/frame-000123.png") == 2  # the output and the source it would replace
    assert err[0].startswith(f"vlm-edge: error: --save-annotated {str(tmp_path)[:20]}")


def test_a_long_file_name_is_kept_whole_and_a_name_too_long_keeps_its_suffix() -> None:
    name = "edge_serving_configuration_for_the_north_entrance_camera_" * 2 + "v2.toml"
    assert 104 < len(name) < SHOWN_PATH_CHARS - 30
    text = shown_path("/srv/configs/site_a/building_7/floor_2/" + name)
    assert len(text) == SHOWN_PATH_CHARS and text.endswith("/" + name)
    assert text.startswith("/srv/configs/site_a/")
    huge = "/srv/" + "n" * 500 + ".toml"
    text = shown_path(huge)
    assert len(text) == SHOWN_PATH_CHARS and text.startswith("/srv/") and text.endswith("n.toml")
