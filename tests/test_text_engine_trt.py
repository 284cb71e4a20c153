"""The TensorRT side of the text engine without a GPU: the runner's bookkeeping over fake device
memory and engine, engine records with a role, and engine selection by role."""

from __future__ import annotations

import numpy as np
import pytest

from vlm_export.core.manifest import TEXT_EMBEDDING_OUTPUT, TOKENS_INPUT
from vlm_export.runtime.engines.backends.tensorrt_backend import (
    DeviceMemory,
    EngineRunner,
    TensorSpec,
)
from vlm_export.runtime.engines.select import (
    IMAGE_ROLE,
    TEXT_ROLE,
    DeviceInfo,
    engines_of_role,
    select_engine,
)
from vlm_export.runtime.text.tensorrt_text import TensorRTTextRunner

E, MAX = 8, (16, 77)
WEIGHTS = np.random.default_rng(0).normal(size=(50000, E)).astype(np.float32)


def reference(tokens: np.ndarray) -> np.ndarray:
    """What the fake engine computes: the row at each row's EOT (argmax), normalised."""
    rows = WEIGHTS[tokens[np.arange(len(tokens)), tokens.argmax(axis=1)]]
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


class Memory(DeviceMemory):
    def __init__(self) -> None:
        self.buffers: dict[int, bytearray] = {}
        self.stream = 3
        self.closed = False

    def allocate(self, nbytes):
        address = 0x100 * (len(self.buffers) + 1)
        self.buffers[address] = bytearray(b"\xab" * nbytes)
        return address

    def host_buffer(self, shape, dtype):
        return np.empty(shape, dtype)

    def zero(self, address, nbytes):
        self.buffers[address][:nbytes] = bytes(nbytes)

    def copy_to_device(self, address, host, offset=0):
        assert offset + host.nbytes <= len(self.buffers[address])
        self.buffers[address][offset : offset + host.nbytes] = host.tobytes()

    def copy_to_host(self, host, address):
        host[...] = np.frombuffer(self.buffers[address][: host.nbytes], host.dtype).reshape(
            host.shape
        )

    def synchronize(self):
        pass

    def close(self):
        self.closed = True


class Runner(EngineRunner):
    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self.addresses: dict[str, int] = {}
        self.shape: tuple[int, int] | None = None
        self.closed = False

    def io_tensors(self):
        return [
            TensorSpec(TOKENS_INPUT, True, (-1, -1), np.dtype(np.int64)),
            TensorSpec(TEXT_EMBEDDING_OUTPUT, False, (-1, E), np.dtype(np.float32)),
        ]

    def set_input_shape(self, name, shape):
        assert name == TOKENS_INPUT
        self.shape = tuple(shape)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def execute(self, stream):
        batch, length = self.shape
        raw = self.memory.buffers[self.addresses[TOKENS_INPUT]]
        tokens = np.frombuffer(raw, np.int64)[: batch * length].reshape(batch, length)
        out = reference(tokens).astype(np.float32).tobytes()
        self.memory.buffers[self.addresses[TEXT_EMBEDDING_OUTPUT]][: len(out)] = out

    def close(self):
        self.closed = True


def _tokens(batch: int, length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = np.zeros((batch, length), dtype=np.int64)
    for row in range(batch):
        end = int(rng.integers(1, length))
        tokens[row, 0] = 49406
        tokens[row, 1:end] = rng.integers(1, 49000, end - 1)
        tokens[row, end] = 49407
    return tokens


def test_runner_sets_the_shape_and_returns_each_batch() -> None:
    memory = Memory()
    runner = Runner(memory)
    text = TensorRTTextRunner(runner, memory, MAX, E)
    assert len(memory.buffers) == 2  # allocated once, at the profile's maximum
    for seed, (batch, length) in enumerate([(1, 2), (3, 9), (16, 77), (5, 12)]):
        tokens = _tokens(batch, length, seed)
        got = text(tokens)
        assert runner.shape == (batch, length) and got.shape == (batch, E)
        np.testing.assert_allclose(got, reference(tokens), rtol=1e-6)
    assert len(memory.buffers) == 2
    text.close()
    assert runner.closed and memory.closed


@pytest.mark.parametrize("shape", [(17, 10), (2, 78), (2, 1)])
def test_runner_refuses_shapes_outside_the_profile(shape) -> None:
    memory = Memory()
    text = TensorRTTextRunner(Runner(memory), memory, MAX, E)
    with pytest.raises(ValueError, match="profile"):
        text(np.zeros(shape, dtype=np.int64))


HERE = DeviceInfo("10.3.0.30", "8.7", "Orin")


def _record(file: str, role: str | None, precision: str = "fp16") -> dict:
    record = {
        "file": file,
        "tensorrt_version": "10.3.0.30",
        "compute_capability": "8.7",
        "precision": precision,
    }
    if role:
        record["role"] = role
    return record


def test_engine_selection_keeps_roles_apart() -> None:
    engines = [
        _record("image_encoder.trt10.3.0.sm87.fp16.engine", None),
        _record("text_encoder.trt10.3.0.sm87.fp16.engine", TEXT_ROLE),
    ]
    assert [r["file"] for r in engines_of_role(engines, IMAGE_ROLE)] == [engines[0]["file"]]
    image = select_engine(engines, HERE)
    text = select_engine(engines, HERE, role=TEXT_ROLE)
    assert image.engine is engines[0] and not image.refused
    assert text.engine is engines[1] and not text.refused
    assert select_engine(engines[:1], HERE, role=TEXT_ROLE).engine is None


def test_engine_record_names_its_role_for_text_only() -> None:
    pytest.importorskip("onnx")
    from vlm_export.export.tensorrt.build import EngineRecord

    fields = dict(
        file="x.engine", tensorrt_version="10.3", compute_capability="8.7", precision="fp16",
        workspace_mb=1, device_name="d", built_utc="t", sha256="s", nbytes=1,
    )  # fmt: skip
    assert "role" not in EngineRecord(**fields).to_manifest()
    assert EngineRecord(**fields, role=TEXT_ROLE).to_manifest()["role"] == TEXT_ROLE
