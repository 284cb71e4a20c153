"""Fold data-movement ops on weights (Split, Transpose, Identity of initializers) into initializers.

The condensing blocks split the attention's packed q/k/v weight and transpose each part before
its MatMul. A runtime folds that chain when it loads the graph, into weights of its own: when
several ladder rungs share their weights, each session would then hold its own folded copies (and
pack them again). Folded at export, the parts are plain initializers that the ladder's weights
file stores once and every rung shares. Split, Transpose and Identity only move data, so the
folded graph computes exactly what the original did.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import GraphProto, numpy_helper

FOLDABLE_OPS = ("Split", "Transpose", "Identity")


def _attributes(node: Any) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _fold(node: Any, inputs: list[np.ndarray | None]) -> list[np.ndarray] | None:
    """The outputs of ``node`` on constant ``inputs``, or None when it is not folded here."""
    attributes = _attributes(node)
    if node.op_type == "Identity":
        return [inputs[0]]  # type: ignore[list-item]
    if node.op_type == "Transpose":
        return [np.ascontiguousarray(np.transpose(inputs[0], attributes.get("perm")))]
    data = inputs[0]
    assert data is not None
    axis = int(attributes.get("axis", 0))
    sizes = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attributes.get("split")
    if sizes is None:
        parts = int(attributes.get("num_outputs", len(node.output)))
        if data.shape[axis] % parts:
            return None
        sizes = [data.shape[axis] // parts] * parts
    bounds = np.cumsum([0, *[int(v) for v in sizes]])
    if len(bounds) - 1 != len(node.output) or bounds[-1] != data.shape[axis]:
        return None
    return [
        np.ascontiguousarray(np.take(data, np.arange(start, end), axis=axis))
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def fold_weight_transforms(graph: GraphProto) -> int:
    """Replace every Split/Transpose/Identity whose inputs are all constants (initializers, or
    outputs of Constant nodes or of folded nodes) by initializers; drop what is left unused.

    Returns the number of nodes folded. Initializers must hold their data (not external).
    """
    constants: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            constants[tensor.name] = numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    outputs = {value.name for value in graph.output}
    folded: list[Any] = []
    for node in graph.node:
        if node.op_type not in FOLDABLE_OPS or any(name in outputs for name in node.output):
            continue
        if not node.input or any(name and name not in constants for name in node.input):
            continue
        results = _fold(node, [constants[name] if name else None for name in node.input])
        if results is None:
            continue
        constants.update(zip(node.output, results, strict=True))
        folded.append(node)
    if not folded:
        return 0
    for node in folded:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | outputs
    made = {name for node in folded for name in node.output if name in used}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(constants[name], name) for name in made)
    unused = [
        node
        for node in graph.node
        if node.op_type == "Constant" and not any(name in used for name in node.output)
    ]
    for node in unused:
        graph.node.remove(node)
    return len(folded)
