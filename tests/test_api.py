"""The Python face ``vlm_export.runtime``: defaults as the CLI's, channel orders, state, README."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle, write_images
from PIL import Image

from vlm_export.runtime import Bundle, EdgePipeline, FrameResult, UserError, cli, open_pipeline
from vlm_export.runtime.tca.stage import build_reservoir

README = Path(__file__).resolve().parents[1] / "README.md"
#: the decision written out: condensing bundles adapt with TCA, no RAIL fusion without a state
EXPECTED_METHOD = {"zeroshot": "zeroshot", "tca": "tca", "rail": "zeroshot", "tca+rail": "tca"}


@pytest.fixture(scope="module")
def tca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("api") / "bundle", method="tca")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("api-images"), 6)


@pytest.mark.parametrize("exported", list(EXPECTED_METHOD))
def test_default_method_is_the_cli_decision(exported, tmp_path, images, capsys) -> None:
    folder = make_bundle(tmp_path / "b", method=exported)
    with open_pipeline(folder) as pipeline:
        assert pipeline.method == EXPECTED_METHOD[exported]
    assert cli.main(["run", str(folder), str(images[0]), "--out", os.devnull]) == 0
    ran = re.search(r"vlm-edge: (\S+) on onnxruntime", capsys.readouterr().err)
    assert ran and ran.group(1) == pipeline.method


def test_channel_orders_give_the_pil_result(tca_dir, images) -> None:
    rgb = Image.open(images[1]).convert("RGB")
    pixels = np.asarray(rgb)
    with open_pipeline(tca_dir, method="zeroshot") as pipeline:
        reference = pipeline.classify(rgb)
        same = [
            pipeline.classify(pixels, channels="RGB"),
            pipeline.classify(np.ascontiguousarray(pixels[:, :, ::-1]), channels="BGR"),
            pipeline.classify(images[1]),  # the path
            pipeline.classify(str(images[1])),
        ]
        swapped = pipeline.classify(pixels, channels="BGR")  # what a silent BGR guess would do
        gray = pipeline.classify(np.asarray(rgb.convert("L")))
        gray_pil = pipeline.classify(rgb.convert("L"))
        rgba = np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)])
        from_rgba = pipeline.classify(rgba[:, :, [2, 1, 0, 3]], channels="BGRA")
        from_rgba_pil = pipeline.classify(Image.fromarray(rgba))
        # the CLI's BGR frame path (video and cameras) agrees with the stated order
        frame = np.ascontiguousarray(pixels[:, :, ::-1])
        cli_path = pipeline.pipeline.process(frame)
    assert isinstance(reference, FrameResult)
    for result in same:
        np.testing.assert_array_equal(result.scores, reference.scores)
    assert not np.allclose(swapped.scores, reference.scores)
    np.testing.assert_array_equal(gray.scores, gray_pil.scores)
    np.testing.assert_array_equal(from_rgba.scores, from_rgba_pil.scores)
    np.testing.assert_array_equal(cli_path.scores, reference.scores)


def test_result_fields_and_topk(tca_dir, images) -> None:
    with open_pipeline(tca_dir) as pipeline:
        result = pipeline.classify(images[0], topk=3)
        everything = pipeline.classify(images[0], topk=50)
    assert pipeline.method == "tca" and pipeline.backend.startswith("onnxruntime:")
    order = np.argsort(-result.scores, kind="stable")
    assert result.label == order[0] and result.score == pytest.approx(result.scores.max())
    assert result.class_name == pipeline.bundle.classes[result.label]
    assert [i for i, _, _ in result.topk] == list(order[:3])
    assert len(everything.topk) == pipeline.bundle.num_classes
    assert {"preprocess", "engine", "total"} <= set(result.timings)
    assert result.token_fate is not None and result.token_fate.ndim == 2
    assert result.source == str(images[0]) and (result.index, everything.index) == (0, 1)


@pytest.mark.parametrize(
    ("array", "channels", "message"),
    [
        (np.zeros((8, 8, 3), np.uint8), None, "needs its channel order: channels='RGB' or 'BGR'"),
        (np.zeros((8, 8, 3), np.float32), "RGB", "must be uint8"),
        (np.zeros((3, 8, 8), np.uint8), "RGB", "channels first"),
        (np.zeros((8, 8, 4), np.uint8), "RGB", "does not fit a 8x8x4 array"),
        (np.zeros((8, 8), np.uint8), "BGR", "given for a grayscale 8x8 array"),
        (np.zeros((8, 8, 2), np.uint8), None, "got shape 8x8x2"),
        (np.zeros(64, np.uint8), None, "got shape 64"),
        (np.array(7, np.uint8), None, "got shape () (a single number)"),
        (np.zeros((0, 8, 3), np.uint8), "RGB", "got shape 0x8x3"),
        (np.zeros((8, 8, 3), np.uint8), "rgb", "channels must be one of"),
    ],
)
def test_bad_arrays_are_one_line_errors(tca_dir, array, channels, message) -> None:
    with open_pipeline(tca_dir, method="zeroshot") as pipeline:
        with pytest.raises(UserError, match=re.escape(message)) as caught:
            pipeline.classify(array, channels=channels)
        with pytest.raises(UserError, match="topk must be at least 1"):
            pipeline.classify(np.zeros((8, 8), np.uint8), topk=0)
        with pytest.raises(UserError, match="give a PIL image, a path or a numpy array"):
            pipeline.classify([[0, 0], [0, 0]])  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)


def test_bad_files_and_options(tca_dir, tmp_path) -> None:
    with pytest.raises(UserError, match="unknown method 'fast'"):
        open_pipeline(tca_dir, method="fast")
    with pytest.raises(UserError, match="a state file needs method tca"):
        open_pipeline(tca_dir, method="zeroshot", state=tmp_path / "s.npz")
    with pytest.raises(UserError, match="not found"):
        open_pipeline(tmp_path / "no-bundle")
    with open_pipeline(tca_dir, method="zeroshot") as pipeline:
        with pytest.raises(UserError, match="missing.jpg: file not found"):
            pipeline.classify(tmp_path / "missing.jpg")
        with pytest.raises(UserError, match="no state file"):
            pipeline.save_state()


def test_the_with_block_saves_the_state_the_cli_would(tca_dir, images, tmp_path) -> None:
    state, cli_state = tmp_path / "api.npz", tmp_path / "cli.npz"
    with open_pipeline(tca_dir, state=state) as pipeline:
        for path in images:
            pipeline.classify(path)
        assert not state.exists()
    assert (
        cli.main(
            [
                "run",
                str(tca_dir),
                str(images[0].parent),
                "--state",
                str(cli_state),
                "--out",
                os.devnull,
            ]
        )
        == 0
    )
    bundle = Bundle.open(tca_dir)
    ours, theirs = build_reservoir(bundle, state=state), build_reservoir(bundle, state=cli_state)
    assert ours.counts().sum() == len(images)
    np.testing.assert_array_equal(ours.counts(), theirs.counts())
    for mine, cli_array in zip(ours.anchors(), theirs.anchors(), strict=True):
        np.testing.assert_array_equal(mine, cli_array)
    with open_pipeline(tca_dir, state=state) as resumed:  # resumed, not started anew
        np.testing.assert_array_equal(resumed.pipeline.reservoir.counts(), ours.counts())


def test_saved_after_an_error_but_not_after_ctrl_c(tca_dir, images, tmp_path) -> None:
    state = tmp_path / "s.npz"
    with pytest.raises(ValueError), open_pipeline(tca_dir, state=state) as pipeline:
        pipeline.classify(images[0])
        raise ValueError("the host program failed")
    assert state.is_file()
    state.unlink()
    with pytest.raises(KeyboardInterrupt), open_pipeline(tca_dir, state=state) as pipeline:
        pipeline.classify(images[0])
        raise KeyboardInterrupt  # may strike mid-update: the last explicit save stays
    assert not state.exists()


def test_warnings_are_log_records_a_program_can_silence(tmp_path, caplog, capsys) -> None:
    folder = make_bundle(tmp_path / "u", method="zeroshot", untrained=True)
    with caplog.at_level(logging.WARNING, logger="vlm_export"):
        open_pipeline(folder).close()
    [record] = caplog.records
    assert record.name.startswith("vlm_export.") and "UNTRAINED" in record.getMessage()
    caplog.clear()
    logger = logging.getLogger("vlm_export")
    logger.setLevel(logging.ERROR)
    try:
        open_pipeline(folder).close()
    finally:
        logger.setLevel(logging.NOTSET)
    assert not caplog.records and "UNTRAINED" not in capsys.readouterr().err


def test_the_cli_prints_warnings_as_one_line_and_then_lets_go(tmp_path, capsys) -> None:
    folder = make_bundle(tmp_path / "u", method="zeroshot", untrained=True)
    [image] = write_images(tmp_path / "images", 1)
    assert cli.main(["run", str(folder), str(image), "--out", os.devnull]) == 0
    warned = [x for x in capsys.readouterr().err.splitlines() if "UNTRAINED" in x]
    assert len(warned) == 1 and warned[0].startswith("vlm-edge: WARNING: bundle ")
    logger = logging.getLogger("vlm_export")
    assert logger.handlers == [] and logger.propagate  # the host program's logging again


def _readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys) -> None:
    code = _readme_example()
    assert len(code.strip().splitlines()) <= 5
    monkeypatch.chdir(tmp_path)
    make_bundle(tmp_path / "bundles" / "vitb16-tca", method="tca")
    write_images(tmp_path, 1)[0].rename(tmp_path / "photo.jpg")
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example
    name, score, total_ms = capsys.readouterr().out.split()
    assert name in Bundle.open(tmp_path / "bundles" / "vitb16-tca").classes
    assert 0 < float(score) <= 1 and float(total_ms) > 0
    assert (tmp_path / "reservoir.npz").is_file()


def test_the_face_is_small() -> None:
    import vlm_export.runtime as runtime

    assert sorted(runtime.__all__) == [
        "Bundle",
        "EdgePipeline",
        "FrameResult",
        "UserError",
        "open_pipeline",
    ]
    assert runtime.EdgePipeline is EdgePipeline


def test_embed_is_the_engines_embedding_and_leaves_the_state_alone(tca_dir, images) -> None:
    with open_pipeline(tca_dir, method="zeroshot") as pipeline:
        embedding = pipeline.embed(images[0])
        classified = pipeline.classify(images[0]).embedding
    assert embedding.dtype == np.float32 and embedding.shape == classified.shape
    assert abs(float(np.linalg.norm(embedding)) - 1.0) < 1e-5
    np.testing.assert_allclose(embedding, classified / np.linalg.norm(classified), atol=1e-6)
    with open_pipeline(tca_dir) as fresh:
        expected = fresh.classify(images[1]).scores
    with open_pipeline(tca_dir) as pipeline:
        for image in images[2:]:
            pipeline.embed(image)
        np.testing.assert_array_equal(pipeline.classify(images[1]).scores, expected)
        with pytest.raises(UserError, match="cannot embed a list"):
            pipeline.embed([1, 2])
        with pytest.raises(UserError, match="no text engine"):
            pipeline.embed_text(["a photo of a cat"])
        with pytest.raises(UserError, match="a string or a non-empty list"):
            pipeline.embed_text([])


@pytest.mark.parametrize("texts", [None, 5, {"a": 1}, b"cat", ["cat", 3]])
def test_embed_text_refuses_what_is_not_text_in_one_line(tca_dir, texts) -> None:
    pipeline = open_pipeline(tca_dir, method="zeroshot")
    with pipeline, pytest.raises(UserError, match="a string or a non-empty list of strings, got"):
        pipeline.embed_text(texts)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="the pipeline is closed"):
        pipeline.embed_text("a photo of a cat")


def test_premultiplied_alpha_images_classify_as_their_straight_alpha_form(tca_dir) -> None:
    rng = np.random.default_rng(4)
    straight = Image.fromarray(rng.integers(0, 255, (40, 56, 2), np.uint8), mode="LA")
    premultiplied = straight.convert("La")
    with open_pipeline(tca_dir, method="zeroshot") as pipeline:
        got = pipeline.classify(premultiplied).scores
        expected = pipeline.classify(premultiplied.convert("LA")).scores
    np.testing.assert_array_equal(got, expected)


def test_precision_is_run_s_precision(tca_dir) -> None:
    """``precision`` opens what ``vlm-edge run --precision`` opens, and says in one line what
    cannot run here."""
    with pytest.raises(UserError, match="precision must be a string"):
        open_pipeline(tca_dir, precision=16)  # type: ignore[arg-type]
    with open_pipeline(tca_dir, backend="onnxruntime", precision="fp32") as pipeline:
        assert pipeline.backend.startswith("onnxruntime")
    with pytest.raises(UserError, match="no INT8 graph"):
        open_pipeline(tca_dir, backend="onnxruntime", precision="int8")
    ov = pytest.importorskip("openvino")
    from vlm_export.runtime.engines.backends.openvino_backend import cpu_capabilities

    if "BF16" in cpu_capabilities(ov.Core()):
        with open_pipeline(tca_dir, backend="openvino", precision="bf16") as pipeline:
            assert pipeline.backend == "openvino:CPU:bf16"
    else:
        with pytest.raises(UserError, match="no bf16 support"):
            open_pipeline(tca_dir, backend="openvino", precision="bf16")
