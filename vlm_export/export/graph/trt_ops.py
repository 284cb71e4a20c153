"""Static check that an ONNX graph is one TensorRT can build, under this project's export rules.

Two lists apply. TensorRT's own: the operators its ONNX parser supports. Ours (ARCHITECTURE.md,
"Export constraints"): no data-dependent control flow, no NonZero, no scatter with reduction, no
random operators, constant-k TopK, static shapes except an optional batch axis, and no
LayerNormalization node below opset 17 (opset-16 graphs must carry it decomposed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from vlm_export.core.errors import UserError

if TYPE_CHECKING:
    import onnx

# Operators marked "Y" in onnx-tensorrt docs/operators.md for TensorRT 10.15 (opset 9 to 24).
# Restrictions there that concern our graphs: TopK needs sorted=1 and K < 3840 (the 8.x lists
# require K to be an initializer, which we require anyway); ScatterND supports no reduction other
# than "none" (ScatterElements with a reduction goes through a plugin); LayerNormalization
# supports only its first output; Reduce* take axes as an initializer.
TENSORRT_SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant
    ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear
    Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
    GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
    GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
    Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
    ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan
    Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
    Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter
    ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()  # noqa: SIM905 (a word list reads like the table it was copied from)
)
# Opsets every TensorRT 10.x parser reads (10.0 documents opset 9 to 20).
TENSORRT_OPSET_RANGE = (9, 20)
TOPK_MAX_K = 3840

# What ARCHITECTURE.md forbids in our graphs, whatever TensorRT supports.
CONTROL_FLOW_OPS = frozenset({"Loop", "If", "Scan"})
RANDOM_OPS = frozenset(
    {
        "RandomUniform",
        "RandomNormal",
        "RandomUniformLike",
        "RandomNormalLike",
        "Multinomial",
        "Bernoulli",
    }
)
SCATTER_OPS = frozenset({"ScatterND", "ScatterElements"})
LAYERNORM_MIN_OPSET = 17
NUMERIC_CONSTANT_ATTRIBUTES = ("value_int", "value_ints", "value_float", "value_floats")


class TensorRTCompatibilityError(UserError):
    """The ONNX graph breaks a TensorRT or export rule; the message lists every problem."""


class OnnxMissingError(UserError):
    """The ``onnx`` package is not installed (``vlm-export build-engine`` reads the graph)."""


ONNX_MISSING_MESSAGE = "onnx is not installed: pip install onnx (needed to read the bundle's graph)"


def import_onnx() -> ModuleType:
    """The ``onnx`` module, imported on first use; OnnxMissingError (one line) without it.

    Imported lazily so that ``vlm-export --help`` and the build-engine command load on a device
    without onnx; only the functions that read a graph need it.
    """
    try:
        import onnx
    except ImportError as exc:
        if (getattr(exc, "name", None) or "onnx").split(".")[0] != "onnx":
            raise OnnxMissingError(f"onnx cannot be imported ({exc})") from None
        raise OnnxMissingError(ONNX_MISSING_MESSAGE) from None
    return onnx


@dataclass
class OpReport:
    """What the check found: operator counts, problems (errors) and remarks (notes)."""

    opset: int
    op_counts: Counter = field(default_factory=Counter)
    unsupported: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def op_types(self) -> list[str]:
        """Every operator type in the graph and its subgraphs, sorted."""
        return sorted(self.op_counts)

    def summary(self) -> str:
        """A few lines for the export log: verdict, operator counts, errors and notes."""
        verdict = "TensorRT-compatible" if self.ok else f"{len(self.errors)} problem(s)"
        ops = ", ".join(f"{op} x{count}" for op, count in sorted(self.op_counts.items()))
        lines = [f"ONNX opset {self.opset}, {sum(self.op_counts.values())} nodes: {verdict}"]
        lines.append(f"  operators: {ops}")
        lines += [f"  error: {error}" for error in self.errors]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _graph_nodes(
    graph: onnx.GraphProto, where: str = "graph"
) -> Iterator[tuple[onnx.NodeProto, str]]:
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies), with its location."""
    onnx = import_onnx()
    for node in graph.node:
        yield node, where
        for attribute in node.attribute:
            inner = f"{where} > {node.op_type} {node.name or '(unnamed)'}.{attribute.name}"
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graph_nodes(attribute.g, inner)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _graph_nodes(sub, inner)


def _attribute(node: onnx.NodeProto, name: str, default=None):
    onnx = import_onnx()
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _constant_values(model: onnx.ModelProto) -> dict[str, object]:
    """Build-time constants: initializers and Constant ``value`` tensors (TensorProto), numeric
    Constant attributes (array); None for Constants TensorRT rejects (sparse, strings)."""
    onnx = import_onnx()
    constants: dict[str, object] = {init.name: init for init in model.graph.initializer}
    for node, _ in _graph_nodes(model.graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        value = None
        for attribute in node.attribute:
            if attribute.name == "value":
                value = attribute.t
            elif attribute.name in NUMERIC_CONSTANT_ATTRIBUTES:
                value = np.asarray(onnx.helper.get_attribute_value(attribute))
        for output in node.output:
            constants[output] = value
    return constants


def _label(node: onnx.NodeProto, where: str) -> str:
    name = f" {node.name!r}" if node.name else ""
    place = "" if where == "graph" else f" (in {where})"
    return f"{node.op_type}{name}{place}"


def _node_problems(node: onnx.NodeProto, where: str, opset: int, constants: dict) -> Iterator[str]:
    """Our export rules, node by node."""
    op, label = node.op_type, _label(node, where)
    if op == "NonZero":
        yield f"{label}: NonZero has a data-dependent output shape (no boolean indexing)"
    elif op in CONTROL_FLOW_OPS:
        yield f"{label}: data-dependent control flow ({op}) is not allowed; unroll it at export"
    elif op in RANDOM_OPS:
        yield f"{label}: random operator {op} makes the engine non-deterministic"
    elif op in SCATTER_OPS:
        reduction = _attribute(node, "reduction", b"none")
        reduction = reduction.decode() if isinstance(reduction, bytes) else str(reduction)
        if reduction != "none":
            yield f"{label}: {op} with reduction={reduction!r} is not allowed (use one-hot matmuls)"
    elif op == "LayerNormalization" and opset < LAYERNORM_MIN_OPSET:
        yield (
            f"{label}: LayerNormalization does not exist at opset {opset} (needs "
            f"{LAYERNORM_MIN_OPSET}); an opset-16 graph must carry LayerNorm decomposed"
        )
    elif op == "TopK":
        yield from _topk_problems(node, label, constants)


def _values(constant: object) -> list:
    """The values of a constant as a flat list ([] for an initializer stored outside the file)."""
    onnx = import_onnx()
    if isinstance(constant, onnx.TensorProto):
        if constant.data_location == onnx.TensorProto.EXTERNAL:
            return []
        constant = onnx.numpy_helper.to_array(constant)
    return np.asarray(constant).reshape(-1).tolist()


def _topk_problems(node: onnx.NodeProto, label: str, constants: dict) -> Iterator[str]:
    if _attribute(node, "sorted", 1) != 1:
        yield f"{label}: TopK with sorted=0 is not supported by TensorRT"
    k_name = node.input[1] if len(node.input) > 1 else ""
    if not k_name:  # opset < 10: k is an attribute, always constant
        k_values = [_attribute(node, "k", 0)]
    elif k_name not in constants:
        yield f"{label}: TopK's k ({k_name!r}) is computed in the graph; it must be a constant"
        return
    elif constants[k_name] is None:
        yield f"{label}: TopK's k ({k_name!r}) is a Constant TensorRT cannot read"
        return
    else:
        k_values = _values(constants[k_name])
    if any(int(k) >= TOPK_MAX_K for k in k_values):
        yield f"{label}: TopK k={k_values} is beyond TensorRT's limit of {TOPK_MAX_K - 1}"


def _shape_problems(
    model: onnx.ModelProto, free_axes: Mapping[str, Collection[int]]
) -> tuple[list[str], list[str]]:
    """Dynamic dimensions of graph inputs and outputs: errors, and notes for a batch axis (or an
    axis that ``free_axes`` allows for that tensor, such as the text engine's token length)."""
    errors, notes = [], []
    initializers = {init.name for init in model.graph.initializer}
    values = [("input", v) for v in model.graph.input if v.name not in initializers]
    values += [("output", v) for v in model.graph.output]
    for kind, value in values:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            errors.append(f"{kind} {value.name!r} has no shape (static shapes are required)")
            continue
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            symbol = dim.dim_param or "?"
            if axis in free_axes.get(value.name, ()):
                notes.append(
                    f"{kind} {value.name!r} has a dynamic axis {axis} ({symbol!r}); the engine "
                    "build needs an optimisation profile for it"
                )
            elif axis == 0:
                notes.append(
                    f"{kind} {value.name!r} has a dynamic batch axis ({symbol!r}); the engine "
                    "build needs an optimisation profile for it"
                )
            else:
                errors.append(
                    f"{kind} {value.name!r} has a dynamic dimension {symbol!r} on axis {axis}; "
                    "only the batch axis may be dynamic"
                )
    return errors, notes


def _load(model_or_path: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    onnx = import_onnx()
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    path = Path(model_or_path)
    if not path.is_file():
        raise UserError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a corrupt file
        raise UserError(f"{path} is not a readable ONNX model ({exc})") from None


def model_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise UserError("the ONNX model imports no default-domain opset")


def check_onnx_for_tensorrt(
    model_or_path: onnx.ModelProto | str | Path,
    opset: int | None = None,
    free_axes: Mapping[str, Collection[int]] | None = None,
) -> OpReport:
    """Check a model (or ONNX file) against TensorRT's operators and our export rules.

    ``opset`` is the opset the exporter was asked for; a model of another opset is an error
    (an opset-16 export that came out at 18 would not parse on TensorRT 8.5). Weights are not
    loaded. Never raises for a problem in the graph: see ``OpReport.errors``. Only batch axes
    may be dynamic, and the axes ``free_axes`` names per tensor (built with a profile).
    """
    model = _load(model_or_path)
    actual = model_opset(model)
    report = OpReport(opset=actual)
    if opset is not None and actual != opset:
        report.errors.append(f"the model has opset {actual}, but opset {opset} was asked for")
    low, high = TENSORRT_OPSET_RANGE
    if not low <= actual <= high:
        report.errors.append(
            f"opset {actual} is outside what every TensorRT 10 reads ({low}-{high})"
        )
    local_functions = {(fn.domain, fn.name) for fn in model.functions}
    nodes = list(_graph_nodes(model.graph))
    for function in model.functions:
        nodes += [(node, f"function {function.name}") for node in function.node]
    constants = _constant_values(model)
    unsupported = set()
    for node, where in nodes:
        if (node.domain, node.op_type) in local_functions:
            continue
        report.op_counts[node.op_type] += 1
        if node.domain not in ("", "ai.onnx"):
            unsupported.add(f"{node.domain}.{node.op_type}")
        elif node.op_type not in TENSORRT_SUPPORTED_OPS:
            unsupported.add(node.op_type)
        report.errors.extend(_node_problems(node, where, actual, constants))
    report.unsupported = sorted(unsupported)
    if unsupported:
        report.errors.insert(
            0, f"operators TensorRT's ONNX parser does not support: {', '.join(report.unsupported)}"
        )
    shape_errors, shape_notes = _shape_problems(model, free_axes or {})
    report.errors += shape_errors
    report.notes += shape_notes
    return report


def assert_tensorrt_compatible(
    model_or_path: onnx.ModelProto | str | Path,
    opset: int | None = None,
    free_axes: Mapping[str, Collection[int]] | None = None,
) -> OpReport:
    """``check_onnx_for_tensorrt``, raising TensorRTCompatibilityError listing every problem."""
    report = check_onnx_for_tensorrt(model_or_path, opset, free_axes)
    if not report.ok:
        shown = report.errors[:10]
        more = f"; and {len(report.errors) - 10} more" if len(report.errors) > 10 else ""
        raise TensorRTCompatibilityError(
            "the ONNX graph cannot become a TensorRT engine: " + "; ".join(shown) + more
        )
    return report
