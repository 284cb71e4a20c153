"""Rockchip RKNN: ``vlm-export build-rknn`` and the ``rknn`` backend.

Most tests run against TEST DOUBLES of Rockchip's packages (tests/fake_rockchip: RKNNLite and the
toolkit's RKNN run the ONNX graph with ONNX Runtime behind Rockchip's API, float outputs rounded
through fp16): they check this project's side (manifest record, atomic install, refusals, the
backend's input and output handling, the reference check at open), not Rockchip's. The last tests
convert real graphs with rknn-toolkit2 and run them in its simulator; they are skipped unless
rknn-toolkit2 is importable (it lives in a venv of its own: docs/rockchip.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
from fakebundle import drift_encoder, make_bundle, write_images

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import file_record, read_manifest, rknn_engines
from vlm_export.export import cli as export_cli
from vlm_export.runtime import api
from vlm_export.runtime import cli as edge_cli
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.backends.onnxruntime_backend import OnnxRuntimeBackend
from vlm_export.runtime.engines.checks.reference import EngineDriftError
from vlm_export.runtime.engines.factory import open_backend

FAKES = Path(__file__).parent / "fake_rockchip"
RKNN_FILE = "image_encoder.rk3588.fp16.rknn"
#: the real rknn-toolkit2 (looked up before any test puts the fakes on the path)
REAL_TOOLKIT = importlib.util.find_spec("rknn") is not None
ROCKCHIP = ("rknn", "rknnlite")


def _forget_rockchip_modules(monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in ROCKCHIP]:
        if monkeypatch is None:
            del sys.modules[name]
        else:
            monkeypatch.delitem(sys.modules, name)


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch):
    """The test doubles of rknn-toolkit2 and rknn-toolkit-lite2 first on the import path."""
    _forget_rockchip_modules(monkeypatch)
    monkeypatch.syspath_prepend(str(FAKES))
    from rknn.api import RKNN
    from rknnlite.api import RKNNLite

    for cls, name, value in (
        (RKNN, "fail_build", False),
        (RKNN, "perturb", 0.0),
        (RKNN, "fail_inference", False),
        (RKNNLite, "fail_init", False),
        (RKNNLite, "released", 0),
        (RKNNLite, "last_core_mask", None),
    ):
        monkeypatch.setattr(cls, name, value)
    yield SimpleNamespace(RKNN=RKNN, RKNNLite=RKNNLite)
    _forget_rockchip_modules()  # the fakes go; monkeypatch then restores what was imported


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle", method="tca", reference=True)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(folder.iterdir())
    }


def _build(bundle: Path, capsys, *extra: str) -> tuple[int, list[str], str]:
    code = export_cli.main(["build-rknn", str(bundle), "--quiet", *extra])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def test_build_rknn_records_a_checked_graph(fakes, bundle: Path, capsys) -> None:
    code, err, out = _build(bundle, capsys)
    assert code == 0, err
    manifest = read_manifest(bundle)
    (record,) = rknn_engines(manifest)
    assert (record["file"], record["format"], record["target"], record["precision"]) == (
        RKNN_FILE,
        "rknn",
        "rk3588",
        "fp16",
    )
    session = ort.InferenceSession(str(bundle / "image_encoder.onnx"))
    assert record["outputs"] == [output.name for output in session.get_outputs()]
    written = (bundle / RKNN_FILE).read_bytes()
    assert written == (bundle / "image_encoder.onnx").read_bytes()  # the fake converts by copying
    assert manifest["files"][RKNN_FILE] == {
        "sha256": hashlib.sha256(written).hexdigest(),
        "bytes": len(written),
    }
    parity = record["parity"]
    assert parity["passed"] and parity["engine_backend"] == "rknn-toolkit2 simulator"
    assert parity["embedding_cosine_min"] >= 0.999 and parity["token_fate_agreement_min"] == 1.0
    assert f"added {RKNN_FILE}: rk3588, fp16" in out and err == []
    assert not list(bundle.glob(".engine-*"))  # the staging folder is gone
    Bundle.open(bundle, verify="full")  # every listed file matches its sha256
    assert edge_cli.main(["info", str(bundle)]) == 0
    assert f"RKNN {RKNN_FILE}: rk3588, fp16" in capsys.readouterr().out


def test_build_rknn_refusals_leave_the_bundle_as_it_was(fakes, bundle: Path, capsys) -> None:
    assert _build(bundle, capsys)[0] == 0
    before = _hashes(bundle)

    code, err, _ = _build(bundle, capsys)
    assert code == 2 and len(err) == 1 and "pass --overwrite" in err[0], err

    fakes.RKNN.perturb = 0.5  # the simulator's embedding moves: parity fails
    code, err, _ = _build(bundle, capsys, "--overwrite")
    assert code == 2 and len(err) == 1, err
    assert f"{RKNN_FILE} was not added to the bundle" in err[0] and "embedding cosine" in err[0]

    fakes.RKNN.perturb, fakes.RKNN.fail_inference = 0.0, True
    code, err, _ = _build(bundle, capsys, "--overwrite")
    assert code == 2 and len(err) == 1, err
    assert "running it in the simulator failed" in err[0] and "the simulator crashed" in err[0]

    fakes.RKNN.fail_inference, fakes.RKNN.fail_build = False, True
    code, err, _ = _build(bundle, capsys, "--overwrite")
    assert code == 2 and len(err) == 1, err
    assert "rknn-toolkit2 could not build" in err[0] and "fake: op Foo is not supported" in err[0]
    assert _hashes(bundle) == before


def test_build_rknn_without_the_toolkit_says_what_to_install(bundle, monkeypatch, capsys) -> None:
    _forget_rockchip_modules(monkeypatch)
    monkeypatch.setitem(sys.modules, "rknn", None)  # import rknn fails as when not installed
    before = _hashes(bundle)
    code, err, _ = _build(bundle, capsys)
    assert code == 2 and len(err) == 1 and "rknn-toolkit2 is not installed" in err[0], err
    assert _hashes(bundle) == before


def _reference_outputs(bundle: Path, image, anchors, valid) -> dict[str, np.ndarray]:
    reference = OnnxRuntimeBackend(Bundle.open(bundle), providers=["CPUExecutionProvider"])
    reference.set_anchors(anchors, valid)
    try:
        return reference.infer(image)
    finally:
        reference.close()


def test_rknn_backend_runs_the_graph_as_onnxruntime(fakes, bundle: Path, capsys) -> None:
    assert _build(bundle, capsys)[0] == 0
    opened = Bundle.open(bundle)
    engine = open_backend(opened, "rknn")  # runs the reference check at open
    assert engine.description == f"rknn:{RKNN_FILE}" and engine.precision == "fp16"
    assert fakes.RKNNLite.last_core_mask == fakes.RKNNLite.NPU_CORE_AUTO
    inputs = {r["name"]: r for r in opened.manifest["engine"]["inputs"]}
    shape = tuple(inputs["anchors"]["shape"])
    rng = np.random.default_rng(3)
    image = rng.standard_normal(tuple(inputs["image"]["shape"])).astype(np.float32)
    anchors = rng.standard_normal(shape).astype(np.float32)
    valid = np.ones(shape[0], np.float32)
    engine.set_anchors(anchors, valid)
    got = engine.infer(image)
    want = _reference_outputs(bundle, image, anchors, valid)
    for name, value in want.items():
        assert got[name].shape == value.shape and got[name].dtype == value.dtype, name
    assert np.array_equal(got["token_fate"], want["token_fate"])
    unit = got["embedding"].ravel() / np.linalg.norm(got["embedding"])
    assert float(unit @ want["embedding"].ravel()) > 0.9999
    np.testing.assert_allclose(got["cls_per_layer"], want["cls_per_layer"], rtol=2e-3, atol=2e-3)
    # only some classes change: the same outputs as handing over all anchors
    moved = anchors.copy()
    moved[1] += 1.0
    engine.update_anchor_rows(moved, valid, np.array([1]))
    rows = engine.infer(image)["embedding"]
    engine.set_anchors(moved, valid)
    assert np.array_equal(rows, engine.infer(image)["embedding"])
    released = fakes.RKNNLite.released
    engine.close()
    engine.close()
    assert fakes.RKNNLite.released == released + 1


def test_the_pipeline_classifies_on_rknn(fakes, bundle: Path, capsys) -> None:
    assert _build(bundle, capsys)[0] == 0
    frame = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    with api.open_pipeline(bundle, "tca", backend="onnxruntime") as pipeline:
        want = pipeline.classify(frame, channels="RGB")
    with api.open_pipeline(bundle, "tca", backend="rknn") as pipeline:
        got = pipeline.classify(frame, channels="RGB")
    assert got.label == want.label and got.class_name == want.class_name


def _edge_run(bundle: Path, images: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    argv = ["run", str(bundle), str(images), "--backend", "rknn", *extra]
    code = edge_cli.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_rknn_backend_errors_are_one_line(fakes, bundle, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    write_images(images, 1)
    code, err = _edge_run(bundle, images, capsys)  # no RKNN graph yet
    assert code != 0 and len(err) == 1 and "has no RKNN graph" in err[0], err
    assert "vlm-export build-rknn" in err[0]

    assert _build(bundle, capsys)[0] == 0
    with pytest.raises(UserError, match="runs fp16, not 'fp32'"):
        open_backend(Bundle.open(bundle), "rknn", precision="fp32")
    fakes.RKNNLite.fail_init = True
    code, err = _edge_run(bundle, images, capsys)
    assert code != 0 and len(err) == 1 and "cannot start the NPU runtime" in err[0], err

    with pytest.MonkeyPatch.context() as patch:  # undone before the fakes fixture's teardown
        _forget_rockchip_modules(patch)
        patch.setitem(sys.modules, "rknnlite", None)  # rknn-toolkit-lite2 not installed
        code, err = _edge_run(bundle, images, capsys)
    assert code != 0 and len(err) == 1, err
    assert "rknn-toolkit-lite2 is not installed" in err[0] and "Rockchip" in err[0]


def test_a_drifted_rknn_graph_is_refused_at_open(fakes, bundle, tmp_path, capsys) -> None:
    assert _build(bundle, capsys)[0] == 0
    drifted = drift_encoder(shutil.copytree(bundle, tmp_path / "drifted"))
    shutil.copyfile(drifted / "image_encoder.onnx", bundle / RKNN_FILE)  # a wrong graph on board
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["files"][RKNN_FILE] = file_record(bundle / RKNN_FILE)
    path.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(EngineDriftError, match=r"rknn fp16 .* below the fp16 bound"):
        open_backend(Bundle.open(bundle), "rknn")
    open_backend(Bundle.open(bundle), "rknn", allow_drift=True).close()


needs_toolkit = pytest.mark.skipif(
    not REAL_TOOLKIT, reason="rknn-toolkit2 is not installed (a venv of its own: docs/rockchip.md)"
)


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """vlm-test-tiny exported with today's TopK graph and with --no-topk."""
    root = tmp_path_factory.mktemp("rknn-real")
    (root / "classes.txt").write_text("cat\ndog\nbird\n")
    bundles = {}
    for name, extra in (("topk", []), ("notopk", ["--no-topk"])):
        argv = ["--model", "vlm-test-tiny", "--pretrained", "none", "--quiet"]
        argv += ["--classes", str(root / "classes.txt"), "--out", str(root / name), *extra]
        assert export_cli.main(argv) == 0
        bundles[name] = root / name
    return bundles


@needs_toolkit
@pytest.mark.slow
@pytest.mark.exporter
@pytest.mark.parametrize("graph", ["topk", "notopk"])
def test_rknn_toolkit2_converts_and_the_simulator_matches(tiny_bundles, graph, capsys) -> None:
    bundle = tiny_bundles[graph]
    code, err, out = _build(bundle, capsys)
    assert code == 0, err
    (record,) = rknn_engines(read_manifest(bundle))
    parity = record["parity"]
    assert parity["passed"] and parity["embedding_cosine_min"] >= 0.999
    assert parity["token_fate_agreement_min"] >= 0.9  # fp16 near-ties may move a rare token
    assert ("TopK" in record["cpu_ops"]) == (graph == "topk")
    assert "GatherElements" not in record["cpu_ops"] or graph == "topk"
    print(f"{graph}: {out.strip()}")


def test_the_layers_on_the_cpu_are_read_from_the_toolkits_log() -> None:
    from vlm_export.export.rknn.build import cpu_ops, error_lines

    header = "D RKNN: [06:39:50.589] ID   OpType   DataType Target InputShape   OutputShape"
    rows = [
        "D RKNN: [06:39:50.589] 0    InputOperator  FLOAT16  CPU    \\   (1,3,64,64)  0/0/0  0  In",
        "D RKNN: [06:39:50.589] 3    Conv   FLOAT16  NPU    (1,3,64,64)  (1,64,8,8)  5/6/6  88  C",
        "\x1b[0mD RKNN: [06:39:50.589] 63   TopK   FLOAT16  CPU  (1,1,1,64)  (1,1,1,32)  0/0/0  T",
        "D RKNN: [06:39:50.589] 67   GatherElements INT64  CPU  (1,64)  (1,32)  0/0/0  1  G",
        "D RKNN: [06:39:50.647] 318 ConvExGelu     onnx::MatMul_1760   FLOAT16 (256,64,1,1) | 0x0",
    ]
    log = "\n".join([header, *rows, *rows])  # a log read twice counts each layer once
    assert cpu_ops(log) == {"GatherElements": 1, "TopK": 1}
    lines = "W x\nE RKNN: [1] first\n\x1b[1;31mE\x1b[0m second\nE third\nE fourth"
    assert error_lines(lines) == "E RKNN: [1] first; E second; E third"


def test_bench_compares_rknn_when_named(fakes, bundle: Path, tmp_path: Path, capsys) -> None:
    assert _build(bundle, capsys)[0] == 0
    images = tmp_path / "images"
    write_images(images, 2)
    report = tmp_path / "bench.json"
    argv = ["bench", str(bundle), "--backends", "onnxruntime,rknn", "--images", str(images)]
    argv += ["--rounds", "2", "--warmup", "1", "--json", str(report)]
    assert edge_cli.main(argv) == 0, capsys.readouterr().err
    rows = json.loads(report.read_text(encoding="utf-8"))["results"]
    (rknn,) = [row for row in rows if row["backend"] == "rknn"]
    assert rknn["precision"] == "fp16" and rknn["passed"] is True
