"""Which products of the image encoder become int8, and the QDQ graph ONNX Runtime writes for them.

Only products with weights (MatMul, Gemm, Conv) within the chosen scope are quantized (default:
the MLPs; see SCOPES), and none under the condensing tower's CONDENSATION_NODE_PREFIXES.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import CONDENSATION_NODE_PREFIXES
from vlm_export.export.int8.calibration import calibration_reader

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
PASS_THROUGH_OPS = frozenset({"Transpose", "Identity", "Reshape", "Cast"})
#: which products are quantized: the MLPs (two thirds of a ViT's matrix FLOPs, and the least
#: sensitive), every transformer-block weight product (adds the attention projections, which also
#: feed the token ranking), attention (also the blocks' two attention products of activations,
#: scores and scores times values; softmax still reads float), or all weight products (adds the
#: patch embedding and the final projection; no attention products)
SCOPES = ("mlp", "blocks", "attention", "all")
DEFAULT_SCOPE = "mlp"
SCOPE_MARKERS = {
    "mlp": ("/mlp/",),
    "blocks": ("/mlp/", "/attn/", "/out_proj"),
    "attention": ("/mlp/", "/attn/", "/out_proj"),
}
#: the scope that also quantizes products of two activations, and where they are
ACTIVATION_PRODUCT_SCOPES = {"attention": "/attn/MatMul"}


def int8_file_name(onnx_name: str) -> str:
    """``image_encoder.int8.onnx`` for ``image_encoder.onnx``."""
    return f"{Path(onnx_name).stem}.int8.onnx"


def _reads_weights(node: Any, initializers: set[str], producers: dict[str, Any]) -> bool:
    """True when the node's second input is a weight: an initializer, perhaps transposed."""
    if len(node.input) < 2:
        return False
    name = node.input[1]
    for _ in range(3):
        if name in initializers:
            return True
        source = producers.get(name)
        if source is None or source.op_type not in PASS_THROUGH_OPS or not source.input:
            return False
        name = source.input[0]
    return False


def in_scope(name: str, scope: str) -> bool:
    """True when the node ``name`` (a product with weights) belongs to the quantization scope."""
    if scope == "all":
        return True
    markers = SCOPE_MARKERS[scope]
    return any(marker in name for marker in markers)


def _activation_product(node: Any, scope: str) -> bool:
    """True when ``node`` is a block's attention product of two activations that ``scope``
    quantizes (scores, scores times values)."""
    marker = ACTIVATION_PRODUCT_SCOPES.get(scope)
    return marker is not None and node.op_type == "MatMul" and marker in node.name


def quantized_node_names(onnx_path: Path, scope: str = DEFAULT_SCOPE) -> list[str]:
    """The nodes to quantize: products with weights (MatMul, Gemm, Conv) outside the condensation,
    within ``scope`` (see SCOPES), and with scope ``attention`` the blocks' attention products.

    Otherwise products of two activations (attention scores, attention times values) stay float;
    the softmax always reads float scores, and everything under the condensation's name prefixes
    stays float.
    None in scope is a UserError: ONNX Runtime reads an empty list as "quantize every node".
    """
    if scope not in SCOPES:
        raise UserError(f"unknown quantization scope {scope!r} (choose from {', '.join(SCOPES)})")
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except (DecodeError, OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or "truncated or corrupt"
        raise UserError(f"{onnx_path} is not a readable ONNX model ({reason})") from None
    initializers = {tensor.name for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    names = [
        node.name
        for node in graph.node
        if node.op_type in QUANTIZED_OPS
        and not node.name.startswith(CONDENSATION_NODE_PREFIXES)
        and (
            (_reads_weights(node, initializers, producers) and in_scope(node.name, scope))
            or _activation_product(node, scope)
        )
    ]
    if not names:
        hint = "" if scope == SCOPES[-1] else f" (try --scope {SCOPES[-1]})"
        raise UserError(f"{onnx_path.name} has no weight products in scope {scope!r}{hint}")
    return names


def _extra_options(scope: str) -> dict[str, Any]:
    """ONNX Runtime's extra options: ranges merged after every image (one image's intermediate
    tensors in memory at a time); with the attention products quantized, products' outputs stay
    float, so that the softmax reads float scores."""
    options: dict[str, Any] = {"CalibStridedMinMax": 1}
    if scope in ACTIVATION_PRODUCT_SCOPES:
        options["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    return options


def quantize_graph(
    onnx_path: Path,
    out_path: Path,
    manifest: dict[str, Any],
    images: list[np.ndarray],
    scope: str = DEFAULT_SCOPE,
    on_image: Callable[[int, int], None] | None = None,
) -> None:
    """Write the QDQ INT8 graph of ``onnx_path`` calibrated on ``images`` to ``out_path``
    (``on_image(done, total)`` as calibration goes)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime's advice on pre-processing, as root warnings
    try:
        quantize_static(
            str(onnx_path),
            str(out_path),
            calibration_reader(manifest, images, on_image),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=quantized_node_names(onnx_path, scope),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options=_extra_options(scope),
        )
    finally:
        root.setLevel(level)
