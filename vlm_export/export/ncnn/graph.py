"""The bundle's ONNX graph rewritten, with the same values, into a form pnnx converts correctly.

pnnx (checked with 20261020) mis-converts three patterns of the image encoder, and ncnn holds no
integer tensors; each rewrite below is exact:

- ``ReduceSum`` over one axis: pnnx's ONNX reader keeps the axis as a scalar and its ncnn pass
  then writes a Reduction with no axes, which reduces nothing. The sum runs over that axis and a
  new size-1 axis after it instead (two axes, the same sum).
- ``ReduceL2``: pnnx fuses it (with the Clip and Div after it) into ncnn's Normalize, which on a
  batch-free 2-D tensor normalises every element by itself (sign(x)). It becomes
  ``Sqrt(ReduceSum(x * x))``.
- a graph output made by ``Cast`` to an integer type (``token_fate``): ncnn computes in float
  only, so the Cast is dropped and the runtime rounds that output (``rounded_outputs``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

INTEGER_TYPES = frozenset(
    {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8}
)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> rank, from ONNX shape inference."""
    inferred = shape_inference.infer_shapes(model)
    graph = inferred.graph
    ranks = {}
    for info in [*graph.value_info, *graph.input, *graph.output]:
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            ranks[info.name] = len(tensor.shape.dim)
    return ranks


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of initializers and Constant nodes, by tensor name."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _reduce_axes(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> list[int] | None:
    """The axes of a Reduce node (attribute or constant input); None when not constant."""
    if len(node.input) > 1 and node.input[1]:
        if node.input[1] not in values:
            return None
        return [int(v) for v in np.asarray(values[node.input[1]]).reshape(-1)]
    axes = _attribute(node, "axes")
    return None if axes is None else [int(v) for v in axes]


class _Builder:
    """New nodes and initializers under unique names."""

    def __init__(self, graph: onnx.GraphProto, prefix: str) -> None:
        self.graph = graph
        self.prefix = prefix
        self.count = 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}{self.count}_{what}"

    def axes(self, values: list[int]) -> str:
        name = self.name("axes")
        self.graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name


def _sum_nodes(
    build: _Builder, source: str, axis: int, keepdims: int, output: str
) -> list[onnx.NodeProto]:
    """``ReduceSum(source, [axis])`` as a sum over [axis, axis + 1] of an unsqueezed copy."""
    extra = build.axes([axis + 1])
    widened, summed = build.name("widened"), build.name("summed")
    nodes = [
        helper.make_node("Unsqueeze", [source, extra], [widened]),
        helper.make_node(
            "ReduceSum",
            [widened, build.axes([axis, axis + 1])],
            [summed if keepdims else output],
            keepdims=keepdims,
        ),
    ]
    if keepdims:
        nodes.append(helper.make_node("Squeeze", [summed, extra], [output]))
    return nodes


def rewrite_sums(model: onnx.ModelProto) -> int:
    """Rewrite every one-axis ReduceSum and every ReduceL2 (see the module doc); the count.

    Needs opset 13 or later (ReduceSum with its axes as an input), as the bundle's graph has.
    """
    graph = model.graph
    ranks, values = _ranks(model), _constant_values(graph)
    build = _Builder(graph, "ncnn_prep_")
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in graph.node:
        axes = _reduce_axes(node, values) if node.op_type in ("ReduceSum", "ReduceL2") else None
        rank = ranks.get(node.input[0]) if node.input else None
        if axes is None or rank is None or len(axes) != 1:
            nodes.append(node)
            continue
        axis = axes[0] % rank
        keepdims = int(_attribute(node, "keepdims", 1))
        if node.op_type == "ReduceSum":
            nodes.extend(_sum_nodes(build, node.input[0], axis, keepdims, node.output[0]))
        else:
            squared, summed = build.name("squared"), build.name("sum_of_squares")
            nodes.append(helper.make_node("Mul", [node.input[0], node.input[0]], [squared]))
            nodes.extend(_sum_nodes(build, squared, axis, keepdims, summed))
            nodes.append(helper.make_node("Sqrt", [summed], [node.output[0]]))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


#: ops an integer output may pass through after its Cast (data input first; the rest are shapes)
_PASS_THROUGH = frozenset({"Concat", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})


def _integer_casts(graph: onnx.GraphProto, output: str) -> list[onnx.NodeProto] | None:
    """The Casts to an integer type that ``output`` comes from through shape-only ops (Concat
    of per-block results included); None when the path holds anything else."""
    producers = {name: node for node in graph.node for name in node.output}
    casts, pending, seen = [], [output], set()
    while pending:
        name = pending.pop()
        node = producers.get(name)
        if node is None or name in seen:
            return None
        seen.add(name)
        if node.op_type == "Cast" and _attribute(node, "to") in INTEGER_TYPES:
            casts.append(node)
        elif node.op_type in _PASS_THROUGH:
            pending.extend(node.input if node.op_type == "Concat" else node.input[:1])
        else:
            return None
    return casts


def drop_integer_output_casts(model: onnx.ModelProto) -> list[str]:
    """Make each integer graph output (Casts to an integer type, then shape-only ops) a float
    output: the Casts become Identity. The names of those outputs, which the runtime rounds."""
    graph = model.graph
    rounded = []
    for output in graph.output:
        if output.type.tensor_type.elem_type not in INTEGER_TYPES:
            continue
        casts = _integer_casts(graph, output.name)
        if not casts:
            continue
        for cast in casts:
            cast.CopyFrom(helper.make_node("Identity", [cast.input[0]], [cast.output[0]]))
        output.type.tensor_type.elem_type = TensorProto.FLOAT
        rounded.append(output.name)
    if rounded:  # the integer types recorded along those paths are stale now
        kept = [
            info
            for info in graph.value_info
            if info.type.tensor_type.elem_type not in INTEGER_TYPES
        ]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return rounded


def prepare_for_pnnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with the rewrites applied, and the outputs the runtime must round."""
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    rounded = drop_integer_output_casts(prepared)
    rewrite_sums(prepared)
    onnx.checker.check_model(prepared)
    return prepared, rounded
