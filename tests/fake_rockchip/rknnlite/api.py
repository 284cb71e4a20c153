"""Test double of ``rknnlite.api``: RKNNLite runs the ".rknn" file (an ONNX graph) with ONNX
Runtime behind rknn-toolkit-lite2's API; return codes as Rockchip documents (0 = success)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort


def run_onnx(session: ort.InferenceSession, inputs: list[np.ndarray], data_format: Any) -> list:
    """The graph's outputs, in graph order, float outputs rounded through float16 (the NPU)."""
    names = [item.name for item in session.get_inputs()]
    if len(inputs) != len(names):
        raise ValueError(f"expected {len(names)} inputs, got {len(inputs)}")
    if data_format is not None and len(data_format) != len(inputs):
        raise ValueError("data_format must name a format per input")
    outputs = session.run(None, dict(zip(names, inputs, strict=True)))
    return [
        out.astype(np.float16).astype(np.float32) if out.dtype == np.float32 else out
        for out in outputs
    ]


class RKNNLite:
    NPU_CORE_AUTO = 0
    NPU_CORE_0 = 1
    NPU_CORE_1 = 2
    NPU_CORE_2 = 4
    NPU_CORE_0_1 = 3
    NPU_CORE_0_1_2 = 7
    NPU_CORE_ALL = 0xFFFF
    #: what the tests read back: the last core mask asked for, how many runtimes were released
    last_core_mask: int | None = None
    released = 0
    #: a test sets this to make init_runtime fail (no NPU driver)
    fail_init = False

    def __init__(self, verbose: bool = False, verbose_file: str | None = None) -> None:
        self._session: ort.InferenceSession | None = None

    def load_rknn(self, path: str) -> int:
        try:
            self._session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - the real one returns -1 on any unreadable file
            return -1
        return 0

    def init_runtime(self, core_mask: int = NPU_CORE_AUTO, **_: Any) -> int:
        if self._session is None or type(self).fail_init:
            return -1
        type(self).last_core_mask = core_mask
        return 0

    def inference(self, inputs: list[np.ndarray], data_format: Any = None, **_: Any) -> list:
        if self._session is None:
            raise RuntimeError("inference before load_rknn")
        return run_onnx(self._session, inputs, data_format)

    def release(self) -> None:
        self._session = None
        type(self).released += 1
