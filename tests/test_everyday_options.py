"""Everyday run options: --min-score (unknown decisions), time_utc, --stride, camera options."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle, write_images

from vlm_export.core.errors import UserError
from vlm_export.runtime import cli, open_pipeline
from vlm_export.runtime.io.sources import SourceOptions, open_source, parse_size
from vlm_export.runtime.result import UNKNOWN_CLASS, UNKNOWN_LABEL


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tca") / "bundle", method="tca")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 9)
    return folder


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(bundle: Path, source: Path, out: Path, *extra: str) -> list[dict]:
    argv = ["run", str(bundle), str(source), "--out", str(out), "--quiet", *extra]
    assert cli.main(argv) == 0
    return _records(out)


def test_min_score_turns_low_scores_into_unknown_and_keeps_the_topk(bundle, folder, tmp_path):
    plain = _run(bundle, folder, tmp_path / "plain.jsonl", "--method", "zeroshot")
    best = sorted(r["topk"][0]["score"] for r in plain)
    threshold = (best[3] + best[4]) / 2  # between two frames' scores: some above, some below
    gated = _run(
        bundle, folder, tmp_path / "gated.jsonl", "--method", "zeroshot", "--min-score",
        str(threshold),
    )  # fmt: skip
    assert len(gated) == len(plain) == 9
    unknown = 0
    for before, after in zip(plain, gated, strict=True):
        assert after["topk"] == before["topk"]  # the scores are the same, only the decision
        if before["topk"][0]["score"] < threshold:
            unknown += 1
            assert after["label"] == UNKNOWN_LABEL and after["class"] == UNKNOWN_CLASS
            assert after["domain"] == ""
        else:
            assert (after["label"], after["class"]) == (before["label"], before["class"])
    assert 0 < unknown < 9


def test_min_score_in_the_python_api(bundle, folder):
    image = folder / "img_0000.jpg"
    with open_pipeline(bundle, method="zeroshot", min_score=1.0) as pipeline:
        result = pipeline.classify(image)
    assert result.unknown and result.label == -1 and result.class_name == "unknown"
    assert result.score == pytest.approx(result.topk[0][2])  # the best score stays reported
    with open_pipeline(bundle, method="zeroshot", min_score=0.0) as pipeline:
        assert not pipeline.classify(image).unknown


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan", "inf"])
def test_min_score_outside_zero_to_one_is_one_line(bundle, folder, tmp_path, capsys, value):
    argv = ["run", str(bundle), str(folder), "--min-score", value, "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--min-score must be from 0 to 1" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", [float("nan"), 2, "0.5", True])
def test_min_score_in_python_refuses_non_scores(bundle, value):
    with pytest.raises(UserError, match="min_score|--min-score"):
        open_pipeline(bundle, method="zeroshot", min_score=value)


def test_every_record_has_a_utc_wall_clock_time(bundle, folder, tmp_path):
    before = datetime.now(timezone.utc)
    records = _run(bundle, folder, tmp_path / "o.jsonl")
    after = datetime.now(timezone.utc)
    for record in records:
        text = record["time_utc"]
        assert text.endswith("Z")
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert before - timedelta(milliseconds=1) <= stamp <= after + timedelta(milliseconds=1)
    times = [r["time_utc"] for r in records]
    assert times == sorted(times)


def test_stride_keeps_every_nth_image_with_its_index(bundle, folder, tmp_path):
    records = _run(bundle, folder, tmp_path / "o.jsonl", "--stride", "4")
    names = sorted(p.name for p in folder.iterdir())
    assert [r["index"] for r in records] == [0, 4, 8]
    assert [Path(r["source"]).name for r in records] == [names[0], names[4], names[8]]


def test_stride_on_a_video_skips_frames_without_decoding_them(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for value in range(10):
        writer.write(np.full((48, 64, 3), value * 20, np.uint8))
    writer.release()
    with open_source(str(path), SourceOptions(stride=3)) as source:
        frames = list(source)
    assert [f.index for f in frames] == [0, 3, 6, 9]
    assert [round(float(f.data.mean()) / 20) for f in frames] == [0, 3, 6, 9]
    assert [f.timestamp_ms for f in frames] == pytest.approx([0, 300, 600, 900], abs=1)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stride", "0"], "--stride must be at least 1"),
        (["--camera-size", "1280"], "a size is WIDTHxHEIGHT"),
        (["--camera-size", "0x720"], "a size is WIDTHxHEIGHT"),
        (["--camera-size", "1280x720"], "--camera-size and --camera-fps are for camera indexes"),
        (["--camera-fps", "30"], "--camera-size and --camera-fps are for camera indexes"),
        (["--camera-fps", "-1"], "--camera-fps must be above 0"),
    ],
)
def test_bad_source_options_are_one_line_before_any_work(
    bundle, folder, tmp_path, capsys, extra, message
):
    argv = ["run", str(bundle), str(folder), "--out", str(tmp_path / "o"), *extra]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_stride_on_a_live_source_is_refused():
    pytest.importorskip("cv2")
    with pytest.raises(UserError, match="--stride is for videos"):
        open_source("rtsp://127.0.0.1:9/none", SourceOptions(stride=2))


def test_parse_size():
    assert parse_size("640x480") == (640, 480)
    assert parse_size(" 1920 X 1080 ") == (1920, 1080)
    for bad in ("640", "x480", "640x", "-1x2", "1e3x2", "9" * 500 + "x1"):
        with pytest.raises(UserError):
            parse_size(bad)
