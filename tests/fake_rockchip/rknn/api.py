"""Test double of ``rknn.api`` (rknn-toolkit2): RKNN "converts" by copying the ONNX graph and
"simulates" it with ONNX Runtime; return codes as Rockchip documents (0 = success)."""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np
import onnxruntime as ort
from rknnlite.api import run_onnx


class RKNN:
    #: tests set these: a build that fails (with an E line on stdout, as the toolkit's library
    #: writes it), a simulator whose embedding is moved by this much, or one that fails to run
    fail_build = False
    perturb = 0.0
    fail_inference = False

    def __init__(self, verbose: bool = False, verbose_file: str | None = None) -> None:
        self._onnx: str | None = None
        self._session: ort.InferenceSession | None = None

    def config(self, target_platform: str | None = None, **_: Any) -> int:
        self.target = target_platform
        return 0

    def load_onnx(self, model: str, **_: Any) -> int:
        self._onnx = model
        return 0 if os.path.isfile(model) else -1

    def build(self, do_quantization: bool = True, **_: Any) -> int:
        if type(self).fail_build:
            os.write(1, b"E RKNN: [00:00:00.000] fake: op Foo is not supported\n")
            return -1
        return 0

    def export_rknn(self, export_path: str, **_: Any) -> int:
        shutil.copyfile(str(self._onnx), export_path)
        return 0

    def init_runtime(self, target: str | None = None, **_: Any) -> int:
        self._session = ort.InferenceSession(str(self._onnx), providers=["CPUExecutionProvider"])
        return 0

    def inference(self, inputs: list[np.ndarray], data_format: Any = None, **_: Any) -> list:
        if type(self).fail_inference:
            raise RuntimeError("fake: the simulator\n crashed")
        outputs = run_onnx(self._session, inputs, data_format)
        outputs[0] = outputs[0] + np.float32(type(self).perturb)
        return outputs

    def release(self) -> None:
        self._session = None
