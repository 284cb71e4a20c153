"""Engine parity against ONNX Runtime CPU, without a GPU.

Two layers: ``compare_backends`` driven by small NumPy EngineBackends (one equal to the reference,
one off by a known amount), and ``add_engine_to_bundle`` / ``build-engine --register`` on a real
tiny bundle, where the "TensorRT engine" is the real TensorRTBackend over fake device memory whose
runner executes the bundle's ONNX graph with ONNX Runtime (optionally perturbed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle
from test_tensorrt import ORIN, FakeMemory, _fake_build, _install_fake_trt

from vlm_export.core import manifest as mf
from vlm_export.core.errors import UserError
from vlm_export.export.tensorrt import install as engine_install
from vlm_export.export.tensorrt.build import build_engine
from vlm_export.export.tensorrt.engine_cmd import build_engine_main
from vlm_export.export.tensorrt.install import (
    add_engine_to_bundle,
    precision_of,
    register_engine_in_bundle,
)
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.backends.tensorrt_backend import (
    EngineRunner,
    TensorRTBackend,
    TensorSpec,
)
from vlm_export.runtime.engines.base import BundleGraph, EngineBackend
from vlm_export.runtime.engines.checks.parity import (
    EngineParityError,
    check_engine_parity,
    compare_backends,
)
from vlm_export.runtime.engines.select import TensorRTUnavailableError, choose_engine

C, R, D, E, L, P = 3, 2, 6, 5, 4, 9  # classes, reductions, width, embedding, layers, patches
IMAGE = (1, 3, 8, 8)


# ---------------------------------------------------------------- compare_backends with fakes


def _manifest(condensing: bool = True) -> dict:
    def io(name, shape, dtype="float32"):
        return {"name": name, "shape": list(shape), "dtype": dtype}

    inputs = [io("image", IMAGE)]
    outputs = [io("embedding", (1, E)), io("cls_per_layer", (1, L, D))]
    if condensing:
        inputs += [io("anchors", (C, R, D)), io("anchors_valid", (C,))]
        outputs.append(io("token_fate", (1, R, P), "int32"))
    condensation = {"anchor_layers": [1, 2]} if condensing else None
    return {"engine": {"inputs": inputs, "outputs": outputs}, "condensation": condensation}


class NumpyEngine(EngineBackend):
    """A deterministic small "tower": the reference, or an engine off by ``angle`` (radians)."""

    def __init__(self, manifest, angle=0.0, flip_fate=0, nan=False, embed=E, name="numpy"):
        rng = np.random.default_rng(42)  # the same weights for every instance
        self.w_cls = rng.standard_normal((int(np.prod(IMAGE)), L * D)).astype(np.float32) * 0.1
        self.w_emb = rng.standard_normal((L * D, embed)).astype(np.float32)
        self.condensing = len(manifest["engine"]["inputs"]) == 3
        self.angle, self.flip_fate, self.nan = angle, flip_fate, nan
        self.anchors = np.zeros((C, R, D), np.float32)
        self.valid = np.zeros(C, np.float32)
        self.received: list[tuple[np.ndarray, np.ndarray]] = []
        self.images: list[np.ndarray] = []
        self.description = name

    def set_anchors(self, anchors, valid):
        self.anchors, self.valid = np.array(anchors), np.array(valid)
        self.received.append((self.anchors, self.valid))

    def infer(self, image):
        self.images.append(np.array(image))
        cls = (image.reshape(1, -1) @ self.w_cls).reshape(1, L, D)
        shift = (self.anchors * self.valid[:, None, None]).mean(axis=0)  # [R, D]
        cls[0, 1:3] += shift
        embedding = np.tanh(cls.reshape(1, -1)) @ self.w_emb
        embedding /= np.linalg.norm(embedding)
        if self.angle:  # rotate by exactly ``angle`` away from the reference
            normal = np.random.default_rng(7).standard_normal(embedding.shape)
            normal -= (normal @ embedding.T) * embedding
            normal /= np.linalg.norm(normal)
            embedding = np.cos(self.angle) * embedding + np.sin(self.angle) * normal
        if self.nan:
            embedding[0, 0] = np.nan
        out = {"embedding": embedding.astype(np.float32), "cls_per_layer": cls.astype(np.float32)}
        if self.condensing:
            fate = (np.arange(R * P).reshape(1, R, P) % 3).astype(np.int32)
            fate.reshape(-1)[: self.flip_fate] += 1
            out["token_fate"] = fate
        return out


def test_an_engine_equal_to_the_reference_passes_with_every_case():
    manifest = _manifest()
    engine, reference = NumpyEngine(manifest, name="tensorrt:x"), NumpyEngine(manifest)
    report = check_engine_parity(engine, reference, manifest, "fp16")
    assert [case["case"] for case in report["cases"]] == [
        "image0_anchors_off",
        "image0_anchors_on",
        "image1_anchors_off",
        "image1_anchors_on",
    ]
    assert report["passed"] is True
    assert report["reference"] == "onnxruntime CPU" and report["engine_backend"] == "tensorrt:x"
    assert report["embedding_cosine_min"] == pytest.approx(1.0)
    assert report["embedding_max_abs"] == 0.0 and report["cls_cosine_min"] == pytest.approx(1.0)
    assert report["token_fate_agreement_min"] == 1.0
    assert report["thresholds"] == {"embedding_cosine_min": 0.999}
    json.dumps(report)  # goes into the manifest as it is
    # both backends saw the same inputs; anchors off (zeros), then on (all valid)
    assert all(np.array_equal(a, b) for a, b in zip(engine.images, reference.images, strict=True))
    for (a_anchors, a_valid), (b_anchors, b_valid) in zip(
        engine.received, reference.received, strict=True
    ):
        np.testing.assert_array_equal(a_anchors, b_anchors)
        np.testing.assert_array_equal(a_valid, b_valid)
    off, on = engine.received[0], engine.received[1]
    assert not off[0].any() and not off[1].any()
    assert on[1].tolist() == [1.0] * C
    # scaled like the CLS tokens at the anchor layers of the reference's anchors-off run
    cls_rows = (engine.images[0].reshape(1, -1) @ engine.w_cls).reshape(L, D)[[1, 2]]
    assert 0.5 < on[0].std() / cls_rows.std() < 2.0
    assert np.abs(on[0].mean(axis=0) - cls_rows).max() < cls_rows.std()


def test_an_engine_off_the_reference_fails_with_the_numbers():
    manifest = _manifest()
    engine = NumpyEngine(manifest, angle=0.2, flip_fate=3)
    with pytest.raises(EngineParityError) as caught:
        check_engine_parity(engine, NumpyEngine(manifest), manifest, "fp16")
    message = str(caught.value)
    cosine = np.cos(0.2)
    assert f"embedding cosine {cosine:.6f} (need >= 0.999 for fp16)" in message
    assert "max abs error" in message and "token fate agreement 0.8333" in message
    assert "\n" not in message
    report = compare_backends(engine, NumpyEngine(manifest), manifest, "fp16")
    assert report["passed"] is False
    assert report["embedding_cosine_min"] == pytest.approx(cosine, abs=1e-6)
    assert report["token_fate_agreement_min"] == pytest.approx(1 - 3 / (R * P))


def test_thresholds_depend_on_the_precision():
    manifest = _manifest()
    angle = np.arccos(0.9995)  # between fp16's 0.999 and fp32's 0.9999
    reference = NumpyEngine(manifest)
    fp16 = compare_backends(NumpyEngine(manifest, angle=angle), reference, manifest, "fp16")
    fp32 = compare_backends(NumpyEngine(manifest, angle=angle), reference, manifest, "fp32")
    assert fp16["embedding_cosine_min"] == pytest.approx(0.9995, abs=1e-6)
    assert fp16["passed"] is True and fp32["passed"] is False
    assert fp32["thresholds"] == {"embedding_cosine_min": 0.9999}
    with pytest.raises(UserError, match="unknown engine precision 'int8'"):
        compare_backends(reference, reference, manifest, "int8")


def test_a_nan_embedding_never_passes():
    manifest = _manifest()
    report = compare_backends(
        NumpyEngine(manifest, nan=True), NumpyEngine(manifest), manifest, "fp16"
    )
    assert report["passed"] is False


def test_a_full_tower_has_image_cases_and_no_anchors():
    manifest = _manifest(condensing=False)
    engine, reference = NumpyEngine(manifest), NumpyEngine(manifest)
    report = compare_backends(engine, reference, manifest, "fp32", images=3, seed=5)
    assert [case["case"] for case in report["cases"]] == ["image0", "image1", "image2"]
    assert engine.received == [] and report["token_fate_agreement_min"] is None
    assert report["passed"] is True and report["seed"] == 5


def test_outputs_that_cannot_be_compared_are_an_error():
    manifest = _manifest()
    with pytest.raises(EngineParityError, match=r"'embedding' has shape \[1, 6\], ONNX Runtime"):
        check_engine_parity(
            NumpyEngine(manifest, embed=E + 1), NumpyEngine(manifest), manifest, "fp16"
        )


# ---------------------------------------------------------------- through the bundle commands


class OrtRunner(EngineRunner):
    """A fake TensorRT engine: runs the bundle's ONNX with ONNX Runtime on FakeMemory buffers.

    ``noise`` is added to the embedding (relative to its norm) to make an engine that is off.
    """

    def __init__(self, memory: FakeMemory, onnx_path: Path, manifest: dict, noise: float = 0.0):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.memory, self.noise, self.addresses, self.closed = memory, noise, {}, False
        self.tensors = [
            TensorSpec(r["name"], kind == "inputs", tuple(r["shape"]), np.dtype(r["dtype"]))
            for kind in ("inputs", "outputs")
            for r in manifest["engine"][kind]
        ]

    def io_tensors(self):
        return list(self.tensors)

    def set_input_shape(self, name, shape):
        raise AssertionError("static engine")

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def execute(self, stream):
        feeds = {
            t.name: self.memory.read(self.addresses[t.name], t.shape, t.dtype).copy()
            for t in self.tensors
            if t.is_input
        }
        names = [t.name for t in self.tensors if not t.is_input]
        for name, value in zip(names, self.session.run(names, feeds), strict=True):
            if name == "embedding" and self.noise:
                rng = np.random.default_rng(3)
                value = value + rng.standard_normal(value.shape) * self.noise * np.abs(value).max()
            data = np.ascontiguousarray(value, dtype=self.memory_dtype(name)).tobytes()
            self.memory.buffers[self.addresses[name]][: len(data)] = data

    def memory_dtype(self, name):
        return next(t.dtype for t in self.tensors if t.name == name)

    def close(self):
        self.closed = True


@pytest.fixture
def tca_bundle(tmp_path) -> Path:
    return make_bundle(tmp_path / "bundle", method="tca")


def _fake_engines(monkeypatch, noise: float = 0.0) -> list[TensorRTBackend]:
    """build_engine writes a placeholder plan; the engine that "loads" it runs the ONNX graph."""
    opened: list[TensorRTBackend] = []

    def open_engine(bundle_dir, manifest, engine_path):
        assert Path(engine_path).is_file()
        memory = FakeMemory()
        runner = OrtRunner(memory, bundle_dir / manifest["engine"]["onnx"], manifest, noise)
        graph = BundleGraph(bundle_dir, manifest)
        backend = TensorRTBackend(graph, runner=runner, memory=memory)
        opened.append(backend)
        return backend

    monkeypatch.setattr(engine_install, "query_device", lambda: ORIN)
    monkeypatch.setattr(engine_install, "build_engine", _fake_build(ORIN))
    monkeypatch.setattr(engine_install, "open_engine_backend", open_engine)
    return opened


def _no_staging_left(folder: Path) -> bool:
    leftovers = [*folder.glob(".engine-*"), *folder.glob(".*.tmp"), *folder.glob(".*.vlm-tmp-*")]
    return not leftovers


def test_a_built_engine_is_recorded_with_its_parity(tca_bundle, monkeypatch):
    opened = _fake_engines(monkeypatch)
    record = add_engine_to_bundle(tca_bundle, "fp16", 256)
    manifest = mf.read_manifest(tca_bundle)
    entry = manifest["engines"][0]
    assert entry == record.to_manifest() and entry["origin"] == "built"
    parity = entry["parity"]
    assert parity["reference"] == "onnxruntime CPU" and parity["passed"] is True
    assert parity["reference_backend"] == "onnxruntime:CPUExecutionProvider"
    assert len(parity["cases"]) == 4 and parity["embedding_cosine_min"] > 0.99999
    assert parity["token_fate_agreement_min"] == 1.0 and parity["cls_cosine_min"] > 0.99999
    assert (tca_bundle / record.file).read_bytes() == b"plan fp16 256"
    assert opened[0].runner.closed and opened[0].memory.closed  # released after the check
    Bundle.open(tca_bundle)  # sha256 of every file, the engine's included
    assert choose_engine(manifest, ORIN)["file"] == record.file
    assert _no_staging_left(tca_bundle)


def test_an_engine_failing_parity_is_removed_and_the_manifest_unchanged(tca_bundle, monkeypatch):
    _fake_engines(monkeypatch, noise=0.5)
    before = (tca_bundle / mf.MANIFEST_NAME).read_bytes()
    with pytest.raises(EngineParityError) as caught:
        add_engine_to_bundle(tca_bundle, "fp16", 256)
    message = str(caught.value)
    assert message.startswith("image_encoder.trt10.3.0.sm87.fp16.engine was not added to the ")
    assert "embedding cosine 0." in message and "(need >= 0.999 for fp16)" in message
    assert "\n" not in message
    assert (tca_bundle / mf.MANIFEST_NAME).read_bytes() == before
    assert not list(tca_bundle.glob("*.engine")) and _no_staging_left(tca_bundle)


def test_a_failing_rebuild_keeps_the_engine_already_there(tca_bundle, monkeypatch):
    _fake_engines(monkeypatch)
    record = add_engine_to_bundle(tca_bundle, "fp16", 256)
    before = (tca_bundle / mf.MANIFEST_NAME).read_bytes()
    _fake_engines(monkeypatch, noise=0.5)
    with pytest.raises(EngineParityError):
        add_engine_to_bundle(tca_bundle, "fp16", 512, overwrite=True)
    assert (tca_bundle / record.file).read_bytes() == b"plan fp16 256"
    assert (tca_bundle / mf.MANIFEST_NAME).read_bytes() == before
    Bundle.open(tca_bundle)


def test_register_a_trtexec_engine(tca_bundle, tmp_path, monkeypatch, capsys):
    _fake_engines(monkeypatch)
    built = tmp_path / "image_encoder.fp16.engine"  # the name the trtexec line writes
    built.write_bytes(b"trtexec plan")
    assert build_engine_main([str(tca_bundle), "--register", str(built)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("registered image_encoder.trt10.3.0.sm87.fp16.engine: fp16, TensorRT")
    assert "against onnxruntime CPU: embedding cosine 1.000000" in out
    assert out.splitlines()[1] == (
        f"{built} was copied into the bundle as image_encoder.trt10.3.0.sm87.fp16.engine; it is "
        "no longer needed"
    )
    manifest = mf.read_manifest(tca_bundle)
    [entry] = manifest["engines"]
    assert entry["file"] == "image_encoder.trt10.3.0.sm87.fp16.engine"
    assert (entry["origin"], entry["workspace_mb"], entry["precision"]) == (
        "registered",
        None,
        "fp16",
    )
    assert (entry["tensorrt_version"], entry["compute_capability"]) == ("10.3.0.30", "8.7")
    assert entry["parity"]["passed"] is True
    assert (tca_bundle / entry["file"]).read_bytes() == b"trtexec plan" and built.is_file()
    Bundle.open(tca_bundle)
    with pytest.raises(UserError, match="already in the bundle; pass --overwrite to replace it"):
        register_engine_in_bundle(tca_bundle, built)
    register_engine_in_bundle(tca_bundle, built, "fp16", overwrite=True)
    assert _no_staging_left(tca_bundle)


def test_register_refuses_before_touching_the_bundle(tca_bundle, tmp_path, monkeypatch, capsys):
    before = (tca_bundle / mf.MANIFEST_NAME).read_bytes()
    plain = tmp_path / "model.engine"
    plain.write_bytes(b"plan")
    with pytest.raises(UserError, match="cannot tell the precision of model.engine"):
        register_engine_in_bundle(tca_bundle, plain)
    assert precision_of(plain, "fp32") == "fp32"
    assert precision_of("x.fp32.engine", None) == "fp32"
    with pytest.raises(UserError, match="engine file not found"):
        register_engine_in_bundle(tca_bundle, tmp_path / "missing.fp16.engine")
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailableError) as caught:
        register_engine_in_bundle(tca_bundle, plain, "fp16")
    assert str(caught.value).startswith(
        "--register loads the engine with this machine's TensorRT to check it: TensorRT is not "
        "installed"
    )
    assert "\n" not in str(caught.value)
    assert build_engine_main([str(tca_bundle), "--register", str(plain), "--workspace", "64"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "vlm-export build-engine: error: --workspace and --timing-cache apply to building, not "
        "to --register\n"
    )
    assert (tca_bundle / mf.MANIFEST_NAME).read_bytes() == before
    assert not list(tca_bundle.glob("*.engine"))


def test_a_registered_engine_that_is_off_is_not_kept(tca_bundle, tmp_path, monkeypatch, capsys):
    _fake_engines(monkeypatch, noise=0.5)
    built = tmp_path / "image_encoder.fp32.engine"
    built.write_bytes(b"plan")
    before = (tca_bundle / mf.MANIFEST_NAME).read_bytes()
    assert build_engine_main([str(tca_bundle), "--register", str(built)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "was not added to the bundle" in err and "(need >= 0.9999 for fp32)" in err
    assert (tca_bundle / mf.MANIFEST_NAME).read_bytes() == before
    assert not list(tca_bundle.glob("*.engine")) and _no_staging_left(tca_bundle)


def test_the_builder_flow_with_a_fake_tensorrt_module(tca_bundle, monkeypatch):
    """build_engine itself (fake tensorrt module) into the staging folder, then the parity run."""
    _fake_engines(monkeypatch)
    fake = _install_fake_trt(monkeypatch)
    monkeypatch.setattr(engine_install, "build_engine", build_engine)  # the real one again
    record = add_engine_to_bundle(tca_bundle, "fp16", 128)
    assert fake.events.flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}
    assert fake.events.parsed == str(tca_bundle / "image_encoder.onnx")
    assert (tca_bundle / record.file).read_bytes() == b"serialized plan"
    assert record.parity["passed"] is True
    assert mf.read_manifest(tca_bundle)["engines"] == [record.to_manifest()]
    assert _no_staging_left(tca_bundle)


def test_an_engine_that_fails_to_run_is_not_kept(tca_bundle, monkeypatch):
    opened = _fake_engines(monkeypatch)

    def broken(stream):
        raise RuntimeError("CUDA call cudaMemcpyAsync failed:\ncudaErrorIllegalAddress")

    real_open = engine_install.open_engine_backend

    def open_broken(*args):
        backend = real_open(*args)
        backend.runner.execute = broken
        return backend

    monkeypatch.setattr(engine_install, "open_engine_backend", open_broken)
    before = (tca_bundle / mf.MANIFEST_NAME).read_bytes()
    with pytest.raises(EngineParityError) as caught:
        add_engine_to_bundle(tca_bundle, "fp32", 64)
    assert str(caught.value) == (
        "image_encoder.trt10.3.0.sm87.fp32.engine was not added to the bundle: running it failed "
        "(CUDA call cudaMemcpyAsync failed: cudaErrorIllegalAddress)"
    )
    assert opened[0].memory.closed
    assert (tca_bundle / mf.MANIFEST_NAME).read_bytes() == before
    assert not list(tca_bundle.glob("*.engine")) and _no_staging_left(tca_bundle)
