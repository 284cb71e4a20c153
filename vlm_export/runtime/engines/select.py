"""Which TensorRT engine of a bundle this device can run (TensorRT version and GPU must match).

TensorRT engines are not portable: an engine runs only with the TensorRT release that built it
and only on GPUs of the compute capability it was built for. The selection logic is plain Python
over the manifest's ``engines`` list; ``query_device`` asks tensorrt and cuda-python (imported
lazily, both optional) what this device has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import tensorrt_engines

PRECISIONS = ("fp16", "fp32")
TENSORRT_INSTALL_HINT = (
    'pip install ".[tensorrt]" on a machine with NVIDIA\'s TensorRT libraries '
    "(on Jetson they come with JetPack)"
)


class TensorRTUnavailableError(UserError):
    """TensorRT or cuda-python cannot be imported, or no CUDA GPU is visible."""


class NoMatchingEngineError(UserError):
    """The bundle has no engine built for this device's TensorRT version and GPU."""


def import_tensorrt() -> ModuleType:
    """Import the ``tensorrt`` module or raise a one-line TensorRTUnavailableError."""
    try:
        import tensorrt
    except ModuleNotFoundError:
        raise TensorRTUnavailableError(
            f"TensorRT is not installed: {TENSORRT_INSTALL_HINT}"
        ) from None
    except (ImportError, OSError) as exc:
        raise TensorRTUnavailableError(
            f"TensorRT's Python bindings are installed but its libraries cannot be loaded ({exc}); "
            f"{TENSORRT_INSTALL_HINT}"
        ) from None
    return tensorrt


def import_cudart() -> ModuleType:
    """Import cuda-python's runtime API (new and old module paths) or raise one line."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise TensorRTUnavailableError(
                'cuda-python is not installed: pip install ".[tensorrt]"'
            ) from None
    return cudart


def cuda_check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(error, *values)`` result; raise RuntimeError naming ``what``."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if getattr(error, "value", error) != 0:
        raise RuntimeError(f"CUDA call {what} failed: {getattr(error, 'name', error)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class DeviceInfo:
    """What decides which engines can run here."""

    tensorrt_version: str  # full version string, e.g. "10.3.0.30"
    compute_capability: str  # "major.minor", e.g. "8.7"
    device_name: str = ""


def version_major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string such as "10.3.0.30"."""
    parts = str(version).split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise ValueError(f"not a TensorRT version: {version!r}") from None


def normalize_compute_capability(value: Any) -> str:
    """Compute capability as "major.minor" from "8.7", "sm_87", "sm87", (8, 7) or 87."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{int(value[0])}.{int(value[1])}"
    text = str(value).strip().lower().removeprefix("sm_").removeprefix("sm")
    if "." in text:
        major, minor = text.split(".", 1)
        return f"{int(major)}.{int(minor)}"
    if text.isdigit() and len(text) >= 2:
        return f"{int(text[:-1])}.{int(text[-1])}"
    raise ValueError(f"not a compute capability: {value!r}")


def sm_name(compute_capability: str) -> str:
    """The sm name of a compute capability: "sm_87" for "8.7"."""
    return "sm_" + normalize_compute_capability(compute_capability).replace(".", "")


def query_device(device: int = 0) -> DeviceInfo:
    """TensorRT version and compute capability of this machine's GPU ``device``."""
    trt = import_tensorrt()
    cudart = import_cudart()
    error, count = cudart.cudaGetDeviceCount()
    if getattr(error, "value", error) != 0 or device >= count:
        problem = getattr(error, "name", error) if count == 0 else f"{count} GPU(s)"
        raise TensorRTUnavailableError(f"no CUDA GPU {device} is visible ({problem})")
    props = cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return DeviceInfo(
        tensorrt_version=str(trt.__version__),
        compute_capability=f"{int(props.major)}.{int(props.minor)}",
        device_name=str(name),
    )


IMAGE_ROLE = "image_encoder"  # a manifest engine record without "role" is an image engine
TEXT_ROLE = "text_encoder"


def engine_role(record: dict[str, Any]) -> str:
    """Which ONNX model an engine record was built from: image_encoder or text_encoder."""
    return str(record.get("role", IMAGE_ROLE))


def engine_rung(record: dict[str, Any]) -> int:
    """The ladder rung an engine record was built from (0, the bundle's engine, when absent)."""
    return int(record.get("rung", 0))


def engines_of_role(
    engines: list[dict[str, Any]], role: str, rung: int = 0
) -> list[dict[str, Any]]:
    """The manifest's engine records built from the ``role`` model (of ladder ``rung``)."""
    return [r for r in engines if engine_role(r) == role and engine_rung(r) == rung]


@dataclass
class EngineChoice:
    """The chosen engine record (None if none fits) and why every other engine was refused."""

    engine: dict[str, Any] | None
    refused: list[tuple[str, str]] = field(default_factory=list)

    def explain(self) -> str:
        """One line per refused engine: "file: reason"."""
        return "\n".join(f"{name}: {reason}" for name, reason in self.refused)


def _device_text(device: DeviceInfo) -> str:
    major, minor = version_major_minor(device.tensorrt_version)
    return f"TensorRT {major}.{minor} on {sm_name(device.compute_capability)}"


def _describe(record: dict[str, Any]) -> str:
    major, minor = version_major_minor(record["tensorrt_version"])
    return f"TensorRT {major}.{minor} for {sm_name(record['compute_capability'])}"


def _refusal(record: dict[str, Any], device: DeviceInfo, precision: str | None) -> str | None:
    """Why ``record`` cannot run on ``device`` (None if it can)."""
    missing = [
        key
        for key in ("file", "tensorrt_version", "compute_capability", "precision")
        if key not in record
    ]
    if missing:
        return f"manifest entry lacks {', '.join(missing)}"
    try:
        same_trt = version_major_minor(record["tensorrt_version"]) == version_major_minor(
            device.tensorrt_version
        )
        same_gpu = normalize_compute_capability(
            record["compute_capability"]
        ) == normalize_compute_capability(device.compute_capability)
        built_for = _describe(record)
    except ValueError as exc:
        return f"unreadable manifest entry ({exc})"
    if not (same_trt and same_gpu):
        return f"built with {built_for}; this device has {_device_text(device)}"
    if precision is not None and record["precision"] != precision:
        return f"precision {record['precision']}, {precision} was asked for"
    return None


def select_engine(
    engines: list[dict[str, Any]],
    device: DeviceInfo,
    precision: str | None = None,
    role: str = IMAGE_ROLE,
    rung: int = 0,
) -> EngineChoice:
    """Pick the engine of ``engines`` (manifest records) that runs on ``device``.

    Only engines of ``role`` (the image encoder unless asked for the text encoder) and of ladder
    ``rung`` (0: the bundle's engine graph) compete.

    An engine fits when its TensorRT major.minor and compute capability equal the device's.
    Among fitting engines: an exact TensorRT version before a patch-level difference (TensorRT
    documents engines as compatible with the release that built them only), then ``precision``
    if given (else fp16 before fp32), then the most recently built.
    """
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    fitting, refused = [], []
    for record in engines_of_role(engines, role, rung):
        reason = _refusal(record, device, precision)
        name = str(record.get("file", "<unnamed engine>"))
        if reason is None:
            fitting.append(record)
        else:
            refused.append((name, reason))

    def rank(record: dict[str, Any]) -> tuple[bool, int]:
        kind = record["precision"]
        order = PRECISIONS.index(kind) if kind in PRECISIONS else len(PRECISIONS)
        return str(record["tensorrt_version"]) != device.tensorrt_version, order

    fitting.sort(key=lambda record: str(record.get("built_utc", "")), reverse=True)
    fitting.sort(key=rank)  # stable: the newest build first among equals
    for record in fitting[1:]:
        refused.append((record["file"], f"{fitting[0]['file']} is preferred"))
    return EngineChoice(engine=fitting[0] if fitting else None, refused=refused)


def choose_engine(
    manifest: dict[str, Any],
    device: DeviceInfo | None = None,
    precision: str | None = None,
    role: str = IMAGE_ROLE,
) -> dict[str, Any]:
    """The engine record of ``manifest`` for this device, or NoMatchingEngineError with reasons."""
    device = device or query_device()
    choice = select_engine(tensorrt_engines(manifest), device, precision, role)
    if choice.engine is not None:
        return choice.engine
    raise no_engine_error(choice, device)


def no_engine_error(choice: EngineChoice, device: DeviceInfo) -> NoMatchingEngineError:
    """The error for a choice without an engine: every refusal, and how to get an engine."""
    here = _device_text(device)
    details = "; ".join(f"{name}: {reason}" for name, reason in choice.refused)
    listed = f" ({details})" if details else " (the bundle has no engines)"
    return NoMatchingEngineError(
        f"no TensorRT engine in this bundle fits {here}{listed}; build one on this device with "
        "`vlm-export build-engine BUNDLE` (or add a trtexec-built one with `vlm-export "
        "build-engine BUNDLE --register FILE`), or use the ONNX Runtime backend"
    )
