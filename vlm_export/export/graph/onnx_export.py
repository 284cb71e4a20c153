"""Trace the image tower to a static ONNX graph and check it with onnx.checker."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import (
    ANCHORS_INPUT,
    ANCHORS_VALID_INPUT,
    CLS_OUTPUT,
    EMBEDDING_OUTPUT,
    FATE_OUTPUT,
    IMAGE_INPUT,
    TEXT_EMBEDDING_OUTPUT,
    TOKENS_INPUT,
)
from vlm_export.models.condensing_tower import CondensingVisionTower
from vlm_export.models.text_tower import TextTower
from vlm_export.models.tracing import plain_attention

SUPPORTED_OPSETS = (16, 17)
ANCHOR_INPUTS = (ANCHORS_INPUT, ANCHORS_VALID_INPUT)
BASE_OUTPUTS = (EMBEDDING_OUTPUT, CLS_OUTPUT)


class OnnxExportError(UserError):
    """The tower could not be traced or the graph failed its checks."""


def io_names(tower: CondensingVisionTower) -> tuple[list[str], list[str]]:
    """Input and output names of the engine of this tower."""
    inputs = [IMAGE_INPUT] + (list(ANCHOR_INPUTS) if tower.condensing else [])
    outputs = list(BASE_OUTPUTS) + ([FATE_OUTPUT] if tower.condensing else [])
    return inputs, outputs


def io_spec(tower: CondensingVisionTower, batch_size: int) -> dict[str, list[dict[str, Any]]]:
    """The manifest's engine inputs/outputs: names, static shapes and dtypes."""
    geometry = tower.geometry
    size, width = geometry["image_size"], geometry["width"]
    inputs = [{"name": IMAGE_INPUT, "shape": [batch_size, 3, size, size], "dtype": "float32"}]
    outputs = [
        {
            "name": EMBEDDING_OUTPUT,
            "shape": [batch_size, geometry["embed_dim"]],
            "dtype": "float32",
        },
        {
            "name": CLS_OUTPUT,
            "shape": [batch_size, geometry["layers"], width],
            "dtype": "float32",
        },
    ]
    if tower.condensing:
        reductions = len(tower.schedule)
        inputs += [
            {
                "name": ANCHORS_INPUT,
                "shape": [tower.num_classes, reductions, width],
                "dtype": "float32",
            },
            {"name": ANCHORS_VALID_INPUT, "shape": [tower.num_classes], "dtype": "float32"},
        ]
        fate_shape = [batch_size, reductions, geometry["num_patches"]]
        outputs.append({"name": FATE_OUTPUT, "shape": fate_shape, "dtype": "int32"})
    return {"inputs": inputs, "outputs": outputs}


def export_onnx(
    tower: CondensingVisionTower, path: str | Path, opset: int = 17, batch_size: int = 1
) -> onnx.ModelProto:
    """Export the tower with static shapes to ``path`` and run ``onnx.checker`` on it.

    Uses torch's TorchScript-based exporter, which writes opsets 16 and 17 natively. (torch 2.13's
    default dynamo exporter starts at opset 18 and cannot convert this graph down to 17.)
    """
    input_names, output_names = io_names(tower)
    return _trace(tower, tower.example_inputs(batch_size), path, opset, input_names, output_names)


def export_text_onnx(
    tower: TextTower, path: str | Path, opset: int = 17, length: int | None = None
) -> onnx.ModelProto:
    """Export the text tower: ``tokens [batch, length]`` int64 -> ``text_embedding [batch, E]``.

    The batch axis is free. The length axis is free too by default (the device feeds each batch
    cut to its longest prompt); ``length`` fixes it (the static variants of the benchmark).
    """
    axes: dict[str, dict[int, str]] = {
        TOKENS_INPUT: {0: "batch", 1: "length"},
        TEXT_EMBEDDING_OUTPUT: {0: "batch"},
    }
    if length is not None:
        del axes[TOKENS_INPUT][1]
    example = tower.example_inputs(2, length or min(16, tower.context_length))
    model = _trace(tower, example, path, opset, [TOKENS_INPUT], [TEXT_EMBEDDING_OUTPUT], axes)
    width = model.graph.output[0].type.tensor_type.shape.dim[1]
    if not width.HasField("dim_value"):  # the tracer leaves the normalised width symbolic
        width.dim_value = tower.embed_dim
        onnx.save(model, str(path))
    return model


def _trace(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: str | Path,
    opset: int,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> onnx.ModelProto:
    if opset not in SUPPORTED_OPSETS:
        raise OnnxExportError(f"opset {opset} is not supported: use 17 (TensorRT >= 8.6) or 16")
    path = Path(path)
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(log), plain_attention():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                example,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types; report one line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise OnnxExportError(f"ONNX export failed: {type(exc).__name__}: {first_line}") from exc
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise OnnxExportError(f"onnx.checker rejected the graph: {exc}") from exc
    return model


def graph_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Node count, opset and operator histogram of an exported graph (for the manifest)."""
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    return {"nodes": len(model.graph.node), "opset": opset, "operators": dict(sorted(ops.items()))}
