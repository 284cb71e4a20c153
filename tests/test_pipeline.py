"""The per-frame pipeline (fake and real ONNX engines) and the ONNX Runtime backend."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fakebundle import make_bundle, write_images
from PIL import Image

from vlm_export.core import manifest as mf
from vlm_export.core.errors import BundleError, StateError, UserError
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.backends import onnxruntime_backend as ortb
from vlm_export.runtime.engines.base import EngineBackend
from vlm_export.runtime.engines.factory import open_backend
from vlm_export.runtime.io.preprocess import ImageError
from vlm_export.runtime.numerics import softmax
from vlm_export.runtime.pipeline import Pipeline
from vlm_export.runtime.tca.reservoir import TokenReservoir
from vlm_export.runtime.tca.reservoir_config import ReservoirConfig
from vlm_export.runtime.tca.stage import build_reservoir, reservoir_config


@pytest.fixture(scope="module")
def tca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tca") / "b", method="tca")


@pytest.fixture(scope="module")
def zs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("zs") / "b", method="zeroshot")


@pytest.fixture(scope="module")
def tca_bundle(tca_dir: Path) -> Bundle:
    return Bundle.open(tca_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("images"), 12)


class FakeBackend(EngineBackend):
    """Deterministic outputs per call; records anchors pushed and what each call saw."""

    description = "fake"

    def __init__(self, bundle: Bundle, seed: int = 0) -> None:
        outputs = bundle.engine_io("outputs")
        self.embed = outputs["embedding"]["shape"][1]
        _, self.layers, self.width = outputs["cls_per_layer"]["shape"]
        self.rng = np.random.default_rng(seed)
        self.pushed: list[tuple[np.ndarray, np.ndarray]] = []
        self.valid_seen: list[float] = []
        self.calls: list[dict[str, np.ndarray]] = []
        self.valid = np.zeros(bundle.num_classes, np.float32)

    def set_anchors(self, anchors: np.ndarray, valid: np.ndarray) -> None:
        self.pushed.append((anchors, valid))
        self.valid = valid

    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        assert image.shape[0] == 1 and image.dtype == np.float32
        self.valid_seen.append(float(np.sum(self.valid)))
        embedding = self.rng.standard_normal((1, self.embed)).astype(np.float32)
        embedding /= np.linalg.norm(embedding)
        cls = self.rng.standard_normal((1, self.layers, self.width)).astype(np.float32)
        self.calls.append({"embedding": embedding, "cls_per_layer": cls})
        return {"embedding": embedding, "cls_per_layer": cls}


def _frame(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))


# ------------------------------------------------------------------ pipeline, fake engine
def test_zeroshot_logits_scores_and_topk(tca_bundle: Bundle) -> None:
    backend = FakeBackend(tca_bundle)
    pipeline = Pipeline(tca_bundle, backend, "zeroshot", topk=3)
    result = pipeline.process(_frame(0), index=7, source="x.jpg")
    embedding = backend.calls[0]["embedding"][0]
    expected = 100.0 * embedding @ tca_bundle.text_embeddings.T
    np.testing.assert_allclose(result.logits, expected, rtol=1e-6)
    np.testing.assert_allclose(result.scores, softmax(expected), rtol=1e-4, atol=1e-7)
    assert result.scores.sum() == pytest.approx(1.0, abs=1e-6)
    assert result.label == int(np.argmax(expected))
    assert result.class_name == tca_bundle.classes[result.label]
    assert result.domain == tca_bundle.class_domains[result.label]
    assert [entry[0] for entry in result.topk] == list(np.argsort(-expected)[:3])
    assert set(result.timings) == {"preprocess", "engine", "total"}
    # zeroshot on a condensing engine: ordinary attention, whatever the engine held before
    assert len(backend.pushed) == 1 and not backend.pushed[0][1].any()
    assert backend.valid_seen == [0.0]
    record = result.to_record()
    assert json.loads(json.dumps(record))["class"] == result.class_name
    assert record["index"] == 7 and record["source"] == "x.jpg" and len(record["topk"]) == 3


def test_tca_matches_reservoir_reference(tca_bundle: Bundle) -> None:
    config = ReservoirConfig(capacity=2, anchor_rule="per_class")
    backend = FakeBackend(tca_bundle)
    reservoir = build_reservoir(tca_bundle, {"capacity": 2, "anchor_rule": "per_class"})
    assert reservoir.config == config
    pipeline = Pipeline(tca_bundle, backend, "tca", reservoir=reservoir)
    reference = TokenReservoir(6, 4, 16, [1, 2], config)
    versions = {reservoir.version}
    for step in range(20):
        result = pipeline.process(_frame(step))
        call = backend.calls[step]
        logits = 100.0 * call["embedding"][0] @ tca_bundle.text_embeddings.T
        reference.update(logits, call["cls_per_layer"][0])
        expected = logits + reference.correction(call["cls_per_layer"][0])
        np.testing.assert_allclose(result.logits, expected, rtol=1e-5, atol=1e-5)
        assert result.label == int(np.argmax(expected))
        versions.add(reservoir.version)
        assert set(result.timings) == {"preprocess", "engine", "reservoir", "correction", "total"}
    # anchors pushed once at start and then only when the reservoir's version moved
    assert len(backend.pushed) == len(versions)
    anchors, valid = reservoir.anchors()
    assert backend.pushed[-1][0] is anchors and backend.pushed[-1][1] is valid
    # each frame ran with the anchors from before it: frame 0 saw none, frame 1 the first class
    assert backend.valid_seen[0] == 0.0 and backend.valid_seen[1] == 1.0


def test_fusion_stage_gives_the_scores(tca_bundle: Bundle) -> None:
    class Fixed:
        def __init__(self) -> None:
            self.seen: list[tuple[np.ndarray, np.ndarray]] = []

        def fused_scores(self, logits: np.ndarray, embedding: np.ndarray) -> np.ndarray:
            self.seen.append((logits, embedding))
            return np.array([0.1, 0.2, 0.05, 0.5, 0.1, 0.05], np.float32)

    fusion = Fixed()
    backend = FakeBackend(tca_bundle)
    result = Pipeline(tca_bundle, backend, "zeroshot", fusion=fusion, topk=2).process(_frame(1))
    assert result.label == 3 and [e[0] for e in result.topk] == [3, 1]
    assert result.topk[0][2] == pytest.approx(0.5)
    np.testing.assert_array_equal(fusion.seen[0][0], result.logits)
    np.testing.assert_array_equal(fusion.seen[0][1], backend.calls[0]["embedding"][0])
    assert "fusion" in result.timings


def test_process_inputs_of_every_kind(tca_bundle: Bundle, images: list[Path]) -> None:
    pipeline = Pipeline(tca_bundle, FakeBackend(tca_bundle), "zeroshot")
    rgb = np.asarray(Image.open(images[0]).convert("RGB"))
    for item in (images[0], str(images[0]), Image.open(images[0]), rgb[:, :, ::-1].copy()):
        assert pipeline.process(item).label in range(6)
    tensor = pipeline.preprocessor.from_path(images[0])
    assert pipeline.process_tensor(tensor).timings["preprocess"] == 0.0
    empty = images[0].parent / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        pipeline.process(empty)


def test_pipeline_refuses_bad_setups(tca_bundle: Bundle, zs_dir: Path, tmp_path: Path) -> None:
    zs_bundle = Bundle.open(zs_dir)
    with pytest.raises(UserError, match="needs a bundle exported with token condensation"):
        Pipeline(zs_bundle, FakeBackend(zs_bundle), "tca")
    with pytest.raises(UserError, match="unknown method"):
        Pipeline(tca_bundle, FakeBackend(tca_bundle), "bogus")
    with pytest.raises(UserError, match="needs a RAIL fusion stage"):
        Pipeline(tca_bundle, FakeBackend(tca_bundle), "rail")
    with pytest.raises(UserError, match="topk"):
        Pipeline(tca_bundle, FakeBackend(tca_bundle), "zeroshot", topk=0)
    folder = Path(shutil.copytree(tca_bundle.path, tmp_path / "b8"))
    path = folder / mf.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["engine"]["batch_size"] = 8
    for record in manifest["engine"]["inputs"][:1] + manifest["engine"]["outputs"]:
        record["shape"][0] = 8  # a consistent batch-8 manifest (image and every output)
    path.write_text(json.dumps(manifest))
    batch8 = Bundle.open(folder)
    with pytest.raises(BundleError, match="batch-1"):
        Pipeline(batch8, FakeBackend(tca_bundle), "zeroshot")


# ------------------------------------------------------------------ reservoir settings and state
def test_reservoir_config_from_manifest_and_overrides(tca_bundle: Bundle) -> None:
    assert reservoir_config(tca_bundle.manifest) == ReservoirConfig()  # preset keys ignored
    config = reservoir_config(tca_bundle.manifest, {"tau": 0.5, "lam": None, "eviction": "entropy"})
    assert (config.tau, config.lam, config.eviction) == (0.5, 3.0, "entropy")
    with pytest.raises(UserError, match="capacity"):
        reservoir_config(tca_bundle.manifest, {"capacity": 0})
    with pytest.raises(UserError, match="unknown reservoir setting"):
        reservoir_config(tca_bundle.manifest, {"gamma": 1.0})


def test_state_round_trip_and_refusals(tca_bundle: Bundle, tmp_path: Path) -> None:
    state = tmp_path / "state.npz"
    pipeline = Pipeline(tca_bundle, FakeBackend(tca_bundle), "tca")
    for step in range(15):
        pipeline.process(_frame(step))
    pipeline.save_state(state)
    loaded = build_reservoir(tca_bundle, {}, state)
    np.testing.assert_array_equal(loaded.counts(), pipeline.reservoir.counts())
    np.testing.assert_array_equal(loaded.anchors()[0], pipeline.reservoir.anchors()[0])
    # a resumed pipeline pushes the loaded anchors to the engine before its first frame
    backend = FakeBackend(tca_bundle)
    Pipeline(tca_bundle, backend, "tca", reservoir=loaded)
    assert backend.pushed and backend.pushed[0][0] is loaded.anchors()[0]
    with pytest.raises(UserError, match="saved with capacity=3"):
        build_reservoir(tca_bundle, {"capacity": 2}, state)
    other = Bundle.open(make_bundle(tmp_path / "other", seed=5))
    with pytest.raises(StateError, match="another bundle"):
        build_reservoir(other, {}, state)
    with pytest.raises(UserError, match="no state"):
        Pipeline(tca_bundle, FakeBackend(tca_bundle), "zeroshot").save_state(state)


# ------------------------------------------------------------------ real ONNX engine
def test_real_engine_end_to_end(tca_bundle: Bundle, images: list[Path]) -> None:
    backend = open_backend(tca_bundle, "onnxruntime", threads=1)
    assert backend.description == "onnxruntime:CPUExecutionProvider"
    reservoir = build_reservoir(tca_bundle, {"anchor_rule": "per_class", "capacity": 2})
    pipeline = Pipeline(tca_bundle, backend, "tca", reservoir=reservoir)
    results = [pipeline.process(path, i, str(path)) for i, path in enumerate(images)]
    assert all(0 <= r.label < 6 for r in results)
    assert reservoir.counts().sum() > 0
    # the engine reads the reservoir's own live arrays: bound once, never copied per frame
    anchors, valid = reservoir.anchors()
    bound = backend.bound_anchors()
    assert bound[0] is anchors and bound[1] is valid
    assert valid.sum() > 0


def test_real_engine_zeroshot_is_deterministic(zs_dir: Path, images: list[Path]) -> None:
    bundle = Bundle.open(zs_dir)
    backend = open_backend(bundle)
    assert not backend.condensing
    pipeline = Pipeline(bundle, backend, "zeroshot")
    first = pipeline.process(images[0])
    again = pipeline.process(images[0])
    np.testing.assert_array_equal(first.logits, again.logits)
    with pytest.raises(BundleError, match="takes no anchors"):
        backend.set_anchors(np.zeros((6, 2, 16), np.float32), np.zeros(6, np.float32))


def test_onnxruntime_anchors_share_memory(tca_bundle: Bundle) -> None:
    backend = ortb.OnnxRuntimeBackend(tca_bundle, threads=1)
    image = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    base = backend.infer(image)
    assert set(base) == {"embedding", "cls_per_layer", "token_fate"}
    assert base["embedding"].shape == (1, 8) and base["token_fate"].dtype == np.int32
    assert np.linalg.norm(base["embedding"]) == pytest.approx(1.0, abs=1e-5)
    anchors = np.zeros((6, 2, 16), np.float32)
    valid = np.zeros(6, np.float32)
    backend.set_anchors(anchors, valid)
    np.testing.assert_array_equal(backend.infer(image)["embedding"], base["embedding"])
    anchors += 1.0  # changed in place, no new set_anchors: the bound memory is the array itself
    valid[:] = 1.0
    moved = backend.infer(image)["cls_per_layer"]
    assert not np.allclose(moved, base["cls_per_layer"])
    with pytest.raises(ValueError, match="do not fit"):
        backend.set_anchors(np.zeros((6, 3, 16), np.float32), valid)
    with pytest.raises(ValueError, match="does not fit"):
        backend.infer(np.zeros((1, 3, 16, 16), np.float32))


def test_provider_choice() -> None:
    available = ["AzureExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ortb.choose_providers(None, available) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert ortb.choose_providers(["cpu"], available) == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="not available: TensorrtExecutionProvider"):
        ortb.choose_providers(["tensorrt", "cpu"], available)


def test_provider_fallback_is_reported(
    tca_bundle: Bundle, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # onnxruntime-gpu without CUDA libraries: CUDA is listed but the session runs on CPU
    listed = ["CUDAExecutionProvider", *ort.get_available_providers()]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    with caplog.at_level(logging.WARNING, logger="vlm_export"):
        backend = ortb.OnnxRuntimeBackend(tca_bundle, providers=["cuda", "cpu"])
    assert "could not start CUDAExecutionProvider" in caplog.text
    assert backend.requested_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert backend.providers == ["CPUExecutionProvider"]
    assert backend.description == "onnxruntime:CPUExecutionProvider"


def test_backend_factory(tca_bundle: Bundle, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown backend"):
        open_backend(tca_bundle, "nosuch")
    with pytest.raises(UserError, match="--threads must be at least 1"):
        open_backend(tca_bundle, "onnxruntime", threads=0)
    with pytest.raises(UserError, match="onnxruntime backend only"):
        open_backend(tca_bundle, "tensorrt", providers=["cpu"])
    with pytest.raises(UserError):  # no TensorRT here: a one-line user error, not an ImportError
        open_backend(tca_bundle, "tensorrt")
    # auto with listed engines but no usable TensorRT falls back to ONNX Runtime
    folder = Path(shutil.copytree(tca_bundle.path, tmp_path / "engines"))
    path = folder / mf.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["engines"] = [{"file": "x.engine", "tensorrt_version": "10.3.0", "precision": "fp16"}]
    path.write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backend = open_backend(Bundle.open(folder), "auto")
    assert backend.description.startswith("onnxruntime:")


def test_corrupt_onnx_is_a_bundle_error(tca_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tca_dir, tmp_path / "bad"))
    (folder / mf.IMAGE_ENCODER_ONNX).write_bytes(b"not an onnx model")
    with pytest.raises(BundleError, match="ONNX Runtime cannot load"):
        open_backend(Bundle.open(folder, verify=False), "onnxruntime")


def test_reservoir_needs_tca(tca_bundle: Bundle) -> None:
    reservoir = build_reservoir(tca_bundle)
    with pytest.raises(UserError, match="needs method tca"):
        Pipeline(tca_bundle, FakeBackend(tca_bundle), "zeroshot", reservoir=reservoir)


class NanOnceBackend(FakeBackend):
    """A fake engine whose second frame comes back with NaN CLS tokens."""

    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        outputs = super().infer(image)
        if len(self.calls) == 2:
            outputs["cls_per_layer"][:] = np.nan
        return outputs


def test_non_finite_engine_output_is_a_frame_error_and_spares_the_reservoir(
    tca_bundle: Bundle,
) -> None:
    from vlm_export.runtime.pipeline import FrameError

    pipeline = Pipeline(tca_bundle, NanOnceBackend(tca_bundle), "tca")
    pipeline.process(_frame(0))
    with pytest.raises(FrameError, match="non-finite CLS tokens"):
        pipeline.process(_frame(1))
    assert pipeline.reservoir.counts().sum() == 1  # the bad frame never reached the reservoir
    pipeline.process(_frame(2))
    assert pipeline.reservoir.counts().sum() == 2


class RowRecordingBackend(FakeBackend):
    """Records which anchor rows the TCA stage hands over, instead of whole arrays."""

    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle)
        self.row_updates: list[list[int]] = []

    def update_anchor_rows(self, anchors, valid, rows) -> None:
        self.row_updates.append(rows.tolist())
        super().update_anchor_rows(anchors, valid, rows)


def test_tca_stage_pushes_whole_anchors_once_then_only_moved_rows(tca_bundle: Bundle) -> None:
    backend = RowRecordingBackend(tca_bundle)
    reservoir = build_reservoir(tca_bundle, {"anchor_rule": "per_class", "capacity": 2})
    pipeline = Pipeline(tca_bundle, backend, "tca", reservoir=reservoir)
    assert len(backend.pushed) == 1 and backend.row_updates == []  # the initial full push
    for seed in range(12):
        pipeline.process(_frame(seed))
    assert backend.row_updates, "per-class anchors move one class per frame"
    assert all(len(rows) == 1 for rows in backend.row_updates)
    np.testing.assert_array_equal(backend.pushed[-1][0], reservoir.anchors()[0])


def test_process_without_adapting_leaves_the_state_alone(tmp_path) -> None:
    """``adapt=False`` decides with the reservoir as it is: same logits as the frame an adapting
    pipeline would see after the same history, without the frame's own entry."""
    bundle = Bundle.open(make_bundle(tmp_path / "bundle"))
    images = write_images(tmp_path / "images", 6)
    looking = Pipeline(bundle, open_backend(bundle, "onnxruntime"), "tca")
    for path in images[:5]:
        looking.process(path)
    before = {k: v.copy() for k, v in looking.reservoir.state_arrays().items()}
    version = looking.reservoir.version
    result = looking.process(images[5], adapt=False)
    assert "reservoir" not in result.timings
    assert looking.reservoir.version == version
    for key, value in looking.reservoir.state_arrays().items():
        np.testing.assert_array_equal(value, before[key])
    outputs = looking.backend.infer(looking.preprocessor.convert(images[5])[None])
    zero_shot = 100.0 * outputs[mf.EMBEDDING_OUTPUT][0] @ bundle.text_embeddings.T
    expected = zero_shot + looking.tca.correction(outputs[mf.CLS_OUTPUT][0])
    np.testing.assert_allclose(result.logits, expected, rtol=1e-5, atol=1e-5)
    adapting = looking.process(images[5])
    assert "reservoir" in adapting.timings
