"""TensorRT without a GPU: engine names, trtexec line, fp32 layer pinning, engine selection, the
backend's buffer bookkeeping with a fake engine and fake device memory, the build-engine command
and its errors where TensorRT (or onnx) is missing, and what ``auto`` says when it does not use an
engine. Parity against ONNX Runtime: test_engine_parity.py. Tests marked gpu run where TensorRT
and a GPU exist."""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from fakebundle import make_bundle, write_images
from onnx import TensorProto, helper, numpy_helper

from vlm_export.core.errors import BundleError, UserError
from vlm_export.core.manifest import (
    FORMAT,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    file_record,
    read_manifest,
    verify_files,
)
from vlm_export.export.bundle.staging import record_engine
from vlm_export.export.graph.trt_ops import (
    OnnxMissingError,
    TensorRTCompatibilityError,
    check_onnx_for_tensorrt,
)
from vlm_export.export.tensorrt import install as engine_install
from vlm_export.export.tensorrt.build import (
    EngineRecord,
    build_engine,
    engine_file_name,
    fp32_node_names,
    mark_fp32_layers,
    trtexec_command,
)
from vlm_export.export.tensorrt.engine_cmd import (
    add_tensorrt_arguments,
    build_engine_main,
    preflight_tensorrt,
    run_tensorrt_step,
)
from vlm_export.export.tensorrt.install import add_engine_to_bundle, register_engine_in_bundle
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.backends import tensorrt_backend
from vlm_export.runtime.engines.backends.tensorrt_backend import (
    DeviceMemory,
    EngineRunner,
    TensorRTBackend,
    TensorSpec,
)
from vlm_export.runtime.engines.backends.tensorrt_backend import engine_path as tensorrt_engine_path
from vlm_export.runtime.engines.checks.parity import open_reference
from vlm_export.runtime.engines.factory import open_backend
from vlm_export.runtime.engines.select import (
    DeviceInfo,
    NoMatchingEngineError,
    TensorRTUnavailableError,
    choose_engine,
    normalize_compute_capability,
    select_engine,
)

C, R, D, E, L = 3, 2, 8, 4, 5  # classes, reduction blocks, width, embedding, layers
IMAGE_SHAPE = (1, 3, 16, 16)


# ---------------------------------------------------------------- a small bundle on disk


def _encoder_onnx() -> onnx.ModelProto:
    """A named, TensorRT-clean graph with LayerNorm, softmax and an x * x square."""
    scale = numpy_helper.from_array(np.ones(16, np.float32), "scale")
    nodes = [
        helper.make_node("LayerNormalization", ["image", "scale"], ["n"], name="ln_pre", axis=-1),
        helper.make_node("Softmax", ["n"], ["p"], name="attn_softmax", axis=-1),
        helper.make_node("Mul", ["p", "p"], ["sq"], name="square"),
        helper.make_node("Mul", ["sq", "n"], ["embedding"], name="not_a_square"),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(IMAGE_SHAPE))],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, list(IMAGE_SHAPE))],
        initializer=[scale],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _io(name, shape, dtype="float32"):
    return {"name": name, "shape": list(shape), "dtype": dtype}


def _manifest(onnx_name="image_encoder.onnx", files=None, engines=None):
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created_utc": "2026-11-24T00:00:00+00:00",
        "producer": {"vlm_export": "test"},
        "method": "tca",
        "model": {
            "name": "vlm-test-tiny",
            "pretrained": "none",
            "untrained": True,
            "activation": "gelu",
            "embed_dim": E,
            "layers": L,
        },
        "preprocess": {
            "size": [16, 16],
            "resize_mode": "shortest",
            "interpolation": "bicubic",
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
        },
        "engine": {
            "onnx": onnx_name,
            "opset": 17,
            "batch_size": 1,
            "inputs": [
                _io("image", IMAGE_SHAPE),
                _io("anchors", (C, R, D)),
                _io("anchors_valid", (C,)),
            ],
            "outputs": [
                _io("embedding", (1, E)),
                _io("cls_per_layer", (1, L, D)),
                _io("token_fate", (1, R, 4), "int32"),
            ],
        },
        "engines": engines or [],
        "condensation": {"drop_rate": 0.1},
        "flops": {},
        "parity": {},
        "text": {"embeddings": "text_embeddings.npy"},
        "labels": {"file": "classes.json"},
        "adaptation": {},
        "files": files or {},
    }


@pytest.fixture
def bundle(tmp_path) -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir()
    onnx.save(_encoder_onnx(), folder / "image_encoder.onnx")
    files = {"image_encoder.onnx": file_record(folder / "image_encoder.onnx")}
    (folder / MANIFEST_NAME).write_text(json.dumps(_manifest(files=files)))
    return folder


class _BrokenBindings(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import tensorrt`` fail like bindings installed without TensorRT's libraries."""

    def find_spec(self, name, path, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "tensorrt" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError("libnvonnxparser.so.10: cannot open shared object file")


@pytest.fixture
def no_tensorrt(monkeypatch):
    """``import tensorrt`` fails as on a machine without TensorRT."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


# ---------------------------------------------------------------- names and trtexec


def test_engine_file_name():
    name = engine_file_name("image_encoder", "10.3.0.30", "8.7", "fp16")
    assert name == "image_encoder.trt10.3.0.sm87.fp16.engine"
    assert engine_file_name("x", "10.13.2", (12, 0), "fp32") == "x.trt10.13.2.sm120.fp32.engine"
    assert [normalize_compute_capability(v) for v in ("sm_87", "sm90", 75, (8, 6))] == [
        "8.7",
        "9.0",
        "7.5",
        "8.6",
    ]


def test_trtexec_fp16_line_pins_layernorm_softmax_and_squares(tmp_path):
    path = tmp_path / "image_encoder.onnx"
    onnx.save(_encoder_onnx(), path)
    assert fp32_node_names(path) == ["ln_pre", "attn_softmax", "square"]
    assert fp32_node_names(path, ("Softmax",)) == ["attn_softmax"]
    line = trtexec_command(path, "e.engine", "fp16", 512)
    words = shlex.split(line)
    assert words[0] == "trtexec"
    assert f"--onnx={path}" in words and "--saveEngine=e.engine" in words
    assert "--memPoolSize=workspace:512M" in words and "--fp16" in words
    assert "--precisionConstraints=obey" in words
    spec = "ln_pre:fp32,attn_softmax:fp32,square:fp32"
    assert f"--layerPrecisions={spec}" in words and f"--layerOutputTypes={spec}" in words


def test_trtexec_fp32_line_and_explicit_layers():
    fp32 = shlex.split(trtexec_command("m.onnx", "e.engine", "fp32", 256))
    assert "--noTF32" in fp32 and "--fp16" not in fp32
    assert not any(word.startswith("--layerPrecisions") for word in fp32)
    line = shlex.split(trtexec_command("m.onnx", "e.engine", fp32_layers=["a", "b,c"]))
    assert "--layerPrecisions=a:fp32" in line  # a name trtexec cannot parse is left out
    with pytest.raises(UserError, match="unknown precision"):
        trtexec_command("m.onnx", "e.engine", "int8")
    with pytest.raises(UserError, match="positive"):
        trtexec_command("m.onnx", "e.engine", "fp32", 0)


# ---------------------------------------------------------------- fp32 layer pinning (fake trt)


class _FakeLayer:
    def __init__(self, name, kind, op=None, inputs=("a", "b"), out_dtype="float32"):
        self.name, self.type = name, SimpleNamespace(name=kind)
        self.op = SimpleNamespace(name=op) if op else None
        self._inputs = [SimpleNamespace(name=n) for n in inputs]
        self.num_inputs, self.num_outputs = len(inputs), 1
        self._output = SimpleNamespace(dtype=out_dtype)
        self.precision, self.output_types, self.compute_precision = None, {}, None

    def get_input(self, index):
        return self._inputs[index]

    def get_output(self, index):
        return self._output

    def set_output_type(self, index, dtype):
        self.output_types[index] = dtype


class _FakeNetwork:
    def __init__(self, layers):
        self.layers = layers
        self.num_layers = len(layers)

    def get_layer(self, index):
        return self.layers[index]


def _fake_trt():
    subclass = {
        name: type(name, (_FakeLayer,), {})
        for name in ("IElementWiseLayer", "IUnaryLayer", "IReduceLayer", "INormalizationLayer")
    }
    return SimpleNamespace(float32="float32", float16="float16", **subclass)


def _network():
    return _FakeNetwork(
        [
            _FakeLayer("ln", "NORMALIZATION"),
            _FakeLayer("softmax", "SOFTMAX"),
            _FakeLayer("mean", "REDUCE", "AVG"),
            _FakeLayer("max", "REDUCE", "MAX"),
            _FakeLayer("pow", "ELEMENTWISE", "POW"),
            _FakeLayer("square", "ELEMENTWISE", "PROD", inputs=("x", "x")),
            _FakeLayer("product", "ELEMENTWISE", "PROD"),
            _FakeLayer("sqrt", "UNARY", "SQRT"),
            _FakeLayer("exp", "UNARY", "EXP"),
            _FakeLayer("matmul", "MATRIX_MULTIPLY"),
            _FakeLayer("int_mean", "REDUCE", "AVG", out_dtype="int32"),
        ]
    )


def test_fp32_pinning_picks_layernorm_and_softmax_layers():
    network = _network()
    marked = mark_fp32_layers(network, _fake_trt(), ("LayerNorm", "Softmax"))
    assert marked == ["ln", "softmax", "mean", "pow", "square", "sqrt", "int_mean"]
    by_name = {layer.name: layer for layer in network.layers}
    for name in marked:
        assert by_name[name].precision == "float32"
    assert by_name["ln"].output_types == {0: "float32"}
    assert by_name["ln"].compute_precision == "float32"
    assert by_name["int_mean"].output_types == {}  # integer outputs keep their type
    for name in ("max", "product", "exp", "matmul"):
        assert by_name[name].precision is None and by_name[name].output_types == {}


def test_fp32_pinning_of_condensation_layers_by_name():
    network = _FakeNetwork(
        [
            _FakeLayer("/condensers.0/TopK", "TOPK"),
            _FakeLayer("/condensers.0/ReduceSum_1", "REDUCE", "SUM"),
            _FakeLayer("/condensers.0/ArgMin", "REDUCE", "SUM", out_dtype="int32"),
            _FakeLayer("/anchor_select/ReduceL2", "REDUCE", "SUM"),
            _FakeLayer("/anchor_select_1/ReduceL2", "REDUCE", "SUM"),
            _FakeLayer("/anchored_scores_1/MatMul", "MATRIX_MULTIPLY"),
            _FakeLayer("/resblocks.0/mlp/MatMul", "MATRIX_MULTIPLY"),
        ]
    )
    marked = mark_fp32_layers(network, _fake_trt(), ("Condensation",))
    assert marked == [
        "/condensers.0/TopK",
        "/condensers.0/ReduceSum_1",
        "/anchor_select/ReduceL2",
        "/anchor_select_1/ReduceL2",
        "/anchored_scores_1/MatMul",
    ]


def test_fp32_pinning_of_softmax_only():
    network = _network()
    assert mark_fp32_layers(network, _fake_trt(), ("Softmax",)) == ["softmax"]


# ---------------------------------------------------------------- the builder flow (fake trt)


class _FakeTrtModule(SimpleNamespace):
    """Just enough of TensorRT 10's Python builder API to drive build_engine without a GPU."""

    def __init__(self, layers, parse_ok=True, plan=b"serialized plan", fp16=True, inputs=()):
        flags = ["OBEY_PRECISION_CONSTRAINTS", "TF32"] + (["FP16"] if fp16 else [])
        super().__init__(**vars(_fake_trt()))
        self.layers = layers
        self.__version__ = "10.3.0.30"
        self.BuilderFlag = SimpleNamespace(**{flag: flag for flag in flags})
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
        self.events = SimpleNamespace(flags=set(), cleared=set(), pool={}, caches=[], profiles=[])
        module = self

        class Network:
            def __init__(self):
                self.layers, self.inputs = [], [SimpleNamespace(**i) for i in inputs]
                self.num_inputs = len(self.inputs)

            @property
            def num_layers(self):
                return len(self.layers)

            def get_layer(self, index):
                return self.layers[index]

            def get_input(self, index):
                return self.inputs[index]

        class Parser:
            def __init__(self, network, logger):
                self.network = network
                self.num_errors = 0 if parse_ok else 1

            def parse_from_file(self, path):
                module.events.parsed = path
                self.network.layers = list(layers)
                return parse_ok

            def get_error(self, index):
                return SimpleNamespace(
                    node_operator=lambda: "Unique",
                    node_name=lambda: "uniq",
                    desc=lambda: "No importer registered for op: Unique",
                )

        class Cache:
            def __init__(self, data):
                self.data = bytes(data)

            def serialize(self):
                return self.data + b"+tuned"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                module.events.pool[pool] = size

            def set_flag(self, flag):
                module.events.flags.add(flag)

            def clear_flag(self, flag):
                module.events.cleared.add(flag)

            def create_timing_cache(self, data):
                module.events.caches.append(bytes(data))
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                return not cache.data.startswith(b"foreign")

            def add_optimization_profile(self, profile):
                module.events.profiles.append(profile.shapes)

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, low, opt, high):
                self.shapes[name] = (list(low), list(opt), list(high))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                assert flags == 0
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return plan

        self.Builder, self.OnnxParser = Builder, Parser


def _install_fake_trt(monkeypatch, **kwargs):
    from vlm_export.export.tensorrt import build as tensorrt_build

    fake = _FakeTrtModule(_network().layers, **kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tensorrt_build, "query_device", lambda: ORIN)
    return fake


def test_build_engine_fp16_flow_with_timing_cache(bundle, monkeypatch):
    fake = _install_fake_trt(monkeypatch)
    cache = bundle / "timing.cache"
    record = build_engine(bundle / "image_encoder.onnx", bundle, "fp16", 256, cache)
    assert fake.events.flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}
    pinned = [layer.name for layer in fake.layers if layer.precision == "float32"]
    assert pinned == ["ln", "softmax", "mean", "pow", "square", "sqrt", "int_mean"]
    assert fake.events.pool == {"WORKSPACE": 256 << 20}
    assert fake.events.parsed == str(bundle / "image_encoder.onnx")
    assert record.file == "image_encoder.trt10.3.0.sm87.fp16.engine"
    assert (bundle / record.file).read_bytes() == b"serialized plan"
    assert (record.nbytes, record.device_name, record.workspace_mb) == (15, "Orin", 256)
    assert record.sha256 == file_record(bundle / record.file)["sha256"]
    assert cache.read_bytes() == b"+tuned"
    build_engine(bundle / "image_encoder.onnx", bundle, "fp16", 256, cache)
    assert fake.events.caches == [b"", b"+tuned"]  # the second build starts from the saved cache
    assert fake.events.profiles == []  # static shapes: no optimisation profile


def test_build_engine_fp32_foreign_cache_and_dynamic_batch(bundle, monkeypatch):
    batch_input = {"name": "image", "shape": (-1, 3, 16, 16)}
    fake = _install_fake_trt(monkeypatch, inputs=[batch_input])
    cache = bundle / "timing.cache"
    cache.write_bytes(b"foreign cache")
    record = build_engine(bundle / "image_encoder.onnx", bundle, "fp32", 64, cache, batch_size=4)
    assert record.precision == "fp32" and fake.events.flags == set()
    assert all(layer.precision is None for layer in fake.layers)
    assert fake.events.cleared == {"TF32"}
    assert fake.events.caches == [b"foreign cache", b""]  # refused, so started anew
    assert fake.events.profiles == [{"image": ([1, 3, 16, 16], [4, 3, 16, 16], [4, 3, 16, 16])}]


def test_build_engine_reports_parser_and_builder_failures(bundle, monkeypatch):
    onnx_path = bundle / "image_encoder.onnx"
    _install_fake_trt(monkeypatch, parse_ok=False)
    with pytest.raises(UserError, match="could not parse image_encoder.onnx: Unique node 'uniq'"):
        build_engine(onnx_path, bundle)
    _install_fake_trt(monkeypatch, plan=None)
    with pytest.raises(UserError, match="could not build the engine"):
        build_engine(onnx_path, bundle)
    _install_fake_trt(monkeypatch, fp16=False)  # TensorRT 11 has no weakly typed fp16
    with pytest.raises(UserError, match="TensorRT 11"):
        build_engine(onnx_path, bundle, "fp16")
    assert not list(bundle.glob("*.engine"))


# ---------------------------------------------------------------- engine selection


def _engine(trt="10.3.0.30", cc="8.7", precision="fp16", built="2026-11-01T00:00:00+00:00"):
    sm = cc.replace(".", "")
    release = ".".join(trt.split(".")[:3])
    return {
        "file": f"image_encoder.trt{release}.sm{sm}.{precision}.engine",
        "tensorrt_version": trt,
        "compute_capability": cc,
        "precision": precision,
        "built_utc": built,
    }


ORIN = DeviceInfo("10.3.0.30", "8.7", "Orin")


def test_select_prefers_fp16_and_explains_refusals():
    engines = [
        _engine(precision="fp32"),
        _engine(trt="10.7.0.23", cc="9.0"),
        _engine(),
        _engine(cc="8.6"),
    ]
    choice = select_engine(engines, ORIN)
    assert choice.engine is engines[2]
    reasons = dict(choice.refused)
    assert reasons[engines[1]["file"]] == (
        "built with TensorRT 10.7 for sm_90; this device has TensorRT 10.3 on sm_87"
    )
    assert "sm_86" in reasons[engines[3]["file"]]
    assert "is preferred" in reasons[engines[0]["file"]]
    assert len(choice.refused) == 3
    assert engines[1]["file"] in choice.explain()


def test_select_honours_precision_exact_version_and_newest_build():
    fp32 = _engine(precision="fp32")
    assert select_engine([_engine(), fp32], ORIN, precision="fp32").engine is fp32
    patch = _engine(trt="10.3.1.5")  # same major.minor: accepted, but the exact release wins
    exact = _engine()
    assert select_engine([patch, exact], ORIN).engine is exact
    assert select_engine([patch], ORIN).engine is patch
    exact_fp32 = _engine(precision="fp32")
    assert select_engine([patch, exact_fp32], ORIN).engine is exact_fp32  # loads for sure
    old, new = (
        _engine(built="2026-01-01T00:00:00+00:00"),
        _engine(built="2026-06-01T00:00:00+00:00"),
    )
    assert select_engine([old, new], ORIN).engine is new
    with pytest.raises(UserError, match="unknown precision"):
        select_engine([], ORIN, precision="int8")


def test_select_refuses_incomplete_entries():
    choice = select_engine([{"file": "x.engine", "precision": "fp16"}], ORIN)
    assert choice.engine is None
    assert choice.refused == [
        ("x.engine", "manifest entry lacks tensorrt_version, compute_capability")
    ]


def test_choose_engine_error_lists_every_reason():
    manifest = {"engines": [_engine(trt="10.7.0.23", cc="9.0")]}
    with pytest.raises(NoMatchingEngineError, match="built with TensorRT 10.7 for sm_90") as caught:
        choose_engine(manifest, ORIN)
    assert "TensorRT 10.3 on sm_87" in str(caught.value)
    assert "build-engine" in str(caught.value)
    with pytest.raises(NoMatchingEngineError, match="no engines"):
        choose_engine({"engines": []}, ORIN)


# ---------------------------------------------------------------- backend with fakes


class FakeMemory(DeviceMemory):
    """Device memory as bytearrays, with a log of every allocation and copy."""

    def __init__(self):
        self.buffers: dict[int, bytearray] = {}
        self.allocations: list[int] = []
        self.to_device: list[tuple[int, int]] = []
        self.to_host: list[int] = []
        self.zeroed: list[int] = []
        self.syncs = 0
        self.closed = False
        self.stream = 7

    def allocate(self, nbytes):
        address = 0x1000 * (len(self.buffers) + 1)
        self.buffers[address] = bytearray(b"\xab" * nbytes)  # garbage until written
        self.allocations.append(nbytes)
        return address

    def host_buffer(self, shape, dtype):
        return np.empty(shape, dtype)

    def zero(self, address, nbytes):
        self.buffers[address][:nbytes] = bytes(nbytes)
        self.zeroed.append(address)

    def copy_to_device(self, address, host, offset=0):
        assert host.flags.c_contiguous
        assert offset + host.nbytes <= len(self.buffers[address]), "copy past the buffer"
        self.buffers[address][offset : offset + host.nbytes] = host.tobytes()
        self.to_device.append((address, host.nbytes))

    def copy_to_host(self, host, address):
        host[...] = np.frombuffer(self.buffers[address][: host.nbytes], host.dtype).reshape(
            host.shape
        )
        self.to_host.append(address)

    def synchronize(self):
        self.syncs += 1

    def close(self):
        self.closed = True

    def read(self, address, shape, dtype):
        return np.frombuffer(self.buffers[address], dtype)[: int(np.prod(shape))].reshape(shape)


class FakeRunner(EngineRunner):
    """An 'engine' that reads its bound inputs from FakeMemory and writes its outputs there.

    embedding = mean(image) + sum(anchors * valid[:, None, None]); cls_per_layer = valid.sum();
    token_fate = number of executions.
    """

    def __init__(self, memory: FakeMemory, tensors: list[TensorSpec]):
        self.memory, self.tensors = memory, tensors
        self.addresses: dict[str, int] = {}
        self.shapes: dict[str, tuple] = {}
        self.executions = 0
        self.closed = False

    def io_tensors(self):
        return self.tensors

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def execute(self, stream):
        assert stream == self.memory.stream
        self.executions += 1
        read = self.memory.read
        image = read(self.addresses["image"], IMAGE_SHAPE, np.float32)
        anchors = read(self.addresses["anchors"], (C, R, D), np.float32)
        valid = read(self.addresses["anchors_valid"], (C,), np.float32)
        outputs = {
            "embedding": np.full((1, E), image.mean() + (anchors * valid[:, None, None]).sum()),
            "cls_per_layer": np.full((1, L, D), valid.sum()),
            "token_fate": np.full((1, R, 4), self.executions),
        }
        specs = {spec.name: spec for spec in self.tensors}
        for name, value in outputs.items():
            data = value.astype(specs[name].dtype).tobytes()
            self.memory.buffers[self.addresses[name]][: len(data)] = data

    def close(self):
        self.closed = True


def _specs(image_shape=IMAGE_SHAPE):
    f32, i32 = np.dtype(np.float32), np.dtype(np.int32)
    return [
        TensorSpec("image", True, image_shape, f32),
        TensorSpec("anchors", True, (C, R, D), f32),
        TensorSpec("anchors_valid", True, (C,), f32),
        TensorSpec("embedding", False, (1, E), f32),
        TensorSpec("cls_per_layer", False, (1, L, D), f32),
        TensorSpec("token_fate", False, (1, R, 4), i32),
    ]


def _backend(specs=None):
    memory = FakeMemory()
    runner = FakeRunner(memory, specs or _specs())
    bundle = SimpleNamespace(path=Path("unused"), manifest=_manifest())
    return TensorRTBackend(bundle, runner=runner, memory=memory), runner, memory


def test_buffers_are_allocated_once_with_the_manifest_sizes():
    backend, runner, memory = _backend()
    expected = [1 * 3 * 16 * 16 * 4, C * R * D * 4, C * 4, 1 * E * 4, 1 * L * D * 4, 1 * R * 4 * 4]
    assert memory.allocations == expected
    assert set(runner.addresses) == {spec.name for spec in _specs()}
    assert sorted(memory.zeroed) == sorted(
        [runner.addresses["anchors"], runner.addresses["anchors_valid"]]
    )
    for _ in range(3):
        backend.infer(np.zeros(IMAGE_SHAPE, np.float32))
    assert len(memory.allocations) == 6  # nothing allocated per frame
    assert runner.shapes == {}  # a static engine needs no input shapes


def test_anchors_copied_only_in_set_anchors_and_image_every_frame():
    backend, runner, memory = _backend()
    image_at, anchors_at = runner.addresses["image"], runner.addresses["anchors"]
    valid_at = runner.addresses["anchors_valid"]
    first = backend.infer(np.full(IMAGE_SHAPE, 2.0, np.float32))
    assert first["embedding"][0, 0] == pytest.approx(2.0)  # zeroed anchors: none valid yet
    backend.set_anchors(np.ones((C, R, D)), np.array([1, 0, 1]))  # float64, int: converted
    for value in (1.0, 3.0, 5.0):
        out = backend.infer(np.full(IMAGE_SHAPE, value, np.float32))
        assert out["embedding"][0, 0] == pytest.approx(value + 2 * R * D)  # anchors stay on GPU
        assert out["cls_per_layer"][0, 0, 0] == 2.0
    copies = [address for address, _ in memory.to_device]
    assert copies.count(anchors_at) == 1 and copies.count(valid_at) == 1
    assert copies.count(image_at) == 4
    assert (anchors_at, C * R * D * 4) in memory.to_device
    assert len(memory.to_host) == 4 * 3  # every output copied out per frame
    assert runner.executions == 4


def test_anchor_rows_copy_only_the_classes_that_moved():
    backend, runner, memory = _backend()
    anchors_at, valid_at = runner.addresses["anchors"], runner.addresses["anchors_valid"]
    anchors = np.arange(C * R * D, dtype=np.float32).reshape(C, R, D)
    valid = np.array([1, 0, 1], np.float32)
    backend.set_anchors(anchors, valid)
    memory.to_device.clear()
    anchors[2] += 100.0
    valid[1] = 1.0
    anchors[1] -= 7.0  # class 1 moved too, and is reported; class 0 did not
    backend.update_anchor_rows(anchors, valid, np.array([1, 2]))
    assert memory.to_device == [(anchors_at, R * D * 4), (anchors_at, R * D * 4), (valid_at, C * 4)]
    on_device = memory.read(anchors_at, (C, R, D), np.float32)
    np.testing.assert_array_equal(on_device, anchors)  # rows landed at their offsets
    np.testing.assert_array_equal(memory.read(valid_at, (C,), np.float32), valid)


def test_outputs_by_name_with_manifest_shapes_and_independent_of_later_frames():
    backend, _, _ = _backend()
    first = backend.infer(np.zeros(IMAGE_SHAPE, np.float32))
    assert {name: (value.shape, value.dtype) for name, value in first.items()} == {
        "embedding": ((1, E), np.float32),
        "cls_per_layer": ((1, L, D), np.float32),
        "token_fate": ((1, R, 4), np.int32),
    }
    second = backend.infer(np.zeros(IMAGE_SHAPE, np.float32))
    assert first["token_fate"][0, 0, 0] == 1 and second["token_fate"][0, 0, 0] == 2


def test_wrong_shapes_are_refused():
    backend, _, memory = _backend()
    with pytest.raises(ValueError, match="image must have shape"):
        backend.infer(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="anchors must have shape"):
        backend.set_anchors(np.zeros((C, R + 1, D)), np.zeros(C))
    assert memory.to_device == []


def test_dynamic_batch_input_gets_the_manifest_shape():
    _, runner, _ = _backend(_specs(image_shape=(-1, 3, 16, 16)))
    assert runner.shapes == {"image": IMAGE_SHAPE}


def test_engine_that_does_not_fit_the_manifest_is_refused_and_released():
    specs = _specs()
    specs[3] = TensorSpec("embedding", False, (1, E + 1), np.dtype(np.float32))
    memory = FakeMemory()
    runner = FakeRunner(memory, specs)
    bundle = SimpleNamespace(path=Path("unused"), manifest=_manifest())
    with pytest.raises(BundleError, match="'embedding' is \\[1, 5\\]"):
        TensorRTBackend(bundle, runner=runner, memory=memory)
    assert runner.closed and memory.closed
    renamed = [*_specs()[:5], TensorSpec("fate", False, (1, R, 4), np.dtype(np.int32))]
    with pytest.raises(BundleError, match="another ONNX model"):
        TensorRTBackend(bundle, runner=FakeRunner(memory, renamed), memory=memory)


def test_engine_without_anchors_refuses_set_anchors_and_close_releases():
    manifest = _manifest()
    manifest["engine"]["inputs"] = manifest["engine"]["inputs"][:1]
    manifest["engine"]["outputs"] = manifest["engine"]["outputs"][:2]
    memory = FakeMemory()
    runner = FakeRunner(memory, [_specs()[0], *_specs()[3:5]])
    backend = TensorRTBackend(
        SimpleNamespace(path=Path("unused"), manifest=manifest), runner=runner, memory=memory
    )
    assert memory.zeroed == []
    with pytest.raises(ValueError, match="no anchors"):
        backend.set_anchors(np.zeros((C, R, D)), np.zeros(C))
    backend.close()
    assert runner.closed and memory.closed


def test_backend_on_a_bundle_folder_without_tensorrt(bundle, no_tensorrt):
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not installed"):
        TensorRTBackend(bundle)


# ---------------------------------------------------------------- build without TensorRT


def test_build_engine_without_tensorrt_fails_in_one_line(bundle, no_tensorrt):
    with pytest.raises(TensorRTUnavailableError) as caught:
        build_engine(bundle / "image_encoder.onnx", bundle)
    message = str(caught.value)
    assert message.startswith('TensorRT is not installed: pip install ".[tensorrt]"')
    assert "\n" not in message


def test_bindings_without_libraries_fail_in_one_line(bundle, monkeypatch):
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenBindings(), *sys.meta_path])
    with pytest.raises(TensorRTUnavailableError, match="libraries cannot be loaded") as caught:
        build_engine(bundle / "image_encoder.onnx", bundle)
    assert "libnvonnxparser" in str(caught.value) and "\n" not in str(caught.value)


def test_build_engine_checks_the_graph_before_tensorrt(tmp_path, no_tensorrt):
    node = helper.make_node("NonZero", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 4])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx"
    )
    with pytest.raises(TensorRTCompatibilityError, match="NonZero"):
        build_engine(tmp_path / "m.onnx", tmp_path)
    with pytest.raises(UserError, match="unknown fp32 layer group"):
        build_engine(tmp_path / "m.onnx", tmp_path, fp32_layer_types=("GELU",))


def test_build_engine_main_without_tensorrt(bundle, no_tensorrt, capsys):
    before = (bundle / MANIFEST_NAME).read_bytes()
    assert build_engine_main([str(bundle), "--precision", "fp16", "--workspace", "256"]) == 2
    out, err = capsys.readouterr()
    words = shlex.split(out.splitlines()[1])
    assert words[:3] == [
        "trtexec",
        "--onnx=image_encoder.onnx",
        "--saveEngine=image_encoder.fp16.engine",
    ]
    assert "--memPoolSize=workspace:256M" in words
    # the engine trtexec writes is used only once registered, under the name trtexec wrote
    assert "used only once registered" in out.splitlines()[2]
    assert shlex.split(out.splitlines()[3]) == [
        "vlm-export",
        "build-engine",
        str(bundle),
        "--register",
        str(bundle / "image_encoder.fp16.engine"),
        "--precision",
        "fp16",
    ]
    assert err.count("\n") == 1 and "error: TensorRT is not installed" in err
    assert (bundle / MANIFEST_NAME).read_bytes() == before


def test_build_engine_main_on_a_missing_bundle(tmp_path, capsys):
    assert build_engine_main([str(tmp_path / "nowhere")]) == 2
    assert "bundle folder not found" in capsys.readouterr().err


def test_export_options_and_preflight(no_tensorrt):
    parser = argparse.ArgumentParser()
    add_tensorrt_arguments(parser)
    defaults = parser.parse_args([])
    assert (defaults.tensorrt, defaults.precision, defaults.workspace) == (False, "fp16", 1024)
    assert defaults.timing_cache is None
    args = parser.parse_args(
        ["--tensorrt", "--precision", "fp32", "--workspace", "512", "--timing-cache", "t.cache"]
    )
    assert (args.tensorrt, args.precision, args.workspace) == (True, "fp32", 512)
    assert args.timing_cache == Path("t.cache")
    preflight_tensorrt(defaults)  # nothing asked, nothing checked
    assert run_tensorrt_step(defaults, "unused") is None
    with pytest.raises(TensorRTUnavailableError, match="export without --tensorrt"):
        preflight_tensorrt(args)


# ---------------------------------------------------------------- manifest update (fake build)


def _fake_build(device: DeviceInfo):
    def build(onnx_path, out_dir, precision, workspace_mb, timing_cache, batch_size):
        name = engine_file_name(
            Path(onnx_path).stem, device.tensorrt_version, device.compute_capability, precision
        )
        (Path(out_dir) / name).write_bytes(f"plan {precision} {workspace_mb}".encode())
        record = file_record(Path(out_dir) / name)
        return EngineRecord(
            name,
            device.tensorrt_version,
            device.compute_capability,
            precision,
            workspace_mb,
            device.device_name,
            "2026-11-24T00:00:00+00:00",
            record["sha256"],
            record["bytes"],
        )

    return build


def test_add_engine_records_it_in_the_manifest(tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path / "bundle", method="tca")
    monkeypatch.setattr(engine_install, "query_device", lambda: ORIN)
    monkeypatch.setattr(engine_install, "build_engine", _fake_build(ORIN))
    # the "engine" is ONNX Runtime itself: parity with the reference is exact
    monkeypatch.setattr(
        engine_install,
        "open_engine_backend",
        lambda folder, manifest, path: open_reference(folder, manifest),
    )
    record = add_engine_to_bundle(bundle, "fp16", 256)
    assert record.file == "image_encoder.trt10.3.0.sm87.fp16.engine"
    manifest = read_manifest(bundle)
    assert manifest["engines"] == [record.to_manifest()]
    assert set(manifest["engines"][0]) == {
        "file",
        "tensorrt_version",
        "compute_capability",
        "precision",
        "workspace_mb",
        "device_name",
        "built_utc",
        "sha256",
        "bytes",
        "origin",
        "parity",
    }
    assert manifest["engines"][0]["parity"]["embedding_cosine_min"] == pytest.approx(1.0)
    verify_files(bundle, manifest)  # the engine's sha256 and size are listed
    assert choose_engine(manifest, ORIN) == record.to_manifest()
    with pytest.raises(UserError, match="already in the bundle; pass --overwrite"):
        add_engine_to_bundle(bundle, "fp16", 256)
    add_engine_to_bundle(bundle, "fp16", 512, overwrite=True)
    add_engine_to_bundle(bundle, "fp32", 256)
    manifest = read_manifest(bundle)
    assert [(e["precision"], e["workspace_mb"]) for e in manifest["engines"]] == [
        ("fp16", 512),
        ("fp32", 256),
    ]
    verify_files(bundle, manifest)
    assert not list(bundle.glob(".*.tmp")) and not list(bundle.glob(".engine-*"))


def test_record_engine_replaces_an_entry_of_the_same_file():
    old = {"file": "a.engine", "precision": "fp16"}
    manifest = {"engines": [old, {"file": "b.engine"}], "files": {}}
    record = EngineRecord("a.engine", "10.3.0", "8.7", "fp16", 64, "Orin", "t", "ab", 3)
    record_engine(manifest, record)
    assert [e["file"] for e in manifest["engines"]] == ["b.engine", "a.engine"]
    assert manifest["files"]["a.engine"] == {"sha256": "ab", "bytes": 3}


# ---------------------------------------------------------------- without onnx (on a device)

NO_ONNX = (
    "import runpy, sys; sys.modules['onnx'] = None; sys.argv[0] = 'vlm-export'; "
    "runpy.run_module('vlm_export.export.cli', run_name='__main__')"
)


def _vlm_export_without_onnx(*args, cwd):
    return subprocess.run(
        [sys.executable, "-c", NO_ONNX, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


def test_vlm_export_without_onnx_helps_and_build_engine_says_why(bundle, tmp_path):
    helped = _vlm_export_without_onnx("--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "build-engine" in helped.stdout
    helped = _vlm_export_without_onnx("build-engine", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--register ENGINE_FILE" in helped.stdout
    done = _vlm_export_without_onnx("build-engine", str(bundle), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == (
        "vlm-export build-engine: error: onnx is not installed: pip install onnx (needed to read "
        "the bundle's graph)\n"
    )


def test_graph_readers_without_onnx_raise_one_line(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    for read in (check_onnx_for_tensorrt, fp32_node_names):
        with pytest.raises(OnnxMissingError, match="^onnx is not installed: pip install onnx"):
            read(bundle / "image_encoder.onnx")
    with pytest.raises(OnnxMissingError):
        trtexec_command("m.onnx", "e.engine", "fp16")
    assert "--noTF32" in trtexec_command("m.onnx", "e.engine", "fp32")  # names no layers


# ---------------------------------------------------------------- auto: TensorRT or a warning


def _bundle_with_engines(folder: Path, engines: list[dict]) -> Path:
    folder = make_bundle(folder, method="tca")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["engines"] = engines
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def _auto_warning(bundle_dir: Path, caplog: pytest.LogCaptureFixture) -> str:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlm_export"):
        backend = open_backend(Bundle.open(bundle_dir), "auto")
    backend.close()
    assert backend.description == "onnxruntime:CPUExecutionProvider"
    messages = [r.getMessage() for r in caplog.records if "TensorRT engine not used" in r.msg]
    assert len(messages) == 1 and "\n" not in messages[0]
    return messages[0]


def test_auto_says_why_the_engines_are_not_used(tmp_path, no_tensorrt, caplog):
    folder = _bundle_with_engines(tmp_path / "b", [_engine(trt="10.7.0.23", cc="9.0")])
    message = _auto_warning(folder, caplog)
    assert message.startswith("TensorRT engine not used: TensorRT is not installed: pip install")
    assert message.endswith("; running ONNX Runtime (CPUExecutionProvider)")


def test_auto_names_the_refused_engines_when_none_fits(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tensorrt_backend, "query_device", lambda: ORIN)  # TensorRT "present"
    other = _engine(trt="10.7.0.23", cc="9.0")
    folder = _bundle_with_engines(tmp_path / "b", [other])
    message = _auto_warning(folder, caplog)
    assert message.startswith(
        "TensorRT engine not used: no TensorRT engine in this bundle fits TensorRT 10.3 on sm_87 "
        f"({other['file']}: built with TensorRT 10.7 for sm_90; this device has TensorRT 10.3 "
        "on sm_87)"
    )
    assert "--register FILE" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlm_export"):  # ONNX Runtime without a word:
        plain = make_bundle(tmp_path / "plain", method="tca")  # no engines listed
        open_backend(Bundle.open(plain), "auto").close()
        open_backend(Bundle.open(folder), "auto", providers=["cpu"]).close()  # asked for ORT
    assert not caplog.records


def test_the_chosen_engine_notes_the_refused_ones(tmp_path):
    fits, other, fp32 = _engine(), _engine(trt="10.7.0.23", cc="9.0"), _engine(precision="fp32")
    for record in (fits, fp32):
        (tmp_path / record["file"]).write_bytes(b"plan")
    manifest = {"engines": [other, fp32, fits]}
    path, notes = tensorrt_engine_path(tmp_path, manifest, None, None, device=ORIN)
    assert path == tmp_path / fits["file"]
    assert notes == [
        f"engine {other['file']} not used: built with TensorRT 10.7 for sm_90; this device has "
        "TensorRT 10.3 on sm_87",
        f"engine {fp32['file']} not used: {fits['file']} is preferred",
    ]
    assert tensorrt_engine_path(tmp_path, manifest, None, tmp_path / fp32["file"]) == (
        tmp_path / fp32["file"],
        [],
    )
    with pytest.raises(NoMatchingEngineError, match="--register FILE"):
        tensorrt_engine_path(tmp_path, {"engines": [other]}, None, None, device=ORIN)


def test_vlm_edge_run_prints_the_notes_of_the_backend(tmp_path, monkeypatch, capsys):
    from vlm_export.runtime import cli
    from vlm_export.runtime.engines import factory
    from vlm_export.runtime.engines.backends.onnxruntime_backend import OnnxRuntimeBackend

    def with_notes(bundle):
        backend = OnnxRuntimeBackend(bundle)
        backend.notes = ["engine x.engine not used: built with TensorRT 10.7 for sm_90"]
        return backend

    monkeypatch.setattr(factory, "_open_tensorrt", with_notes)
    folder = _bundle_with_engines(tmp_path / "b", [_engine()])
    image = write_images(tmp_path / "images", 1)[0]
    assert cli.main(["run", str(folder), str(image), "--out", str(tmp_path / "o.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "vlm-edge: note: engine x.engine not used: built with TensorRT 10.7 for sm_90\n" in err


def test_vlm_edge_run_warns_in_one_line(tmp_path, no_tensorrt, capsys):
    from vlm_export.runtime import cli

    folder = _bundle_with_engines(tmp_path / "b", [_engine(cc="9.0")])
    image = write_images(tmp_path / "images", 1)[0]
    assert cli.main(["run", str(folder), str(image), "--out", str(tmp_path / "o.jsonl")]) == 0
    lines = capsys.readouterr().err.splitlines()
    warned = [line for line in lines if "TensorRT engine not used" in line]
    assert warned == [
        "vlm-edge: WARNING: TensorRT engine not used: TensorRT is not installed: pip install "
        '".[tensorrt]" on a machine with NVIDIA\'s TensorRT libraries (on Jetson they '
        "come with JetPack); running ONNX Runtime (CPUExecutionProvider)"
    ]


# ---------------------------------------------------------------- on a GPU with TensorRT


@pytest.fixture
def gpu_device():
    try:
        from vlm_export.runtime.engines.select import query_device

        return query_device()
    except (UserError, RuntimeError) as exc:
        pytest.skip(f"needs TensorRT, cuda-python and a CUDA GPU: {exc}")


@pytest.mark.gpu
def test_cuda_memory_round_trip(gpu_device):
    from vlm_export.runtime.engines.backends.tensorrt_backend import CudaDeviceMemory

    memory = CudaDeviceMemory()
    try:
        data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
        address = memory.allocate(data.nbytes)
        memory.copy_to_device(address, data)
        back = memory.host_buffer(data.shape, data.dtype)
        memory.copy_to_host(back, address)
        memory.synchronize()
        np.testing.assert_array_equal(back, data)
        memory.zero(address, data.nbytes)
        memory.copy_to_host(back, address)
        memory.synchronize()
        assert not back.any()
    finally:
        memory.close()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_built_engine_passes_parity_and_runs(tmp_path, gpu_device, precision):
    folder = make_bundle(tmp_path / "bundle", method="tca")
    record = add_engine_to_bundle(folder, precision, 256)
    assert record.compute_capability == gpu_device.compute_capability
    assert record.parity["passed"] and len(record.parity["cases"]) == 4
    assert read_manifest(folder)["engines"] == [record.to_manifest()]
    bundle = Bundle.open(folder)
    backend = open_backend(bundle, "auto")
    reference = open_reference(folder, bundle.manifest)
    try:
        assert backend.description == f"tensorrt:{record.file}"
        image = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
        got, want = backend.infer(image), reference.infer(image)
    finally:
        backend.close()
        reference.close()
    np.testing.assert_allclose(got["embedding"], want["embedding"], atol=5e-3)


@pytest.mark.gpu
def test_register_an_engine_built_elsewhere(tmp_path, gpu_device):
    folder = make_bundle(tmp_path / "bundle", method="tca")
    elsewhere = build_engine(folder / "image_encoder.onnx", tmp_path, "fp32", 256)
    record = register_engine_in_bundle(folder, tmp_path / elsewhere.file, "fp32")
    assert record.file == elsewhere.file and record.origin == "registered"
    assert record.parity["passed"]
    Bundle.open(folder)
