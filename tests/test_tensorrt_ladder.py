"""TensorRT engines for every rung of a ladder: `vlm-export build-engine` builds one per rung (each
checked against its rung's graph), the rung-0 engine stays the bundle's engine, and the ladder
opens one TensorRT engine per rung. TensorRT itself is replaced by test doubles (a fake builder
writing plan files, ONNX Runtime standing in for the engine), as in test_tensorrt.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vlm_export.core.errors import UserError  # noqa: E402
from vlm_export.core.manifest import read_manifest, tensorrt_engines, verify_files  # noqa: E402
from vlm_export.export.pipeline import ExportOptions, export_bundle  # noqa: E402
from vlm_export.export.tensorrt import engine_cmd  # noqa: E402
from vlm_export.export.tensorrt import install as engine_install  # noqa: E402
from vlm_export.export.tensorrt.build import EngineRecord, engine_file_name  # noqa: E402
from vlm_export.models.loading import TEST_MODEL  # noqa: E402
from vlm_export.runtime.bundle import Bundle  # noqa: E402
from vlm_export.runtime.engines import factory  # noqa: E402
from vlm_export.runtime.engines.backends.tensorrt_backend import engine_path  # noqa: E402
from vlm_export.runtime.engines.base import BundleGraph  # noqa: E402
from vlm_export.runtime.engines.checks.parity import open_reference  # noqa: E402
from vlm_export.runtime.engines.ladder.ladder import (  # noqa: E402
    NO_TENSORRT_RUNGS,
    ladder_rungs,
    open_ladder,
    runs_ladder,
)
from vlm_export.runtime.engines.select import DeviceInfo, choose_engine  # noqa: E402

ORIN = DeviceInfo("10.3.0.30", "8.7", "Orin")
RATES = [0.0, 0.1]


def _fake_build(onnx_path, out_dir, precision, workspace_mb, timing_cache, batch_size):
    """A "build" that writes a plan file named as TensorRT's would be, from ``onnx_path``."""
    name = engine_file_name(Path(onnx_path).stem, ORIN.tensorrt_version, "8.7", precision)
    (Path(out_dir) / name).write_bytes(f"plan of {Path(onnx_path).name}".encode())
    data = (Path(out_dir) / name).read_bytes()
    return EngineRecord(
        name, ORIN.tensorrt_version, "8.7", precision, workspace_mb, "Orin",
        "2026-12-07T00:00:00+00:00", hashlib.sha256(data).hexdigest(), len(data),
    )  # fmt: skip


@pytest.fixture(scope="module")
def ladder(tmp_path_factory) -> Path:
    return export_bundle(
        ExportOptions(
            method="tca",
            model=TEST_MODEL,
            domains=[("things", ["cat", "dog", "bird"])],
            out=tmp_path_factory.mktemp("trt") / "ladder",
            templates="single",
            quiet=True,
            text_encoder=False,
            drop_rates=RATES,
        )
    )


@pytest.fixture
def built(ladder: Path, tmp_path: Path, monkeypatch) -> tuple[Path, list[str]]:
    """A copy of the ladder, TensorRT's build and engine replaced; the graphs checked, in order."""
    folder = Path(shutil.copytree(ladder, tmp_path / "ladder"))
    checked: list[str] = []

    def engine_as_onnxruntime(folder, manifest, path):
        checked.append(manifest["engine"]["onnx"])
        return open_reference(folder, manifest)  # parity with the graph it was built from

    monkeypatch.setattr(engine_install, "query_device", lambda: ORIN)
    monkeypatch.setattr(engine_install, "build_engine", _fake_build)
    monkeypatch.setattr(engine_install, "open_engine_backend", engine_as_onnxruntime)
    return folder, checked


def test_build_engine_builds_every_rung_against_its_own_graph(built, capsys) -> None:
    folder, checked = built
    rungs = ladder_rungs(read_manifest(folder))
    assert not runs_ladder(Bundle.open(folder), "tensorrt", None, None, None, None)
    assert engine_cmd.build_engine_main([str(folder), "--precision", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "(ladder rung 1)" in out
    manifest = read_manifest(folder)  # schema-checked
    verify_files(folder, manifest)
    engines = tensorrt_engines(manifest)
    assert [engine.get("rung", 0) for engine in engines] == [0, 1]
    assert len({engine["file"] for engine in engines}) == 2
    assert checked == [rung.onnx for rung in rungs]  # each engine checked on its rung's graph
    for engine, rung in zip(engines, rungs, strict=True):
        assert (folder / engine["file"]).read_bytes() == f"plan of {rung.onnx}".encode()
        assert engine["parity"]["embedding_cosine_min"] == pytest.approx(1.0)
    # the bundle's engine is rung 0's, whatever else the manifest holds
    assert choose_engine(manifest, ORIN)["file"] == engines[0]["file"]
    path, _ = engine_path(folder, manifest, None, None, device=ORIN, rung=1)
    assert path.name == engines[1]["file"]
    assert runs_ladder(Bundle.open(folder), "tensorrt", None, None, None, None)


def test_the_ladder_opens_one_tensorrt_engine_per_rung(built, monkeypatch) -> None:
    folder, _ = built
    bundle = Bundle.open(folder)
    with pytest.raises(UserError, match="rung 0 only"):
        open_ladder(bundle, "tensorrt")  # no rung engines yet
    assert NO_TENSORRT_RUNGS.startswith("this ladder's TensorRT engines")
    engine_install.add_engine_to_bundle(folder, "fp16", 256)
    engine_install.add_rung_engines_to_bundle(folder, "fp16", 256)
    opened: list[tuple[str, int]] = []

    def tensorrt_backend(view: BundleGraph, precision, rung: int = 0):
        """ONNX Runtime on the view's graph, standing in for the rung's engine."""
        opened.append((view.manifest["engine"]["onnx"], rung))
        return open_reference(view.path, view.manifest)

    fake = SimpleNamespace(TensorRTBackend=tensorrt_backend)
    monkeypatch.setattr(factory, "tensorrt_module", lambda: fake)
    bundle = Bundle.open(folder)
    ladder = open_ladder(bundle, "tensorrt")
    rungs = ladder_rungs(bundle.manifest)
    assert opened == [(rung.onnx, rung.index) for rung in rungs]
    image = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    ladder.select(1)
    assert ladder.infer(image)["token_fate"].shape[0] == 1
    ladder.close()


def test_a_one_engine_bundle_builds_no_rungs(built) -> None:
    folder, _ = built
    manifest = read_manifest(folder)
    manifest.pop("ladder")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert engine_install.add_rung_engines_to_bundle(folder, "fp16", 256) == []
