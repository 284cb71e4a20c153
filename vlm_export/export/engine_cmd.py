"""Command-line glue for TensorRT: the export options and ``vlm-export build-engine BUNDLE``.

``build-engine`` builds an engine for this machine's GPU from a bundle's ONNX; ``build-engine
--register FILE`` adds an engine built elsewhere (the trtexec line) under its versioned name.
Either way the engine is first compared with ONNX Runtime CPU on the same inputs
(``runtime.engine_parity``): an engine below the precision's embedding cosine threshold is
removed and the manifest is left as it was; a passing one is recorded in the manifest
(``engines`` with its parity numbers, and ``files`` with its sha256), written atomically. It needs
TensorRT and cuda-python but not torch, so it runs on the device. It prints the equivalent
trtexec line first, with the ``--register`` line that adds that engine to the bundle.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.atomic import WriteError, atomic_write_bytes
from vlm_export.core.errors import UserError
from vlm_export.core.json_text import dumps
from vlm_export.core.manifest import MANIFEST_NAME, file_record, read_manifest, sha256_file
from vlm_export.core.paths import PathArg, check_bundle_links, guard_arguments
from vlm_export.export.tensorrt_build import (
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
from vlm_export.runtime.engines import parity as engine_parity
from vlm_export.runtime.engines.base import EngineBackend
from vlm_export.runtime.engines.select import (
    PRECISIONS,
    TEXT_ROLE,
    DeviceInfo,
    TensorRTUnavailableError,
    query_device,
)

REGISTER_HELP = (
    "add an engine built elsewhere (e.g. with the printed trtexec line) instead of building one: "
    "it is loaded with this machine's TensorRT, compared with ONNX Runtime CPU, copied into the "
    "bundle as <onnx>.trt<version>.sm<gpu>.<precision>.engine and recorded with its sha256; "
    "needs TensorRT's Python bindings and the GPU it was built for"
)


def _add_build_options(parser: Any, default_precision: str | None = "fp16") -> None:
    """--precision, --workspace, --timing-cache on a parser or an argument group."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default_precision,
        help="engine precision; fp16 keeps LayerNorm and softmax in fp32 (default: fp16; with "
        "--register: read from a FILE named *.fp16.engine or *.fp32.engine)",
    )
    parser.add_argument(
        "--workspace",
        type=int,
        default=DEFAULT_WORKSPACE_MB,
        metavar="MB",
        help=f"TensorRT builder workspace limit in MB (default: {DEFAULT_WORKSPACE_MB})",
    )
    parser.add_argument(
        "--timing-cache",
        type=PathArg("state", Path),
        default=None,
        metavar="FILE",
        help="TensorRT timing cache: read if it exists, written after the build (faster rebuilds)",
    )


def add_tensorrt_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --tensorrt, --precision, --workspace and --timing-cache to the export command."""
    group = parser.add_argument_group("TensorRT")
    group.add_argument(
        "--tensorrt",
        action="store_true",
        help="also build a TensorRT engine for this machine's GPU into the bundle (checked "
        "against ONNX Runtime CPU first)",
    )
    _add_build_options(group)


def preflight_tensorrt(args: argparse.Namespace) -> None:
    """With --tensorrt, fail before the export if the engine cannot be built here."""
    if getattr(args, "tensorrt", False):
        check_build_options(args.precision, args.workspace, DEFAULT_FP32_LAYER_TYPES)
        try:
            query_device()
        except TensorRTUnavailableError as exc:
            raise TensorRTUnavailableError(
                f"{exc}; or export without --tensorrt and build the engine on the device with "
                "`vlm-export build-engine BUNDLE` (or the trtexec line it prints)"
            ) from None


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


def print_trtexec_hint(bundle_dir: str | Path, precision: str, workspace_mb: int) -> None:
    """Print the trtexec line and the --register line that adds its engine to the bundle."""
    line, name = trtexec_hint(bundle_dir, precision, workspace_mb)
    register = register_command(bundle_dir, Path(bundle_dir) / name, precision)
    print(f"equivalent trtexec line (run in {bundle_dir}):\n  {line}")
    print(
        "an engine built by trtexec is used only once registered (checked against ONNX Runtime, "
        f"renamed, recorded with its sha256):\n  {register}"
    )


def record_engine(manifest: dict[str, Any], record: EngineRecord) -> dict[str, Any]:
    """Add ``record`` to ``engines`` (replacing an entry of that file) and to ``files``."""
    engines = [entry for entry in manifest.get("engines") or [] if entry.get("file") != record.file]
    manifest["engines"] = [*engines, record.to_manifest()]
    manifest["files"][record.file] = {"sha256": record.sha256, "bytes": record.nbytes}
    return manifest


def open_engine_backend(
    bundle_dir: Path, manifest: dict[str, Any], engine_path: Path
) -> EngineBackend:
    """The TensorRT backend over ``engine_path`` (tests replace this with a fake engine)."""
    from vlm_export.runtime.engines.tensorrt_backend import TensorRTBackend

    graph = engine_parity.BundleGraph(bundle_dir, manifest)
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


#: a bundle this command writes into (the write guard refuses one that links outside)
BUNDLE_RW = PathArg("bundle-rw", Path)


#: staging folders in a bundle: ``.engine-`` and mkdtemp's 8 random characters
STAGING_PREFIX = ".engine-"
_STAGING_NAME = re.compile(rf"^{re.escape(STAGING_PREFIX)}[a-z0-9_]{{8}}$")
#: written into the staging folder just before its file moves into the bundle: {file, sha256}
INSTALLING = "installing.json"


@contextlib.contextmanager
def _staging(bundle_dir: Path) -> Iterator[Path]:
    """A temporary folder inside the bundle (same file system), removed with what it holds.

    After a successful block, staging folders that killed runs left (older than this one) are
    removed too: a kill leaves nothing that the next successful build, register or quantize
    does not remove.
    """
    check_bundle_links("bundle", bundle_dir)  # also for library callers (the CLI checked)
    started = time.time()
    try:
        folder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=bundle_dir))
    except OSError as exc:
        raise WriteError(f"cannot write into {bundle_dir}: {exc.strerror or exc}") from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for stale in stale_staging(bundle_dir, started):
        shutil.rmtree(stale, ignore_errors=True)


def stale_staging(bundle_dir: Path, before: float) -> list[Path]:
    """Staging folders in ``bundle_dir`` last changed before ``before`` (killed runs')."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(bundle_dir):
            with contextlib.suppress(OSError):
                if (
                    _STAGING_NAME.match(entry.name)
                    and entry.is_dir(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime < before
                ):
                    found.append(Path(entry.path))
    return sorted(found)


def move_into_bundle(staged: Path, bundle_dir: Path, name: str, sha256: str) -> None:
    """Move a checked file from its staging folder into the bundle under ``name``.

    ``installing.json`` in the staging folder names it first: a run killed before the manifest
    lists the file leaves that record, by which the next run knows the unlisted file as its
    own (``_left_by_killed_install``) and replaces it.
    """
    record = {"file": name, "sha256": sha256}
    try:
        (staged.parent / INSTALLING).write_text(json.dumps(record), encoding="utf-8")
        os.replace(staged, bundle_dir / name)
    except OSError as exc:
        raise WriteError(f"cannot write {bundle_dir / name}: {exc.strerror}") from None


def _left_by_killed_install(bundle_dir: Path, name: str) -> bool:
    """``name`` (unlisted) is the file a killed run moved in: a stale staging folder's
    ``installing.json`` names it with its sha256."""
    for folder in stale_staging(bundle_dir, time.time()):
        try:
            record = json.loads((folder / INSTALLING).read_text(encoding="utf-8"))
            if record.get("file") == name and record.get("sha256") == sha256_file(
                bundle_dir / name
            ):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def _install(
    bundle_dir: Path,
    manifest: dict[str, Any],
    staged: Path,
    record: EngineRecord,
    parity_report: Callable[[Path, dict[str, Any], Path, str], dict[str, Any]] | None = None,
) -> EngineRecord:
    """Check the staged engine against ONNX Runtime (``parity_report``, the image engine's by
    default), move it into the bundle, record it."""
    parity = (parity_report or engine_parity_report)(bundle_dir, manifest, staged, record.precision)
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


def _build_into_bundle(
    bundle_dir: Path,
    manifest: dict[str, Any],
    onnx_path: Path,
    options: tuple[str, int, str | Path | None, bool],
    parity_report: Callable[[Path, dict[str, Any], Path, str], dict[str, Any]] | None,
    **build_options: Any,
) -> EngineRecord:
    """Check the options, refuse a listed engine without overwrite, build into a staging folder,
    then install through ``_install``. ``options``: precision, workspace MB, timing cache,
    overwrite."""
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
        return _install(bundle_dir, manifest, staging / record.file, record, parity_report)


def _refuse_listed(
    bundle_dir: Path,
    manifest: dict[str, Any],
    name: str,
    overwrite: bool,
    what: str,
    source: Path | None = None,
) -> None:
    """Refuse to replace a listed engine without ``overwrite``, and a file of that name that the
    manifest does not list at all (never ours to delete), unless it is ``source`` itself."""
    listed = any(entry.get("file") == name for entry in manifest.get("engines") or [])
    if listed and not overwrite:
        raise UserError(f"{name} is already in the bundle; pass --overwrite to {what} it")
    target = bundle_dir / name
    if listed or not os.path.lexists(target):
        return
    if source is not None and target.exists() and os.path.samefile(source, target):
        return
    if not target.is_symlink() and _left_by_killed_install(bundle_dir, name):
        target.unlink()  # a killed run's own file, never listed: replaced by this run
        return
    raise UserError(
        f"{target} exists but the bundle's manifest does not list it; move it away first "
        "(it is not replaced)"
    )


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


def describe_record(record: EngineRecord) -> str:
    """One line about an engine added to a bundle, with its parity numbers."""
    verb = "registered" if record.origin == ORIGIN_REGISTERED else "built"
    line = (
        f"{verb} {record.file}: {record.precision}, TensorRT {record.tensorrt_version}, "
        f"{record.device_name} (compute {record.compute_capability}), "
        f"{record.nbytes / 2**20:.1f} MiB"
    )
    if record.parity is not None:
        line += f"; against {record.parity['reference']}: {engine_parity.describe(record.parity)}"
    return line


def run_tensorrt_step(args: argparse.Namespace, bundle_dir: str | Path) -> EngineRecord | None:
    """After an export with --tensorrt: print the trtexec line, build, record; else do nothing."""
    if not getattr(args, "tensorrt", False):
        return None
    print_trtexec_hint(bundle_dir, args.precision, args.workspace)
    record = add_engine_to_bundle(
        bundle_dir, args.precision, args.workspace, args.timing_cache, overwrite=True
    )
    print(describe_record(record))
    text = add_text_engine_to_bundle(
        bundle_dir, args.precision, args.workspace, args.timing_cache, overwrite=True
    )
    if text is not None:
        print(describe_record(text))
    return record


def build_engine_parser() -> argparse.ArgumentParser:
    """The parser of ``vlm-export build-engine``."""
    parser = argparse.ArgumentParser(
        prog="vlm-export build-engine",
        description=(
            "Build a TensorRT engine for this machine's GPU into an existing bundle, or add one\n"
            "built elsewhere with --register. Either way the engine is compared with ONNX\n"
            "Runtime CPU on the same inputs (embedding cosine >= 0.999 for fp16, 0.9999 for\n"
            "fp32) before it is recorded in the manifest; a failing engine is not kept."
        ),
        epilog=(
            "examples:\n"
            "  vlm-export build-engine bundles/vitb16-tca --precision fp16\n"
            "  vlm-export build-engine bundles/vitb16-tca \\\n"
            "      --register bundles/vitb16-tca/image_encoder.fp16.engine   # built by trtexec"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundle", type=BUNDLE_RW, metavar="BUNDLE", help="bundle folder")
    _add_build_options(parser, default_precision=None)
    parser.set_defaults(workspace=None)
    parser.add_argument(
        "--register", type=PathArg("file", Path), metavar="ENGINE_FILE", help=REGISTER_HELP
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild (or replace) an engine the bundle already lists for this TensorRT, GPU "
        "and precision",
    )
    parser.add_argument(
        "--no-text-engine",
        dest="text_engine",
        action="store_false",
        help="build the image engine only (by default a bundle with a text engine also gets "
        "text_encoder.trt<version>.sm<cc>.<precision>.engine, profile from the manifest)",
    )
    return parser


def _register_main(args: argparse.Namespace) -> EngineRecord:
    if args.workspace is not None or args.timing_cache is not None:
        raise UserError("--workspace and --timing-cache apply to building, not to --register")
    return register_engine_in_bundle(args.bundle, args.register, args.precision, args.overwrite)


def _build_main(args: argparse.Namespace) -> EngineRecord:
    precision = args.precision or "fp16"
    workspace = DEFAULT_WORKSPACE_MB if args.workspace is None else args.workspace
    print_trtexec_hint(args.bundle, precision, workspace)
    record = add_engine_to_bundle(
        args.bundle, precision, workspace, args.timing_cache, args.overwrite
    )
    if args.text_engine:
        text = add_text_engine_to_bundle(
            args.bundle, precision, workspace, args.timing_cache, args.overwrite
        )
        if text is not None:
            print(describe_record(text))
    return record


def build_engine_main(argv: Sequence[str] | None = None) -> int:
    """Run ``vlm-export build-engine BUNDLE [--register FILE]``: add an engine to a bundle.

    Returns the exit status: 0 on success, 2 with a one-line error on stderr (as vlm-export).
    """
    parser = build_engine_parser()
    args = parser.parse_args(argv)
    try:
        guard_arguments(parser, args)  # before any work
        record = _register_main(args) if args.register is not None else _build_main(args)
    except UserError as exc:
        print(f"vlm-export build-engine: error: {exc}", file=sys.stderr)
        return 2
    print(describe_record(record))
    if (
        args.register is not None
        and args.register.resolve() != (args.bundle / record.file).resolve()
    ):
        print(
            f"{args.register} was copied into the bundle as {record.file}; it is no longer needed"
        )
    return 0
