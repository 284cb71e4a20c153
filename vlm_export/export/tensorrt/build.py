"""Build a TensorRT engine from the bundle's ONNX with TensorRT 10's Python builder.

fp16 engines keep LayerNorm and softmax in fp32 (ViT LayerNorm overflows in fp16): those layers,
and the ReduceMean/Pow/Sqrt/square layers a decomposed opset-16 LayerNorm is made of, get
``layer.precision`` and output types fp32 under OBEY_PRECISION_CONSTRAINTS. Engine files are named
after what they only run on: ``image_encoder.trt10.3.0.sm87.fp16.engine``. ``trtexec_command``
gives the same build as a trtexec line; an engine built that way joins the bundle through
``vlm-export build-engine BUNDLE --register FILE`` (which names, checks and records it).
No torch here: ``vlm-export build-engine`` can run on the device itself.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from vlm_export.core.atomic import atomic_file, atomic_write_bytes
from vlm_export.core.errors import UserError
from vlm_export.core.manifest import CONDENSATION_NODE_PREFIXES, file_record
from vlm_export.export.graph.trt_ops import assert_tensorrt_compatible, import_onnx
from vlm_export.runtime.engines.select import (
    IMAGE_ROLE,
    PRECISIONS,
    import_tensorrt,
    normalize_compute_capability,
    query_device,
)

if TYPE_CHECKING:
    import onnx

DEFAULT_WORKSPACE_MB = 1024
DEFAULT_FP32_LAYER_TYPES = ("LayerNorm", "Softmax", "Condensation")
SQUARE = "SQUARE"  # an elementwise product of a tensor with itself (x * x)

# Per group: the ONNX operators whose nodes trtexec names, and the TensorRT layers
# (LayerType name, operation name or None for any) the Python builder pins to fp32.
FP32_GROUPS: dict[str, dict[str, tuple]] = {
    "LayerNorm": {
        "onnx": ("LayerNormalization", "ReduceMean", "Pow", "Sqrt", SQUARE),
        "tensorrt": (
            ("NORMALIZATION", None),
            ("REDUCE", "AVG"),
            ("ELEMENTWISE", "POW"),
            ("ELEMENTWISE", SQUARE),
            ("UNARY", "SQRT"),
        ),
    },
    "Softmax": {"onnx": ("Softmax",), "tensorrt": (("SOFTMAX", None),)},
    # Everything the condensing tower computes to rank, merge and pick anchors, by name prefix
    # (the modules TokenCondenser, AnchorSelector and AnchoredScores, each reduction block's call
    # numbered _1, _2, ...): consensus rank sums reach ~4.6e5, distances are sums of squares and
    # near-tied attention scores must keep their order: beyond fp16's range or precision.
    "Condensation": {
        "onnx": (),
        "tensorrt": (),
        "prefixes": CONDENSATION_NODE_PREFIXES,
    },
}
# Nodes under those prefixes that move or shape data without arithmetic: left to TensorRT.
STRUCTURAL_OPS = frozenset(
    {
        "Constant",
        "ConstantOfShape",
        "Shape",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Identity",
        "Expand",
        "Slice",
        "Concat",
        "Range",
    }
)
# TensorRT's Python API returns plain ILayer objects; the subclass exposes ``op``.
LAYER_CLASSES = {
    "ELEMENTWISE": "IElementWiseLayer",
    "UNARY": "IUnaryLayer",
    "REDUCE": "IReduceLayer",
    "NORMALIZATION": "INormalizationLayer",
}

log = logging.getLogger(__name__)


class EngineBuildError(UserError):
    """TensorRT could not parse the ONNX graph or build the engine."""


ORIGIN_BUILT = "built"  # by build_engine (vlm-export --tensorrt, vlm-export build-engine)
ORIGIN_REGISTERED = "registered"  # built elsewhere (trtexec), added by build-engine --register


@dataclass(frozen=True)
class EngineRecord:
    """One engine of a bundle: what the manifest's ``engines`` list records about it.

    ``workspace_mb`` is None for a registered engine (its build options are not known);
    ``parity`` is the comparison with ONNX Runtime CPU (``runtime.engine_parity``), once run.
    """

    file: str
    tensorrt_version: str
    compute_capability: str
    precision: str
    workspace_mb: int | None
    device_name: str
    built_utc: str
    sha256: str
    nbytes: int
    origin: str = ORIGIN_BUILT
    parity: dict[str, Any] | None = None
    role: str = IMAGE_ROLE
    #: the ladder rung whose graph it was built from (0: the bundle's engine graph)
    rung: int = 0

    def to_manifest(self) -> dict[str, Any]:
        """The manifest entry (keys as in ``manifest.py``; ``parity`` once it was run)."""
        entry = {
            "file": self.file,
            "tensorrt_version": self.tensorrt_version,
            "compute_capability": self.compute_capability,
            "precision": self.precision,
            "workspace_mb": self.workspace_mb,
            "device_name": self.device_name,
            "built_utc": self.built_utc,
            "sha256": self.sha256,
            "bytes": self.nbytes,
            "origin": self.origin,
        }
        if self.parity is not None:
            entry["parity"] = self.parity
        if self.role != IMAGE_ROLE:
            entry["role"] = self.role
        if self.rung:
            entry["rung"] = self.rung
        return entry


def engine_file_name(
    stem: str, tensorrt_version: str, compute_capability: Any, precision: str
) -> str:
    """``image_encoder.trt10.3.0.sm87.fp16.engine`` (TensorRT major.minor.patch, GPU, precision)."""
    release = ".".join(str(tensorrt_version).split(".")[:3])
    sm = normalize_compute_capability(compute_capability).replace(".", "")
    return f"{stem}.trt{release}.sm{sm}.{precision}.engine"


def check_build_options(precision: str, workspace_mb: int, fp32_layer_types: Iterable[str]) -> None:
    """Raise UserError for an unknown precision, a non-positive workspace or an unknown group."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if int(workspace_mb) <= 0:
        raise UserError(f"--workspace must be a positive number of MB, got {workspace_mb}")
    unknown = sorted(set(fp32_layer_types) - set(FP32_GROUPS))
    if unknown:
        raise UserError(
            f"unknown fp32 layer group(s) {', '.join(unknown)}; known: {', '.join(FP32_GROUPS)}"
        )


def _onnx_matches(node: onnx.NodeProto, op_types: Sequence[str]) -> bool:
    if node.op_type in op_types:
        return True
    squares = SQUARE in op_types and node.op_type == "Mul" and len(node.input) == 2
    return squares and node.input[0] == node.input[1]


def fp32_node_names(
    model_or_path: onnx.ModelProto | str | Path,
    fp32_layer_types: Iterable[str] = DEFAULT_FP32_LAYER_TYPES,
) -> list[str]:
    """Names of the top-level ONNX nodes to keep in fp32 (TensorRT names layers after them)."""
    onnx = import_onnx()
    model = model_or_path
    if not isinstance(model, onnx.ModelProto):
        path = Path(model_or_path)
        if not path.is_file():
            raise UserError(f"ONNX file not found: {path}")
        model = onnx.load(str(path), load_external_data=False)
    groups = list(fp32_layer_types)
    op_types = [op for group in groups for op in FP32_GROUPS[group]["onnx"]]
    prefixes = fp32_name_prefixes(groups)
    return [
        node.name
        for node in model.graph.node
        if node.name
        and (
            _onnx_matches(node, op_types)
            or (node.name.startswith(prefixes) and node.op_type not in STRUCTURAL_OPS)
        )
    ]


def fp32_name_prefixes(fp32_layer_types: Iterable[str]) -> tuple[str, ...]:
    """Node/layer name prefixes kept in fp32 by the chosen groups."""
    return tuple(p for group in fp32_layer_types for p in FP32_GROUPS[group].get("prefixes", ()))


def trtexec_command(
    onnx_path: str | Path,
    engine_name: str,
    precision: str = "fp16",
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    fp32_layer_types: Iterable[str] = DEFAULT_FP32_LAYER_TYPES,
    fp32_layers: Sequence[str] | None = None,
) -> str:
    """The trtexec line equivalent to ``build_engine`` (TensorRT 10 trtexec options).

    For fp16 the fp32 layers are named one by one (``--layerPrecisions``/``--layerOutputTypes``
    take layer names; the ONNX parser names layers after ONNX nodes); ``fp32_layers`` overrides
    the names read from the ONNX file.
    """
    check_build_options(precision, workspace_mb, fp32_layer_types)
    parts = [
        "trtexec",
        shlex.quote(f"--onnx={onnx_path}"),
        shlex.quote(f"--saveEngine={engine_name}"),
        f"--memPoolSize=workspace:{int(workspace_mb)}M",
    ]
    if precision == "fp32":
        parts.append("--noTF32")
        return " ".join(parts)
    if fp32_layers is None:
        fp32_layers = fp32_node_names(onnx_path, fp32_layer_types)
    parts.append("--fp16")
    usable = [name for name in fp32_layers if not set(name) & set(",:")]
    if usable:
        spec = ",".join(f"{name}:fp32" for name in usable)
        parts += [
            "--precisionConstraints=obey",
            shlex.quote(f"--layerPrecisions={spec}"),
            shlex.quote(f"--layerOutputTypes={spec}"),
        ]
    return " ".join(parts)


def fp32_layer_rules(fp32_layer_types: Iterable[str]) -> tuple[tuple[str, str | None], ...]:
    """The (LayerType name, operation name or None) pairs of the chosen groups."""
    return tuple(rule for group in fp32_layer_types for rule in FP32_GROUPS[group]["tensorrt"])


def _layer_operation(layer: Any, trt: ModuleType) -> str | None:
    """The operation name of an elementwise/unary/reduce layer (SQUARE for x * x), else None."""
    class_name = LAYER_CLASSES.get(layer.type.name)
    if class_name is None or class_name == "INormalizationLayer":
        return None
    layer.__class__ = getattr(trt, class_name)
    operation = layer.op.name
    same_inputs = layer.num_inputs == 2 and layer.get_input(0).name == layer.get_input(1).name
    return SQUARE if operation == "PROD" and same_inputs else operation


def mark_fp32_layers(network: Any, trt: ModuleType, fp32_layer_types: Iterable[str]) -> list[str]:
    """Pin the matching layers to fp32 compute and fp32 outputs; return their names."""
    groups = list(fp32_layer_types)
    rules = fp32_layer_rules(groups)
    prefixes = fp32_name_prefixes(groups)
    kinds = {kind for kind, _ in rules}
    floats = (trt.float32, trt.float16)
    marked = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        kind = layer.type.name
        if prefixes and layer.name.startswith(prefixes):
            outputs = [layer.get_output(i).dtype for i in range(layer.num_outputs)]
            pinned = any(dtype in floats for dtype in outputs)
        else:
            pinned = kind in kinds and any(
                kind == k and op in (None, _layer_operation(layer, trt)) for k, op in rules
            )
        if not pinned:
            continue
        layer.precision = trt.float32
        for output in range(layer.num_outputs):
            if layer.get_output(output).dtype in floats:
                layer.set_output_type(output, trt.float32)
        if kind == "NORMALIZATION":
            layer.__class__ = trt.INormalizationLayer
            layer.compute_precision = trt.float32
        marked.append(layer.name)
    return marked


def _parse_onnx(trt: ModuleType, network: Any, logger: Any, onnx_path: Path) -> Any:
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return parser
    problems = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        try:
            where = f"{error.node_operator()} node {error.node_name()!r}: "
        except AttributeError:  # parsers before 10.x have no node names
            where = ""
        problems.append(f"{where}{error.desc()}")
    shown = "; ".join(problems[:3]) or "no error recorded"
    raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}: {shown}")


def _add_batch_profile(builder: Any, network: Any, config: Any, batch: int) -> None:
    """An optimisation profile for inputs with a dynamic batch axis (1..batch, tuned for batch)."""
    profile = None
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = list(tensor.shape)
        if all(dim >= 0 for dim in shape):
            continue
        if any(dim < 0 for dim in shape[1:]):
            raise EngineBuildError(f"input {tensor.name!r} has dynamic axes besides the batch axis")
        if profile is None:
            profile = builder.create_optimization_profile()
        profile.set_shape(tensor.name, [1, *shape[1:]], [batch, *shape[1:]], [batch, *shape[1:]])
    if profile is not None:
        config.add_optimization_profile(profile)


def _add_profiles(builder: Any, config: Any, profiles: dict[str, dict[str, Sequence[int]]]) -> None:
    """One optimisation profile with the given min/opt/max shape per input (the text engine)."""
    profile = builder.create_optimization_profile()
    for name, shapes in profiles.items():
        profile.set_shape(name, list(shapes["min"]), list(shapes["opt"]), list(shapes["max"]))
    config.add_optimization_profile(profile)


def _timing_cache(config: Any, path: Path | None) -> Any:
    """Load the timing cache file (or start an empty cache) into ``config``; return the cache.

    TensorRT needs the cache object alive until the build is done: the caller keeps it.
    """
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    log.warning("timing cache %s was made on another device or TensorRT; starting anew", path)
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _set_precision(
    trt: ModuleType, config: Any, network: Any, precision: str, groups: Sequence[str]
) -> None:
    """fp32: no TF32. fp16: FP16 with obeyed per-layer fp32 constraints for ``groups``."""
    if precision == "fp32":
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        return
    if not hasattr(trt.BuilderFlag, "FP16"):
        raise EngineBuildError(
            f"TensorRT {trt.__version__} builds strongly typed networks only (weakly typed fp16 "
            "was removed in TensorRT 11), so an fp16 engine needs an fp16 ONNX graph; build "
            "with --precision fp32, or with TensorRT 10"
        )
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    marked = mark_fp32_layers(network, trt, groups)
    log.info("fp16 engine: %d layers kept in fp32", len(marked))


def build_engine(
    onnx_path: str | Path,
    out_dir: str | Path,
    precision: str = "fp16",
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | Path | None = None,
    fp32_layer_types: Sequence[str] = DEFAULT_FP32_LAYER_TYPES,
    batch_size: int = 1,
    profiles: dict[str, dict[str, Sequence[int]]] | None = None,
    role: str = IMAGE_ROLE,
) -> EngineRecord:
    """Build an engine for this machine's GPU from ``onnx_path`` into ``out_dir``.

    The ONNX graph is checked first (``assert_tensorrt_compatible``). ``timing_cache`` is read if
    it exists and written back after the build. A dynamic batch axis gets a profile 1..batch_size;
    ``profiles`` ({input: {"min", "opt", "max"}}, the text engine's free batch and length axes)
    replaces that. The engine file is written atomically; the manifest is the caller's.
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    check_build_options(precision, workspace_mb, fp32_layer_types)
    free_axes = {name: range(len(shapes["max"])) for name, shapes in (profiles or {}).items()}
    assert_tensorrt_compatible(onnx_path, free_axes=free_axes or None)
    trt = import_tensorrt()
    device = query_device()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = _parse_onnx(trt, network, logger, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    _set_precision(trt, config, network, precision, fp32_layer_types)
    if profiles:
        _add_profiles(builder, config, profiles)
    else:
        _add_batch_profile(builder, network, config, batch_size)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache = _timing_cache(config, cache_path)
    plan = builder.build_serialized_network(network, config)
    del parser  # it owned the weights; both it and the cache had to outlive the build
    if plan is None:
        raise EngineBuildError("TensorRT could not build the engine (its log above says why)")
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(cache.serialize())))
    name = engine_file_name(
        onnx_path.stem, device.tensorrt_version, device.compute_capability, precision
    )
    with atomic_file(out_dir / name) as handle:
        handle.write(memoryview(plan))
    record = file_record(out_dir / name)
    return EngineRecord(
        file=name,
        tensorrt_version=device.tensorrt_version,
        compute_capability=device.compute_capability,
        precision=precision,
        workspace_mb=int(workspace_mb),
        device_name=device.device_name,
        built_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        sha256=record["sha256"],
        nbytes=record["bytes"],
        role=role,
    )
