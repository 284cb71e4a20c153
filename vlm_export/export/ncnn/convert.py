"""ONNX -> ncnn (.param/.bin) with pnnx, and the check that ncnn has a layer for every operation.

pnnx is found, not imported (its Python package imports torch): the ``pnnx`` executable inside
the installed package runs in a subprocess with every output path inside a scratch folder. pnnx
finishes even when it cannot convert an operation (it writes the op into the .param under its
own or ONNX name, which ncnn then refuses to load), so the written .param is checked against
ncnn's layer types and the operations without one are named in the error.
"""

from __future__ import annotations

import importlib.util
import re
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vlm_export.core.errors import UserError

INSTALL_HINT = 'pnnx is not installed: pip install ".[ncnn-export]" (the pnnx package)'
#: pnnx may take a while on a large graph; a hung converter is stopped after this
PNNX_TIMEOUT_S = 1800
#: ncnn's layer types (src/layer; ArgMax is left out: the Caffe layer, not built by default)
NCNN_LAYERS = frozenset(
    {
        "AbsVal",
        "BatchNorm",
        "Bias",
        "BinaryOp",
        "BNLL",
        "Cast",
        "CELU",
        "Clip",
        "Concat",
        "Convolution",
        "Convolution1D",
        "Convolution3D",
        "ConvolutionDepthWise",
        "ConvolutionDepthWise1D",
        "ConvolutionDepthWise3D",
        "CopyTo",
        "Crop",
        "CumulativeSum",
        "Deconvolution",
        "Deconvolution1D",
        "Deconvolution3D",
        "DeconvolutionDepthWise",
        "DeconvolutionDepthWise1D",
        "DeconvolutionDepthWise3D",
        "DeepCopy",
        "DeformableConv2D",
        "Dequantize",
        "DetectionOutput",
        "Diag",
        "Dropout",
        "Einsum",
        "Eltwise",
        "ELU",
        "Embed",
        "Erf",
        "Exp",
        "ExpandDims",
        "Flatten",
        "Flip",
        "Fold",
        "GELU",
        "Gemm",
        "GLU",
        "GridSample",
        "GroupNorm",
        "GRU",
        "HardSigmoid",
        "HardSwish",
        "InnerProduct",
        "Input",
        "InstanceNorm",
        "Interp",
        "InverseSpectrogram",
        "LayerNorm",
        "Log",
        "LRN",
        "LSTM",
        "MatMul",
        "MemoryData",
        "Mish",
        "MultiHeadAttention",
        "MVN",
        "Noop",
        "Normalize",
        "Packing",
        "Padding",
        "Permute",
        "PixelShuffle",
        "Pooling",
        "Pooling1D",
        "Pooling3D",
        "Power",
        "PReLU",
        "PriorBox",
        "Proposal",
        "PSROIPooling",
        "Quantize",
        "Reduction",
        "ReLU",
        "Reorg",
        "Requantize",
        "Reshape",
        "RMSNorm",
        "RNN",
        "ROIAlign",
        "ROIPooling",
        "RotaryEmbed",
        "Scale",
        "SDPA",
        "SELU",
        "Shrink",
        "ShuffleChannel",
        "Sigmoid",
        "Slice",
        "Softmax",
        "Softplus",
        "Spectrogram",
        "Split",
        "SPP",
        "Squeeze",
        "StatisticsPooling",
        "Swish",
        "TanH",
        "Threshold",
        "Tile",
        "UnaryOp",
        "Unfold",
        "Yolov3DetectionOutput",
        "YoloDetectionOutput",
    }
)
_MAGIC = "7767517"


class NcnnConversionError(UserError):
    """pnnx failed, or wrote layers that ncnn does not have; the message names them."""


@dataclass(frozen=True)
class Converted:
    """The files pnnx wrote and the pnnx version."""

    param: Path
    weights: Path
    pnnx_version: str


def pnnx_executable() -> Path:
    """The pnnx program of the installed pnnx package; NcnnConversionError when missing."""
    spec = importlib.util.find_spec("pnnx")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        program = Path(folder) / "pnnx"
        if program.is_file():
            return program
    raise NcnnConversionError(INSTALL_HINT)


def pnnx_version() -> str:
    """The installed pnnx package's version ("unknown" when its metadata is missing)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pnnx")
    except PackageNotFoundError:
        return "unknown"


def shape_argument(shapes: list[list[int]]) -> str:
    """pnnx's inputshape argument: ``[1,3,224,224],[1000,3,768],[1000]``."""
    return ",".join("[" + ",".join(str(int(v)) for v in shape) + "]" for shape in shapes)


def layers_of(param_text: str) -> list[tuple[str, str]]:
    """(layer type, layer name) of every layer in an ncnn .param text."""
    lines = param_text.splitlines()
    if not lines or lines[0].strip() != _MAGIC:
        raise NcnnConversionError("pnnx wrote no ncnn .param (its first line is not 7767517)")
    return [tuple(line.split()[:2]) for line in lines[2:] if line.strip()]  # type: ignore[misc]


def foreign_layers(param_text: str) -> Counter[str]:
    """Layer types in the .param that are not ncnn layers (operations pnnx left unconverted)."""
    return Counter(kind for kind, _ in layers_of(param_text) if kind not in NCNN_LAYERS)


def describe_foreign(counts: Counter[str]) -> str:
    """``TopK x3, GatherElements x21, ...`` in .param order of first appearance."""
    return ", ".join(f"{kind} x{count}" for kind, count in counts.items())


def _last_lines(text: str, count: int = 3) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # pnnx colours some lines
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-count:])[-400:] or "no output"


def signal_name(status: int) -> str:
    """SIGSEGV for a child that a signal ended (status -11)."""
    try:
        return signal.Signals(-status).name
    except ValueError:
        return f"signal {-status}"


def run_pnnx(onnx_path: Path, shapes: list[list[int]], folder: Path, stem: str) -> Converted:
    """Convert ``onnx_path`` into ``folder/<stem>.ncnn.param/.bin`` in fp32 (pnnx ``fp16=0``).

    Every other file pnnx writes (its own IR, the Python scripts) also lands in ``folder``.
    NcnnConversionError when pnnx fails or leaves operations ncnn cannot run.
    """
    program = pnnx_executable()
    outputs = {
        "pnnxparam": f"{stem}.pnnx.param",
        "pnnxbin": f"{stem}.pnnx.bin",
        "pnnxpy": f"{stem}_pnnx.py",
        "pnnxonnx": f"{stem}.pnnx.onnx",
        "ncnnparam": f"{stem}.ncnn.param",
        "ncnnbin": f"{stem}.ncnn.bin",
        "ncnnpy": f"{stem}_ncnn.py",
    }
    command = [
        str(program),
        str(onnx_path),
        f"inputshape={shape_argument(shapes)}",
        "fp16=0",
        *(f"{key}={folder / name}" for key, name in outputs.items()),
    ]
    try:
        done = subprocess.run(
            command, cwd=folder, capture_output=True, text=True, timeout=PNNX_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise NcnnConversionError(f"pnnx did not finish in {PNNX_TIMEOUT_S} s") from None
    except OSError as exc:
        raise NcnnConversionError(f"cannot run pnnx ({exc.strerror or exc})") from None
    param, weights = folder / outputs["ncnnparam"], folder / outputs["ncnnbin"]
    if done.returncode != 0 or not param.is_file() or not weights.is_file():
        log = _last_lines(done.stderr + done.stdout)
        how = f"exit status {done.returncode}"
        if done.returncode < 0:
            how = f"crashed, {signal_name(done.returncode)}"
        raise NcnnConversionError(f"pnnx failed ({how}): {log}")
    foreign = foreign_layers(param.read_text(encoding="utf-8", errors="replace"))
    if foreign:
        raise NcnnConversionError(
            f"ncnn has no layer for {sum(foreign.values())} operation(s) of this graph: "
            f"{describe_foreign(foreign)} (pnnx left them unconverted: ncnn computes in float "
            "only, without TopK, gathers, ArgMax/ArgMin, comparisons or integer casts); export "
            "the bundle with --target ncnn for a graph without them"
        )
    return Converted(param, weights, pnnx_version())


def io_blobs(param_text: str) -> tuple[list[str], list[str]]:
    """The Input layers' blobs (in order) and the ``outN`` blobs, as pnnx names them."""
    inputs = [name for kind, name in layers_of(param_text) if kind == "Input"]
    tops = re.findall(r"(?<=\s)(out\d+)(?=\s|$)", param_text)
    outputs = sorted(set(tops), key=lambda name: int(name[3:]))
    return inputs, outputs
