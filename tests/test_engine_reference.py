"""The engine check at open: the bundle's record of the reference images' embeddings, and the
refusal of an engine that drifted from it or collapsed (real ONNX graphs, real ONNX Runtime)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fakebundle import collapse_encoder, drift_encoder, make_bundle, write_images

from vlm_export.core import manifest as mf
from vlm_export.core.reference_images import reference_inputs, reference_pixels
from vlm_export.runtime import cli
from vlm_export.runtime.api import open_pipeline
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.checks.reference import (
    PRECISION_BOUNDS,
    EngineDriftError,
    check_engine,
    compare,
)
from vlm_export.runtime.engines.factory import open_backend

#: sha256 of reference_pixels(16, 24) as float32 bytes: the images must not change silently
#: (a change makes every recorded bundle fail its check; bump GENERATOR with it)
PIXELS_SHA256 = "a02ec6cdd6b393244e066a986d19b5b590910737e2df4d070af05416a398bd04"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("ref") / "bundle", method="tca", reference=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 3)
    return folder


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def _edge(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, list[str]]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err.strip().splitlines()


# ------------------------------------------------------------------------------ the images
def test_reference_images_are_fixed_distinct_and_in_range() -> None:
    pixels = reference_pixels(16, 24)
    assert pixels.shape == (4, 16, 24, 3) and pixels.dtype == np.float32
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert np.array_equal(pixels, reference_pixels(16, 24))  # no hidden state
    flat = pixels.reshape(4, -1)
    assert all(np.abs(flat[i] - flat[j]).mean() > 0.1 for i in range(4) for j in range(i + 1, 4))


def test_reference_images_do_not_change_between_versions() -> None:
    """The bytes are pinned: numpy's random streams play no part (an integer hash does)."""
    digest = hashlib.sha256(reference_pixels(16, 24).tobytes()).hexdigest()
    assert digest == PIXELS_SHA256


def test_reference_inputs_are_normalised_with_the_bundles_mean_and_std() -> None:
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    inputs = reference_inputs([16, 24], mean, std)
    pixels = reference_pixels(16, 24).transpose(0, 3, 1, 2)
    expected = (pixels - np.array(mean).reshape(1, 3, 1, 1)) / np.array(std).reshape(1, 3, 1, 1)
    assert inputs.shape == (4, 3, 16, 24) and inputs.dtype == np.float32
    np.testing.assert_allclose(inputs, expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ the record
def test_record_is_listed_hashed_and_matches_onnx_runtime(recorded: Path) -> None:
    """The record equals what a plain ONNX Runtime session gives for the reference images."""
    manifest = json.loads((recorded / mf.MANIFEST_NAME).read_text(encoding="utf-8"))
    section = manifest["reference"]
    assert section["images"] == 4
    [record] = section["records"]
    assert record["graph"] == mf.IMAGE_ENCODER_ONNX and record["file"] in manifest["files"]
    mf.verify_files(recorded, manifest)
    saved = np.load(recorded / record["file"])
    session = ort.InferenceSession(str(recorded / mf.IMAGE_ENCODER_ONNX))
    pre = manifest["preprocess"]
    shapes = {r["name"]: r["shape"] for r in manifest["engine"]["inputs"]}
    rows = []
    for image in reference_inputs(pre["size"], pre["mean"], pre["std"]):
        feeds = {
            "image": image[None],
            "anchors": np.zeros(shapes["anchors"], np.float32),
            "anchors_valid": np.zeros(shapes["anchors_valid"], np.float32),
        }
        rows.append(session.run(["embedding"], feeds)[0][0])
    np.testing.assert_allclose(saved, np.stack(rows), rtol=1e-5, atol=1e-6)


def test_a_working_engine_opens_and_meets_the_bound(recorded: Path) -> None:
    bundle = Bundle.open(recorded)
    engine = open_backend(bundle, "onnxruntime")
    try:
        result = check_engine(bundle, engine)
    finally:
        engine.close()
    assert result is not None and result.precision == "fp32"
    assert result.cosine > 0.99999 and not result.collapsed


def test_bounds_are_ordered_by_precision() -> None:
    """fp32 is held closest to the record, INT8 loosest; all far above a collapse's cosine."""
    assert PRECISION_BOUNDS["fp32"] > PRECISION_BOUNDS["bf16"] >= PRECISION_BOUNDS["int8"]
    assert PRECISION_BOUNDS["fp16"] == PRECISION_BOUNDS["bf16"] and PRECISION_BOUNDS["int8"] >= 0.9


def test_compare_measures_cosine_and_spread() -> None:
    record = np.eye(4, 8, dtype=np.float32)
    same = compare(record, record, "x", "fp32")
    assert same.cosine == pytest.approx(1.0) and not same.drifted and not same.collapsed
    constant = compare(np.tile(record[:1], (4, 1)), record, "x", "fp32")
    assert constant.collapsed and constant.spread == pytest.approx(0.0)


# ------------------------------------------------------------------------------ refusals
def test_a_collapsed_graph_is_refused_even_with_allow_drift(recorded: Path, tmp_path) -> None:
    bundle = Bundle.open(collapse_encoder(_copy(recorded, tmp_path)))
    for allow in (False, True):
        with pytest.raises(EngineDriftError) as caught:
            open_backend(bundle, "onnxruntime", allow_drift=allow)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith("onnxruntime fp32 (image_encoder.onnx) collapsed")
        assert "bound 0.999" in message and "refused even with --allow-drift" in message


def test_a_drifted_graph_is_refused_or_warned(recorded: Path, tmp_path, caplog) -> None:
    bundle = Bundle.open(drift_encoder(_copy(recorded, tmp_path)))
    with pytest.raises(
        EngineDriftError,
        match=r"^onnxruntime fp32 .* cosine 0\.\d{4} is below the fp32 bound 0\.999; .*allow-drift",
    ):
        open_backend(bundle, "onnxruntime")
    with caplog.at_level(logging.WARNING, logger="vlm_export"):
        engine = open_backend(bundle, "onnxruntime", allow_drift=True)
    engine.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("drifted" in w and "running it anyway (--allow-drift)" in w for w in warnings)


def test_run_refuses_a_collapsed_engine_in_one_line(recorded, images, tmp_path, capsys) -> None:
    bundle = collapse_encoder(_copy(recorded, tmp_path))
    for extra in ([], ["--allow-drift"]):
        code, lines = _edge(capsys, "run", bundle, images, "--quiet", *extra)
        assert code == 1 and len(lines) == 1 and "collapsed" in lines[0], lines
        assert lines[0].startswith("vlm-edge: error: onnxruntime fp32")


def test_run_with_allow_drift_warns_and_runs(recorded, images, tmp_path, capsys) -> None:
    bundle = drift_encoder(_copy(recorded, tmp_path))
    code, lines = _edge(capsys, "run", bundle, images, "--quiet")
    assert code == 1 and "pass --allow-drift" in lines[-1]
    code, lines = _edge(capsys, "run", bundle, images, "--quiet", "--allow-drift")
    assert code == 0
    assert any(line.startswith("vlm-edge: WARNING: onnxruntime fp32") for line in lines), lines


def test_python_api_takes_allow_drift(recorded, tmp_path) -> None:
    bundle = drift_encoder(_copy(recorded, tmp_path))
    with pytest.raises(EngineDriftError):
        open_pipeline(bundle)
    with open_pipeline(bundle, allow_drift=True) as pipeline:
        assert pipeline is not None


# ------------------------------------------------------------------------------ old bundles
def test_a_bundle_without_record_opens_with_one_note(tmp_path, images, capsys) -> None:
    old = make_bundle(tmp_path / "old", method="tca")
    code, lines = _edge(capsys, "run", old, images, "--quiet")
    notes = [line for line in lines if "records no reference embeddings" in line]
    assert code == 0 and len(notes) == 1 and notes[0].startswith("vlm-edge: note: ")


def test_info_shows_the_check(recorded: Path, tmp_path, capsys) -> None:
    code, _ = _edge(capsys, "info", recorded)
    assert code == 0
    code = cli.main(["info", str(recorded)])
    out = capsys.readouterr().out
    assert "reference   embeddings of 4 synthetic images for image_encoder.onnx" in out
    assert "fp32 0.999, bf16 0.995, fp16 0.995, int8 0.98" in out
    old = make_bundle(tmp_path / "old", method="tca")
    cli.main(["info", str(old)])
    assert "none recorded (exported before the engine check)" in capsys.readouterr().out


# ------------------------------------------------------------------------------ the exporter
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ladder bundle of the tiny test model from the real exporter (random weights)."""
    torch = pytest.importorskip("torch")
    from vlm_export.export.pipeline import ExportOptions, export_bundle
    from vlm_export.models.schedule import CondensationConfig

    torch.manual_seed(0)
    options = ExportOptions(
        method="tca",
        model="vlm-test-tiny",
        domains=[("things", ["cat", "dog", "bird"])],
        templates="single",
        condensation=CondensationConfig(drop_rate=0.035, merge_centers=2),
        out=tmp_path_factory.mktemp("export") / "bundle",
        quiet=True,
        text_encoder=False,
        drop_rates=[0.0, 0.05],
    )
    return export_bundle(options)


def test_export_records_every_rung_and_each_rung_is_checked(exported: Path, caplog) -> None:
    """One record per fp32 graph, listed with its sha256; the ladder's rungs open against their
    own records (a rung compared with another rung's record would fail the fp32 bound)."""
    from vlm_export.runtime.engines.checks.reference import load_record, run_reference
    from vlm_export.runtime.engines.ladder.ladder import open_ladder

    bundle = Bundle.open(exported, verify="full")
    records = bundle.manifest["reference"]["records"]
    graphs = [rung["onnx"] for rung in bundle.manifest["ladder"]["rungs"]]
    assert [record["graph"] for record in records] == graphs
    assert all(record["file"] in bundle.manifest["files"] for record in records)
    with caplog.at_level(logging.WARNING, logger="vlm_export"):
        ladder = open_ladder(bundle)
    try:
        assert not [r for r in caplog.records if "drift" in r.getMessage()]
        first, second = (load_record(bundle, graph) for graph in graphs)
        assert not np.allclose(first, second, atol=1e-4)  # the rungs compute different things
        again = run_reference(ladder.engines[1], bundle.manifest, 4)
        np.testing.assert_allclose(again, second, atol=1e-5)
    finally:
        ladder.close()


def test_an_int8_graph_meets_its_bound_on_the_reference_images(tmp_path, images) -> None:
    """quantize's graph opens under the int8 bound (compared with the fp32 record)."""
    pytest.importorskip("torch")
    from vlm_export.export.int8.quantize import quantize_bundle
    from vlm_export.export.pipeline import ExportOptions, export_bundle
    from vlm_export.models.schedule import CondensationConfig

    options = ExportOptions(
        method="tca",
        model="vlm-test-tiny",
        domains=[("things", ["cat", "dog", "bird"])],
        templates="single",
        condensation=CondensationConfig(drop_rate=0.035, merge_centers=2),
        out=tmp_path / "bundle",
        quiet=True,
        text_encoder=False,
    )
    folder = export_bundle(options)
    calibration = tmp_path / "calibration"
    write_images(calibration, 10, seed=5)
    quantize_bundle(folder, calibration)
    bundle = Bundle.open(folder)
    engine = open_backend(bundle, "onnxruntime", precision="int8")
    try:
        result = check_engine(bundle, engine)
    finally:
        engine.close()
    assert result is not None and result.precision == "int8"
    assert PRECISION_BOUNDS["int8"] <= result.cosine < 1.0


@pytest.mark.parametrize(
    "make",
    [
        lambda width: np.ones((10, width), np.float32),  # more images than the record holds
        lambda width: np.ones((0, width), np.float32),
        lambda width: np.ones((4, width + 1), np.float32),  # another width
        lambda width: np.full((4, width), np.nan, np.float32),
    ],
    ids=["ten-rows", "no-rows", "other-width", "nan"],
)
def test_a_misshapen_record_is_one_bundle_error(recorded, images, tmp_path, capsys, make) -> None:
    bundle = _copy(recorded, tmp_path)
    width = Bundle.open(bundle).text_embeddings.shape[1]
    name = next(p.name for p in bundle.iterdir() if p.name.endswith(".reference.npy"))
    np.save(bundle / name, make(width))
    code, lines = _edge(capsys, "run", bundle, images, "--quiet", "--no-verify")
    assert code in (1, 2) and len(lines) == 1 and name in lines[0], lines
