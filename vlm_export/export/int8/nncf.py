"""An OpenVINO INT8 IR of the image encoder by NNCF's post-training quantization.

NNCF's transformer preset (``model_type=nncf.ModelType.TRANSFORMER``: SmoothQuant on the
matrix products, fast bias correction, mixed preset: symmetric int8 weights per channel,
asymmetric activations) quantizes every product it finds, the attention products included,
except the nodes of the condensing tower (``CONDENSATION_NODE_PREFIXES``), which are NNCF's
ignored scope: ranking, merging, anchor selection and the reduction blocks' attention scores
stay float. Calibration feeds are the bundle's preprocessing of the user's images (anchors zero
and invalid), as for ONNX Runtime's QDQ graph (``int8.graph``).

``nncf`` and ``openvino`` are imported when a graph is quantized; without them the UserError
names what to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import CONDENSATION_NODE_PREFIXES
from vlm_export.export.int8.calibration import engine_feeds

NNCF_INSTALL_HINT = 'pip install ".[nncf]" (NNCF and OpenVINO; no torch)'
#: SmoothQuant's migration strength for matrix products (NNCF's transformer default)
SMOOTH_QUANT_ALPHA = 0.95


def require_nncf() -> None:
    """UserError, one line saying what to install, when nncf or openvino is missing."""
    missing = [name for name in ("openvino", "nncf") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--method nncf needs {' and '.join(missing)}: {NNCF_INSTALL_HINT}")


def int8_ir_name(onnx_name: str) -> str:
    """``image_encoder.int8.xml`` for ``image_encoder.onnx`` (the weights beside it, ``.bin``)."""
    return f"{Path(onnx_name).stem}.int8.xml"


def ignored_patterns() -> list[str]:
    """NNCF ignored-scope patterns (regular expressions on node names): the condensation."""
    return [f"{re.escape(prefix)}.*" for prefix in CONDENSATION_NODE_PREFIXES]


def settings() -> dict[str, Any]:
    """What the IR's quantization was, as the manifest records it."""
    return {
        "tool": "nncf.quantize (OpenVINO)",
        "format": "OpenVINO IR (FakeQuantize)",
        "model_type": "transformer",
        "preset": "mixed",
        "smooth_quant_alpha_matmul": SMOOTH_QUANT_ALPHA,
        "fast_bias_correction": True,
        "weights": "int8 symmetric per-channel",
        "activations": "int8 asymmetric per-tensor",
        "ignored_scope": ignored_patterns(),
        "float": "condensation, anchor selection, the reduction blocks' attention scores, "
        "softmax, LayerNorm",
    }


def quantize_ir(
    onnx_path: Path,
    out_xml: Path,
    manifest: dict[str, Any],
    images: list[np.ndarray],
    on_image: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Write the NNCF INT8 IR of ``onnx_path`` calibrated on ``images`` to ``out_xml`` (and its
    ``.bin``); the names of the nodes NNCF was told to leave float."""
    require_nncf()
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    model = ov.Core().read_model(str(onnx_path))
    patterns = [re.compile(p) for p in ignored_patterns()]
    ignored = [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if any(p.match(op.get_friendly_name()) for p in patterns)
    ]
    given = [0]

    def feeds(image: np.ndarray) -> dict[str, np.ndarray]:
        given[0] += 1
        if on_image is not None:
            on_image(min(given[0], len(images)), len(images))
        return engine_feeds(manifest, image)

    logging.getLogger("nncf").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF's own progress bars
        quantized = nncf.quantize(
            model,
            nncf.Dataset(images, feeds),
            preset=nncf.QuantizationPreset.MIXED,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(images),
            fast_bias_correction=True,
            ignored_scope=nncf.IgnoredScope(patterns=ignored_patterns(), validate=False),
            advanced_parameters=AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=SMOOTH_QUANT_ALPHA)
            ),
        )
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return ignored
