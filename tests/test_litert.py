"""LiteRT: ``vlm-export build-litert`` (litert-torch) and the ``litert`` backend (ai-edge-litert).

The backend tests run wherever ai-edge-litert is installed: they add the committed
``tests/data/fake_tca.fp32.tflite`` (``tests/data/make_litert_fixture.py`` converted it from
``fakebundle``'s condensing graph) to a fresh fake bundle and compare it with ONNX Runtime.
The conversion tests need the converter (``.[export,litert-export]``: litert-torch) and are
skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from fakebundle import live_fate_encoder, make_bundle, write_images

from vlm_export.core.errors import BundleError, UserError
from vlm_export.core.manifest import (
    FATE_OUTPUT,
    MANIFEST_NAME,
    TFLITE_ENGINE_FORMAT,
    file_record,
    read_manifest,
    tflite_engines,
)
from vlm_export.export.cli import main as export_main
from vlm_export.runtime import cli
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.checks.bench_record import record_path
from vlm_export.runtime.engines.checks.parity import open_reference
from vlm_export.runtime.engines.factory import open_backend

FIXTURE = Path(__file__).parent / "data" / "fake_tca.fp32.tflite"
LITERT = importlib.util.find_spec("ai_edge_litert") is not None
CONVERTER = all(importlib.util.find_spec(n) for n in ("litert_torch", "torch", "open_clip"))
needs_litert = pytest.mark.skipif(
    not LITERT, reason='needs ai-edge-litert: pip install ".[litert]"'
)
needs_converter = pytest.mark.skipif(
    not CONVERTER, reason='needs the converter: pip install ".[export,litert-export]"'
)


def add_fixture(folder: Path, data: bytes | None = None) -> Path:
    """Copy the committed .tflite (or ``data``) into a fake bundle and record it."""
    name = "image_encoder.fp32.tflite"
    (folder / name).write_bytes(FIXTURE.read_bytes() if data is None else data)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["engines"].append(
        {"file": name, "format": TFLITE_ENGINE_FORMAT, "precision": "fp32", "layout": "nchw"}
    )
    manifest["files"][name] = file_record(folder / name)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return folder


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    """A fake condensing bundle (reference images recorded) with the fixture .tflite."""
    return add_fixture(
        live_fate_encoder(make_bundle(tmp_path / "bundle", method="tca", reference=True))
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _compare(engine, reference, image, anchors, valid) -> None:
    engine.set_anchors(anchors, valid)
    reference.set_anchors(anchors, valid)
    got, want = engine.infer(image), reference.infer(image)
    assert set(got) == set(want)
    for name, expected in want.items():
        assert got[name].shape == expected.shape and got[name].dtype == expected.dtype, name
        if name == FATE_OUTPUT:
            assert np.array_equal(got[name], expected)
        else:
            assert _cosine(got[name], expected) >= 0.9999, name


@needs_litert
def test_litert_backend_matches_onnxruntime(fake: Path) -> None:
    bundle = Bundle.open(fake)
    engine = open_backend(bundle, "litert", threads=1)  # the reference check at open passes
    reference = open_reference(fake, bundle.manifest)
    assert engine.description == "litert:CPU:fp32"
    shape = bundle.engine_io("inputs")["anchors"]["shape"]
    rng = np.random.default_rng(3)
    for valid in (np.zeros(shape[0]), np.ones(shape[0])):
        image = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
        anchors = rng.standard_normal(shape).astype(np.float32)
        _compare(engine, reference, image, anchors, valid.astype(np.float32))
    # the anchors stay set: a second image without set_anchors still sees them
    image = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert np.allclose(
        engine.infer(image)["embedding"], reference.infer(image)["embedding"], atol=1e-5
    )
    engine.close()
    reference.close()


@needs_litert
@pytest.mark.parametrize("threads", [None, 1])
def test_threads_left_out_use_every_usable_cpu(fake: Path, monkeypatch, threads) -> None:
    """LiteRT's own default is one thread; left out, --threads means every usable CPU, as on
    ONNX Runtime and OpenVINO (one thread ran ViT-B-16 at 1.7x ONNX Runtime's latency)."""
    from vlm_export.runtime.engines.backends import litert_backend

    real = litert_backend.import_interpreter()
    asked: list[int | None] = []

    def interpreter(**kwargs):
        asked.append(kwargs.get("num_threads"))
        return real(**kwargs)

    monkeypatch.setattr(litert_backend, "import_interpreter", lambda: interpreter)
    open_backend(Bundle.open(fake), "litert", threads=threads).close()
    assert asked == [threads or litert_backend.usable_cpus()]
    assert litert_backend.usable_cpus() >= 1


def test_info_lists_the_litert_graph(fake: Path, capsys) -> None:
    """`vlm-edge info` names the .tflite graph, its converter and its recorded parity."""
    manifest = json.loads((fake / MANIFEST_NAME).read_text())
    record = manifest["engines"][-1]
    record["converter"] = {"tool": "litert-torch", "from": "manifest", "litert-torch": "0.10.0"}
    record["parity"] = {"embedding_cosine_min": 0.9999999}
    (fake / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    assert cli.main(["info", str(fake)]) == 0
    out = capsys.readouterr().out
    assert "LiteRT graph image_encoder.fp32.tflite, fp32, litert-torch 0.10.0" in out
    assert "embedding cosine min 1.000000 against ONNX Runtime (--backend litert)" in out


@needs_litert
def test_litert_refusals_are_one_line(fake: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    bundle = Bundle.open(fake)
    with pytest.raises(UserError, match="--threads must be at least 1"):
        open_backend(bundle, "litert", threads=0)
    with pytest.raises(UserError, match="runs fp32, not 'int8'"):
        open_backend(bundle, "litert", precision="int8")
    plain = make_bundle(tmp_path / "plain", method="tca")
    with pytest.raises(UserError, match=r"no LiteRT \(.tflite\) graph: .*vlm-export build-litert"):
        open_backend(Bundle.open(plain), "litert")
    corrupt = add_fixture(
        live_fate_encoder(make_bundle(tmp_path / "corrupt", method="tca")), b"not a tflite file"
    )
    with pytest.raises(BundleError, match="LiteRT cannot load image_encoder.fp32.tflite"):
        open_backend(Bundle.open(corrupt), "litert")
    code = cli.main(["info", str(corrupt)])  # the rest of the bundle still reads
    assert code == 0
    capsys.readouterr()
    image = write_images(tmp_path / "images", 1)[0]
    for folder, words in ((plain, "no LiteRT"), (corrupt, "cannot load")):
        assert cli.main(["run", str(folder), str(image), "--backend", "litert"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter"):  # as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UserError, match=r'pip install "\.\[litert\]"'):
        open_backend(bundle, "litert")


@needs_litert
def test_bench_row_and_auto_choose_litert_only_where_fastest(fake: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", str(fake), "--backends", "onnxruntime,litert", "--rounds", "2"]
    assert cli.main([*argv, "--warmup", "0", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = {row["backend"]: row for row in record["results"]}
    assert rows["litert"]["passed"] and rows["litert"]["engine"] == "litert:CPU:fp32"
    assert rows["litert"]["embedding_cosine_min"] >= 0.9999
    saved = record_path(fake)
    for fastest, slower in (("litert", "onnxruntime"), ("onnxruntime", "litert")):
        kept = json.loads(saved.read_text())
        for row in kept["results"]:
            row["median_ms"] = 1.0 if row["backend"] == fastest else 5.0
        saved.write_text(json.dumps(kept))
        engine = open_backend(Bundle.open(fake), "auto")
        assert engine.description.startswith(fastest), (fastest, engine.description)
        assert slower not in engine.description
        engine.close()


@needs_litert
def test_plain_auto_without_a_record_keeps_onnxruntime(fake: Path) -> None:
    engine = open_backend(Bundle.open(fake), "auto")
    assert engine.description.startswith("onnxruntime")
    engine.close()


def test_missing_converter_is_one_line(tmp_path: Path, capsys) -> None:
    if CONVERTER:
        pytest.skip("the converter is installed here")
    folder = make_bundle(tmp_path / "bundle", method="tca")
    before = (folder / MANIFEST_NAME).read_bytes()
    assert export_main(["build-litert", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "litert-export" in err[0], err
    assert (folder / MANIFEST_NAME).read_bytes() == before
    listed = {*read_manifest(folder)["files"], MANIFEST_NAME}
    assert {p.name for p in folder.iterdir()} == listed  # no staging folder left


def _export_tiny(out: Path, topk_free: bool = False) -> Path:
    from vlm_export.export.pipeline import ExportOptions, export_bundle
    from vlm_export.models.schedule import CondensationConfig

    return export_bundle(
        ExportOptions(
            method="tca",
            model="vlm-test-tiny",
            pretrained="none",
            domains=[("things", ["cat", "dog", "bird"])],
            templates="single",
            condensation=CondensationConfig(topk_free=topk_free),
            out=out,
            quiet=True,
            text_encoder=False,
        )
    )


@needs_converter
@needs_litert
@pytest.mark.slow
@pytest.mark.exporter
@pytest.mark.parametrize("topk_free", [False, True], ids=["topk", "topk-free"])
def test_build_litert_converts_the_tiny_tower_exactly(
    tmp_path: Path, capsys, topk_free: bool
) -> None:
    """vlm-test-tiny rebuilt from its manifest, converted, checked and recorded (TopK and
    TopK-free graphs); a rerun needs --overwrite."""
    folder = _export_tiny(tmp_path / "tiny", topk_free)
    assert export_main(["build-litert", str(folder), "--quiet"]) == 0
    (record,) = tflite_engines(read_manifest(folder))
    assert record["converter"]["tool"] == "litert-torch"
    parity = record["parity"]
    assert parity["passed"] and parity["embedding_cosine_min"] >= 0.9999
    assert parity["token_fate_agreement_min"] == 1.0
    assert {case["case"] for case in parity["cases"]} >= {"reference0", "image0_anchors_on"}
    assert ("TOPK_V2" in record["operators"]) is not topk_free
    assert not any(name.startswith("Flex") for name in record["operators"])
    bundle = Bundle.open(folder)  # hashes verified
    engine = open_backend(bundle, "litert")
    reference = open_reference(folder, bundle.manifest)
    shape = bundle.engine_io("inputs")["anchors"]["shape"]
    rng = np.random.default_rng(9)
    _compare(
        engine,
        reference,
        rng.standard_normal((1, 3, 64, 64)).astype(np.float32),
        rng.standard_normal(shape).astype(np.float32),
        (rng.random(shape[0]) < 0.5).astype(np.float32),
    )
    capsys.readouterr()
    assert export_main(["build-litert", str(folder), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@needs_converter
@needs_litert
@pytest.mark.slow
@pytest.mark.exporter
def test_a_graph_failing_parity_is_not_added(tmp_path: Path, monkeypatch, capsys) -> None:
    from vlm_export.export.litert import build as litert_build

    folder = _export_tiny(tmp_path / "tiny")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(litert_build, "MIN_COSINE", 1.5)  # no graph can reach it
    assert export_main(["build-litert", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was not added to the bundle" in err[0], err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@needs_converter
@pytest.mark.slow
@pytest.mark.exporter
def test_a_random_bundle_without_its_seed_is_one_line(tmp_path: Path, capsys) -> None:
    """A random-weight bundle from before the seed was recorded cannot be rebuilt: one line."""
    folder = _export_tiny(tmp_path / "tiny")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    del manifest["model"]["random_seed"]
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert export_main(["build-litert", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export it again" in err[0], err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_fixture_is_small() -> None:
    assert FIXTURE.is_file() and FIXTURE.stat().st_size < 1 << 20
