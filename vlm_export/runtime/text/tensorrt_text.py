"""The text engine on TensorRT: one engine with a [batch, length] profile, buffers at its maximum.

Device buffers for ``tokens`` and ``text_embedding`` are allocated once at the profile's maximum
(``text_encoder.profile.tokens.max`` in the manifest); each call sets the input shape to the batch
it runs ([b, t] within the profile), copies the tokens in and the b output rows out. Batches
larger than the profile's maximum are split by the caller (``max_batch``).

Runs through the same ``EngineRunner`` / ``DeviceMemory`` parts as the image backend, so tests
drive it with fakes; ``open_text_engine`` picks the manifest's text engine for this GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.errors import BundleError
from vlm_export.core.manifest import TEXT_EMBEDDING_OUTPUT, TOKENS_INPUT
from vlm_export.runtime.engines.backends.tensorrt_backend import (
    DeviceMemory,
    EngineRunner,
    open_on_gpu,
)
from vlm_export.runtime.engines.select import (
    TEXT_ROLE,
    no_engine_error,
    query_device,
    select_engine,
)


class TensorRTTextRunner:
    """tokens [b, t] int64 -> text embeddings [b, E] float32 on a TensorRT text engine."""

    def __init__(
        self,
        runner: EngineRunner,
        memory: DeviceMemory,
        max_shape: tuple[int, int],
        embed_dim: int,
        description: str = "tensorrt",
    ) -> None:
        self.runner, self.memory = runner, memory
        self.description = description
        self.max_batch, self.max_length = int(max_shape[0]), int(max_shape[1])
        self.embed_dim = int(embed_dim)
        names = {tensor.name for tensor in runner.io_tensors()}
        if names != {TOKENS_INPUT, TEXT_EMBEDDING_OUTPUT}:
            raise BundleError(
                f"text engine tensors {sorted(names)} differ from "
                f"{[TEXT_EMBEDDING_OUTPUT, TOKENS_INPUT]}: built from another ONNX model"
            )
        self._tokens = memory.allocate(self.max_batch * self.max_length * 8)
        self._output = memory.allocate(self.max_batch * self.embed_dim * 4)
        runner.set_tensor_address(TOKENS_INPUT, self._tokens)
        runner.set_tensor_address(TEXT_EMBEDDING_OUTPUT, self._output)
        self._host = memory.host_buffer((self.max_batch, self.embed_dim), np.dtype(np.float32))

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        batch, length = tokens.shape
        if not (1 <= batch <= self.max_batch and 2 <= length <= self.max_length):
            raise ValueError(
                f"tokens {list(tokens.shape)} are outside the engine's profile "
                f"[1..{self.max_batch}, 2..{self.max_length}]"
            )
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        self.runner.set_input_shape(TOKENS_INPUT, (batch, length))
        self.memory.copy_to_device(self._tokens, tokens)
        self.runner.execute(self.memory.stream)
        rows = self._host[:batch]
        self.memory.copy_to_host(rows, self._output)
        self.memory.synchronize()
        return rows.copy()

    def close(self) -> None:
        """Free the engine, then the buffers and the stream."""
        self.runner.close()
        self.memory.close()


def open_text_engine(
    folder: Path, manifest: dict[str, Any], engine_file: str | Path | None = None
) -> TensorRTTextRunner:
    """The manifest's text engine for this GPU (or ``engine_file``), on TensorRT and CUDA."""
    section = manifest["text_encoder"]
    if engine_file is None:
        device = query_device()
        choice = select_engine(manifest.get("engines") or [], device, role=TEXT_ROLE)
        if choice.engine is None:
            raise no_engine_error(choice, device)
        engine_file = folder / choice.engine["file"]
    path = Path(engine_file)
    if not path.is_file():
        raise BundleError(f"text engine file missing: {path.name}")
    runner, memory = open_on_gpu(path)
    try:
        max_shape = tuple(section["profile"][TOKENS_INPUT]["max"])
        embed_dim = int(section["outputs"][0]["shape"][1])
        return TensorRTTextRunner(runner, memory, max_shape, embed_dim, f"tensorrt:{path.name}")
    except BaseException:
        memory.close()
        raise
