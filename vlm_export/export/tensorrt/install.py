"""TensorRT engines added to a bundle: built for this GPU, or built elsewhere and registered.

Either way the engine is first compared with ONNX Runtime CPU on the same inputs
(``runtime.engine_parity``): an engine below the precision's embedding cosine threshold is
removed and the manifest is left as it was; a passing one is recorded in the manifest
(``engines`` with its parity numbers, and ``files`` with its sha256), written atomically. It needs
TensorRT and cuda-python but not torch, so it runs on the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.atomic import WriteError, atomic_write_bytes
from vlm_export.core.errors import UserError
from vlm_export.core.json_text import dumps
from vlm_export.core.manifest import MANIFEST_NAME, file_record, read_manifest
from vlm_export.export.bundle.staging import (
    _refuse_listed,
    _staging,
    move_into_bundle,
    record_engine,
)
from vlm_export.export.tensorrt.build import (
    DEFAULT_FP32_LAYER_TYPES,
    DEFAULT_WORKSPACE_MB,
    ORIGIN_REGISTERED,
    EngineRecord,
    build_engine,
    check_build_options,
    engine_file_name,
    fp32_node_names,
    trtexec_command,
)
from vlm_export.runtime.engines.base import BundleGraph, EngineBackend
from vlm_export.runtime.engines.checks import parity as engine_parity
from vlm_export.runtime.engines.select import (
    PRECISIONS,
    TEXT_ROLE,
    DeviceInfo,
    TensorRTUnavailableError,
    query_device,
)


def _device_or_none() -> DeviceInfo | None:
    try:
        return query_device()
    except TensorRTUnavailableError:
        return None


def planned_engine_name(stem: str, precision: str, device: DeviceInfo | None) -> str:
    """The engine file name for ``device``; without TensorRT here, a name without version/GPU.

    The versionless name is only where trtexec writes the engine: ``build-engine --register``
    gives it the versioned name when it adds it to the bundle.
    """
    if device is None:
        return f"{stem}.{precision}.engine"
    return engine_file_name(stem, device.tensorrt_version, device.compute_capability, precision)


def trtexec_hint(bundle_dir: str | Path, precision: str, workspace_mb: int) -> tuple[str, str]:
    """The trtexec line that builds this bundle's engine (run inside the bundle folder), and the
    engine file name it writes."""
    bundle_dir = Path(bundle_dir)
    onnx_name = read_manifest(bundle_dir)["engine"]["onnx"]
    check_build_options(precision, workspace_mb, DEFAULT_FP32_LAYER_TYPES)
    layers = fp32_node_names(bundle_dir / onnx_name) if precision == "fp16" else []
    name = planned_engine_name(Path(onnx_name).stem, precision, _device_or_none())
    return trtexec_command(onnx_name, name, precision, workspace_mb, fp32_layers=layers), name


def register_command(bundle_dir: str | Path, engine_file: str | Path, precision: str) -> str:
    """The ``vlm-export build-engine --register`` line that adds ``engine_file`` to the bundle."""
    return " ".join(
        [
            "vlm-export build-engine",
            shlex.quote(str(bundle_dir)),
            "--register",
            shlex.quote(str(engine_file)),
            "--precision",
            precision,
        ]
    )


def open_engine_backend(
    bundle_dir: Path, manifest: dict[str, Any], engine_path: Path
) -> EngineBackend:
    """The TensorRT backend over ``engine_path`` (tests replace this with a fake engine)."""
    from vlm_export.runtime.engines.backends.tensorrt_backend import TensorRTBackend

    graph = BundleGraph(bundle_dir, manifest)
    return TensorRTBackend(graph, engine_file=engine_path)


def engine_parity_report(
    bundle_dir: Path, manifest: dict[str, Any], engine_path: Path, precision: str
) -> dict[str, Any]:
    """Run the engine and ONNX Runtime CPU on the same inputs; EngineParityError if it fails."""
    with contextlib.ExitStack() as stack:
        engine = open_engine_backend(bundle_dir, manifest, engine_path)
        stack.callback(engine.close)
        reference = engine_parity.open_reference(bundle_dir, manifest)
        stack.callback(reference.close)
        try:
            return engine_parity.check_engine_parity(engine, reference, manifest, precision)
        except engine_parity.EngineParityError as exc:
            problem = str(exc)
        except RuntimeError as exc:  # a CUDA or TensorRT call failed while running it
            problem = f"running it failed ({' '.join(str(exc).split())})"
    raise engine_parity.EngineParityError(
        f"{engine_path.name} was not added to the bundle: {problem}"
    )


def _install(
    bundle_dir: Path,
    manifest: dict[str, Any],
    staged: Path,
    record: EngineRecord,
    parity_report: Callable[[Path, dict[str, Any], Path, str], dict[str, Any]] | None = None,
    graph: str | None = None,
) -> EngineRecord:
    """Check the staged engine against ONNX Runtime (``parity_report``, the image engine's by
    default; on ``graph``, a ladder rung's, if given), move it into the bundle, record it."""
    view = manifest if graph is None else _graph_view(manifest, graph)
    parity = (parity_report or engine_parity_report)(bundle_dir, view, staged, record.precision)
    record = dataclasses.replace(record, parity=parity)
    move_into_bundle(staged, bundle_dir, record.file, record.sha256)
    manifest = record_engine(manifest, record)
    text = dumps(manifest, indent=2) + "\n"
    atomic_write_bytes(bundle_dir / MANIFEST_NAME, text.encode("utf-8"))
    return record


def text_engine_parity_report(
    bundle_dir: Path, manifest: dict[str, Any], engine_path: Path, precision: str
) -> dict[str, Any]:
    """The text engine on TensorRT vs ONNX Runtime CPU on the parity prompts (each batch cut to
    its longest prompt); EngineParityError below the image engine's cosine bar."""
    from vlm_export.core.manifest import TEXT_EMBEDDING_OUTPUT as OUT
    from vlm_export.runtime.text.encoder import OnnxRuntimeTextRunner
    from vlm_export.runtime.text.prompts import parity_prompts, token_lengths
    from vlm_export.runtime.text.tensorrt_text import open_text_engine
    from vlm_export.runtime.text.tokenizer import ClipTokenizer

    section = manifest["text_encoder"]
    tokens = ClipTokenizer.from_bundle(bundle_dir)(parity_prompts(), section["context_length"])
    tokens = np.ascontiguousarray(tokens[:, : int(token_lengths(tokens).max())])
    want = OnnxRuntimeTextRunner(bundle_dir / section["onnx"], ["CPUExecutionProvider"])(tokens)
    engine = open_text_engine(bundle_dir, manifest, engine_path)
    try:
        got = engine(tokens)
    except RuntimeError as exc:
        raise engine_parity.EngineParityError(
            f"{engine_path.name} was not added to the bundle: running it failed ({exc})"
        ) from None
    finally:
        engine.close()
    stats = engine_parity.compare_outputs("prompts", {OUT: got}, {OUT: want})[OUT]
    bar = engine_parity.MIN_EMBEDDING_COSINE[precision]
    report = {
        "reference": engine_parity.REFERENCE,
        "precision": precision,
        "prompts": len(tokens),
        "embedding_cosine_min": stats["cosine"],
        "embedding_max_abs": stats["max_abs"],
        "thresholds": {"embedding_cosine_min": bar},
        "passed": stats["cosine"] >= bar,
    }
    if not report["passed"]:
        raise engine_parity.EngineParityError(
            f"{engine_path.name} was not added to the bundle: the text engine differs from "
            f"{engine_parity.REFERENCE}: {engine_parity.describe(report)}"
        )
    return report


def add_text_engine_to_bundle(
    bundle_dir: str | Path,
    precision: str = "fp16",
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | Path | None = None,
    overwrite: bool = False,
) -> EngineRecord | None:
    """Build the text engine (``text_encoder.trt*.engine``, profile from the manifest) for this
    GPU, check it against ONNX Runtime CPU, record it; None for a bundle without a text engine."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    section = manifest.get("text_encoder")
    if not isinstance(section, dict):
        return None
    return _build_into_bundle(
        bundle_dir,
        manifest,
        bundle_dir / section["onnx"],
        (precision, workspace_mb, timing_cache, overwrite),
        text_engine_parity_report,
        profiles=section["profile"],
        role=TEXT_ROLE,
    )


def _graph_view(manifest: dict[str, Any], graph: str) -> dict[str, Any]:
    """The manifest as a backend reads it with ``graph`` (a ladder rung) as its image engine."""
    return {**manifest, "engine": {**manifest["engine"], "onnx": graph}}


def _build_into_bundle(
    bundle_dir: Path,
    manifest: dict[str, Any],
    onnx_path: Path,
    options: tuple[str, int, str | Path | None, bool],
    parity_report: Callable[[Path, dict[str, Any], Path, str], dict[str, Any]] | None,
    rung: int = 0,
    **build_options: Any,
) -> EngineRecord:
    """Check the options, refuse a listed engine without overwrite, build into a staging folder,
    then install through ``_install``. ``options``: precision, workspace MB, timing cache,
    overwrite. ``rung`` > 0 builds that ladder rung's graph (``onnx_path``)."""
    precision, workspace_mb, timing_cache, overwrite = options
    check_build_options(precision, workspace_mb, DEFAULT_FP32_LAYER_TYPES)
    name = planned_engine_name(onnx_path.stem, precision, query_device())
    _refuse_listed(bundle_dir, manifest, name, overwrite, "rebuild")
    with _staging(bundle_dir) as staging:
        record = build_engine(
            onnx_path,
            staging,
            precision=precision,
            workspace_mb=workspace_mb,
            timing_cache=timing_cache,
            **build_options,
        )
        record = dataclasses.replace(record, rung=rung)
        graph = onnx_path.name if rung else None
        return _install(bundle_dir, manifest, staging / record.file, record, parity_report, graph)


def add_engine_to_bundle(
    bundle_dir: str | Path,
    precision: str = "fp16",
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | Path | None = None,
    overwrite: bool = False,
) -> EngineRecord:
    """Build an engine for this GPU into ``bundle_dir``, check it, record it in the manifest.

    The engine is built into a temporary folder and compared with ONNX Runtime CPU there
    (``engine_parity_report``); only a passing engine is moved into the bundle and recorded
    (manifest written atomically), so a failing build leaves the bundle as it was. An engine of
    the same name (same TensorRT release, GPU and precision) already in the manifest is rebuilt
    only with ``overwrite``.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    return _build_into_bundle(
        bundle_dir,
        manifest,
        bundle_dir / manifest["engine"]["onnx"],
        (precision, workspace_mb, timing_cache, overwrite),
        None,
        batch_size=int(manifest["engine"]["batch_size"]),
    )


def add_rung_engines_to_bundle(
    bundle_dir: str | Path,
    precision: str = "fp16",
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | Path | None = None,
    overwrite: bool = False,
) -> list[EngineRecord]:
    """A ladder bundle's further rungs (1, 2, ...) as engines for this GPU, each built from its
    rung's graph, checked against that graph on ONNX Runtime CPU and recorded with its ``rung``
    (rung 0 is the bundle's engine: ``add_engine_to_bundle``). Empty for a one-engine bundle."""
    bundle_dir = Path(bundle_dir)
    ladder = read_manifest(bundle_dir).get("ladder")
    if not isinstance(ladder, dict):
        return []
    records = []
    for index, rung in enumerate(ladder["rungs"][1:], start=1):
        manifest = read_manifest(bundle_dir)  # each install rewrites it
        records.append(
            _build_into_bundle(
                bundle_dir,
                manifest,
                bundle_dir / str(rung["onnx"]),
                (precision, workspace_mb, timing_cache, overwrite),
                None,
                rung=index,
                batch_size=int(manifest["engine"]["batch_size"]),
            )
        )
    return records


def precision_of(engine_file: str | Path, precision: str | None) -> str:
    """The precision of an engine to register: as given, else from a *.fp16/*.fp32.engine name."""
    if precision is not None:
        return precision
    for known in PRECISIONS:
        if Path(engine_file).name.endswith(f".{known}.engine"):
            return known
    raise UserError(
        f"cannot tell the precision of {Path(engine_file).name} from its name: pass --precision "
        f"{' or '.join(PRECISIONS)} (how it was built)"
    )


def register_engine_in_bundle(
    bundle_dir: str | Path,
    engine_file: str | Path,
    precision: str | None = None,
    overwrite: bool = False,
) -> EngineRecord:
    """Add an engine built elsewhere (trtexec) to the bundle, like a built one.

    The engine is named after this machine's TensorRT release and GPU (``query_device``: the
    engine must load with this TensorRT, which the parity run checks), copied into a temporary
    folder, compared with ONNX Runtime CPU, then moved into the bundle and recorded with its
    sha256 (``origin`` "registered", ``workspace_mb`` unknown). A failing engine leaves the
    bundle as it was.
    """
    bundle_dir, engine_file = Path(bundle_dir), Path(engine_file)
    manifest = read_manifest(bundle_dir)
    if not engine_file.is_file():
        raise UserError(f"engine file not found: {engine_file}")
    precision = precision_of(engine_file, precision)
    check_build_options(precision, DEFAULT_WORKSPACE_MB, DEFAULT_FP32_LAYER_TYPES)
    try:
        device = query_device()
    except TensorRTUnavailableError as exc:
        raise TensorRTUnavailableError(
            f"--register loads the engine with this machine's TensorRT to check it: {exc}"
        ) from None
    stem = Path(manifest["engine"]["onnx"]).stem
    name = planned_engine_name(stem, precision, device)
    _refuse_listed(bundle_dir, manifest, name, overwrite, "replace", engine_file)
    with _staging(bundle_dir) as staging:
        try:
            shutil.copyfile(engine_file, staging / name)
        except OSError as exc:
            raise WriteError(f"cannot copy {engine_file}: {exc.strerror or exc}") from None
        copied = file_record(staging / name)
        record = EngineRecord(
            file=name,
            tensorrt_version=device.tensorrt_version,
            compute_capability=device.compute_capability,
            precision=precision,
            workspace_mb=None,
            device_name=device.device_name,
            built_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            sha256=copied["sha256"],
            nbytes=copied["bytes"],
            origin=ORIGIN_REGISTERED,
        )
        return _install(bundle_dir, manifest, staging / name, record)
