"""Add a Rockchip RKNN graph to a bundle: convert with rknn-toolkit2, check in its simulator,
record.

rknn-toolkit2 (x86-64 Linux; it pins old onnx, numpy and torch, so it lives in a venv of its
own) converts the bundle's ONNX image graph for one SoC (``TARGETS``) in RKNN's float type,
fp16; no int8 quantization. The graph is built into a staging folder inside the bundle, then run
in the toolkit's simulator (``init_runtime()`` without a target: the same graph, emulated on this
CPU in fp16) against ONNX Runtime CPU on the bundle's ONNX graph (``runtime.engines.checks.parity``:
embedding cosine >= the fp16 bar, token fates and CLS rows recorded). A failing graph is not
kept; a passing one is moved into the bundle and recorded in ``engines`` (``format`` "rknn",
target, toolkit version, output order, the layers RKNN placed on the CPU, parity), the manifest
written atomically.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from vlm_export.core.atomic import atomic_write_bytes
from vlm_export.core.errors import UserError
from vlm_export.core.json_text import dumps
from vlm_export.core.manifest import MANIFEST_NAME, RKNN_ENGINE_FORMAT, file_record, read_manifest
from vlm_export.core.optional_import import import_optional
from vlm_export.export.bundle.staging import (
    _refuse_listed,
    _staging,
    move_into_bundle,
    record_engine,
)
from vlm_export.export.progress import Progress
from vlm_export.runtime.engines.backends.rknn_backend import RknnBackend
from vlm_export.runtime.engines.base import BundleGraph
from vlm_export.runtime.engines.checks import parity as engine_parity

#: the SoCs build-rknn converts for (the ones whose simulator parity was measured)
TARGETS = ("rk3588",)
PRECISION = "fp16"
TOOLKIT_HINT = (
    "rknn-toolkit2 is not installed: pip install Rockchip's rknn-toolkit2 wheel (x86-64 Linux) "
    "in a venv of its own, with --no-deps if its torch pin would replace yours (docs/rockchip.md)"
)
#: a layer row of the toolkit's verbose build log: id, op type, data type, target (CPU/NPU)
_LAYER_ROW = re.compile(r"^D RKNN: \[[^\]]*\] +(\d+) +(\w+) +\w+ +(CPU|NPU) ")
#: the ends of the graph, placed on the CPU by definition
_IO_OPS = frozenset({"InputOperator", "OutputOperator"})


class RknnToolkitMissing(UserError):
    """rknn-toolkit2 is not installed (or cannot be imported)."""


class RknnBuildError(UserError):
    """rknn-toolkit2 refused the graph; the message carries its error lines."""


@dataclass(frozen=True)
class RknnRecord:
    """An RKNN graph of the bundle, as its ``engines`` record (see core.manifest)."""

    file: str
    target: str
    toolkit_version: str
    outputs: list[str]
    cpu_ops: dict[str, int]
    sha256: str
    nbytes: int
    parity: dict[str, Any]
    precision: str = PRECISION

    def to_manifest(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "format": RKNN_ENGINE_FORMAT,
            "target": self.target,
            "precision": self.precision,
            "toolkit_version": self.toolkit_version,
            "outputs": self.outputs,
            "cpu_ops": self.cpu_ops,
            "origin": "built",
            "built_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sha256": self.sha256,
            "bytes": self.nbytes,
            "parity": self.parity,
        }


def import_toolkit() -> tuple[Any, str]:
    """rknn-toolkit2's ``RKNN`` class and version; RknnToolkitMissing when it is not there."""
    api = import_optional("rknn.api", "rknn-toolkit2", TOOLKIT_HINT, RknnToolkitMissing)
    try:
        version = metadata.version("rknn-toolkit2")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return api.RKNN, version


def rknn_file_name(onnx_name: str, target: str) -> str:
    """``image_encoder.rk3588.fp16.rknn`` for ``image_encoder.onnx``."""
    return f"{Path(onnx_name).stem}.{target}.{PRECISION}.rknn"


def check_target(target: str) -> str:
    """``target`` when build-rknn converts for it; UserError otherwise."""
    if target not in TARGETS:
        raise UserError(f"unknown RKNN target {target!r} (choose from {', '.join(TARGETS)})")
    return target


@contextlib.contextmanager
def _output_to(log_path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2: the toolkit's C++ and
    Python logs, when sys.stdout is the process's) to a file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError, OSError):
                sys.stdout.flush()
                sys.stderr.flush()
            _flush_c_streams()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _flush_c_streams() -> None:
    """Flush the C library's stdio buffers: the toolkit's C++ log is buffered when it goes to a
    file, and must reach the file before the file is read (and before stdout is restored)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)


def cpu_ops(log_text: str) -> dict[str, int]:
    """The op types (and how many layers of each) the verbose build log places on the CPU."""
    layers = {}  # by layer id: a log read twice counts each layer once
    for line in log_text.splitlines():
        found = _LAYER_ROW.match(_plain(line))
        if found and found.group(3) == "CPU" and found.group(2) not in _IO_OPS:
            layers[int(found.group(1))] = found.group(2)
    return dict(sorted(Counter(layers.values()).items()))


def error_lines(log_text: str, limit: int = 3) -> str:
    """The toolkit's first ``E`` lines, joined (what it says when it refuses a graph)."""
    found = [_plain(line).strip() for line in log_text.splitlines()]
    errors = [line for line in found if line.startswith("E ")]
    return "; ".join(errors[:limit]) or "no error line in its log"


def _printed(log_path: Path) -> Path:
    """Where the toolkit's printed output (its C++ library's log among it) goes."""
    return log_path.with_name(log_path.name + ".out")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _plain(line: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", line)


def graph_outputs(onnx_path: Path) -> list[str]:
    """The ONNX graph's output names in graph order (the order RKNN returns them in)."""
    import onnx  # a dependency of rknn-toolkit2

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [output.name for output in model.graph.output]


def convert(onnx_path: Path, rknn_path: Path, target: str, log_path: Path) -> Any:
    """Convert ``onnx_path`` for ``target`` (fp16), write ``rknn_path``, start the simulator.

    Returns the toolkit's RKNN object, ready to infer in the simulator (the caller releases it).
    The toolkit writes its verbose log to ``log_path`` and anything else it prints to
    ``log_path`` + ``.out``; RknnBuildError carries the error lines of both.
    """
    rknn_class, _ = import_toolkit()
    with _output_to(_printed(log_path)):
        rknn = rknn_class(verbose=True, verbose_file=str(log_path))
        steps = (
            ("configure", lambda: rknn.config(target_platform=target)),
            ("load", lambda: rknn.load_onnx(model=str(onnx_path))),
            ("build", lambda: rknn.build(do_quantization=False)),
            ("write", lambda: rknn.export_rknn(str(rknn_path))),
            ("simulate", lambda: rknn.init_runtime()),
        )
        failed = None
        for name, step in steps:
            try:
                status = step()
            except Exception as exc:  # the toolkit raises plain exceptions on bad graphs
                failed = f"{name} {onnx_path.name} ({' '.join(str(exc).split())[:200]})"
                break
            if status not in (0, None):
                failed = f"{name} {onnx_path.name} (status {status})"
                break
        if failed is not None:
            rknn.release()
    if failed is not None:
        log = _read(log_path) + "\n" + _read(_printed(log_path))
        raise RknnBuildError(f"rknn-toolkit2 could not {failed}: {error_lines(log)}")
    return rknn


def simulator_parity(
    bundle_dir: Path, manifest: dict[str, Any], simulator: Any, outputs: list[str], name: str
) -> dict[str, Any]:
    """The simulator against ONNX Runtime CPU on the same inputs; EngineParityError on failure."""
    graph = BundleGraph(bundle_dir, manifest)
    with contextlib.ExitStack() as stack:
        engine = RknnBackend(graph, simulator, outputs, "rknn-toolkit2 simulator", PRECISION)
        reference = engine_parity.open_reference(bundle_dir, manifest)
        stack.callback(reference.close)
        try:
            report = engine_parity.compare_backends(engine, reference, manifest, PRECISION)
        except RuntimeError as exc:  # the simulator failed on the inputs
            raise engine_parity.EngineParityError(
                f"{name} was not added to the bundle: running it in the simulator failed "
                f"({' '.join(str(exc).split())[:300]})"
            ) from None
    if not report["passed"]:
        raise engine_parity.EngineParityError(
            f"{name} was not added to the bundle: in the simulator it differs from "
            f"{engine_parity.REFERENCE}: {engine_parity.describe(report)}"
        )
    return report


def add_rknn_to_bundle(
    bundle_dir: str | Path,
    target: str = "rk3588",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> RknnRecord:
    """Convert the bundle's image graph for ``target``, check it in the simulator, record it.

    ``progress`` (two steps: convert, compare) reports the work once the inputs are checked. A
    graph of the same name already listed is replaced only with ``overwrite``; a failing one
    leaves the bundle as it was.
    """
    progress = progress or Progress(2, quiet=True)
    bundle_dir = Path(bundle_dir)
    check_target(target)
    _, version = import_toolkit()
    manifest = read_manifest(bundle_dir)
    onnx_path = bundle_dir / manifest["engine"]["onnx"]
    name = rknn_file_name(onnx_path.name, target)
    _refuse_listed(bundle_dir, manifest, name, overwrite, "rebuild")
    outputs = graph_outputs(onnx_path)
    with _staging(bundle_dir) as staging:
        staged, log_path = staging / name, staging / "rknn-toolkit2.log"
        progress.step(f"converting {onnx_path.name} for {target} with rknn-toolkit2 {version}")
        simulator = convert(onnx_path, staged, target, log_path)
        try:
            on_cpu = cpu_ops(_read(log_path) + "\n" + _read(_printed(log_path)))
            progress.done(f"{PRECISION}, {sum(on_cpu.values())} layers on the CPU")
            progress.step(f"comparing with {engine_parity.REFERENCE} in the toolkit's simulator")
            with _output_to(log_path.with_name("simulator.out")):
                report = simulator_parity(bundle_dir, manifest, simulator, outputs, name)
        finally:
            with _output_to(log_path.with_name("release.out")):
                simulator.release()
        progress.done(engine_parity.describe(report))
        copied = file_record(staged)
        record = RknnRecord(
            file=name,
            target=target,
            toolkit_version=version,
            outputs=outputs,
            cpu_ops=on_cpu,
            sha256=copied["sha256"],
            nbytes=copied["bytes"],
            parity=report,
        )
        move_into_bundle(staged, bundle_dir, name, record.sha256)
        manifest = record_engine(manifest, record)
        text = dumps(manifest, indent=2) + "\n"
        atomic_write_bytes(bundle_dir / MANIFEST_NAME, text.encode("utf-8"))
    return record
