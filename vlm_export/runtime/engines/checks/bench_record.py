"""What ``vlm-edge bench`` measured on this device, kept beside the bundle for ``--backend auto``.

The record is ``bench.<device fingerprint>.json`` in the bundle folder: one file per device kind
(CPU model, core count, instruction sets that decide which precisions run fast), so a bundle
copied to another device does not reuse this device's choice. ``best_recorded`` is the fastest
backend and precision that passed parity against the fp32 ONNX Runtime reference. It times the
image engine alone, so a record stays this bundle's when only its classes change (``vlm-edge
classes``): it names the engine it timed (``engine``, the bundle's ``engine_fingerprint``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm_export.core.atomic import atomic_write_bytes
from vlm_export.core.errors import UserError
from vlm_export.core.json_input import read_json

if TYPE_CHECKING:
    from vlm_export.runtime.bundle import Bundle

RECORD_FORMAT = "vlm-edge-bench"
MAX_RECORD_BYTES = 1 << 20  # a record holds a few dozen result rows
#: CPU flags that change which precision is fastest
RELEVANT_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "asimddp",
)


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            present = set(value.split())
            flags = [flag for flag in RELEVANT_FLAGS if flag in present]
    return model, flags


def device_fingerprint() -> str:
    """A short id of this device kind: machine, CPU model, core count, relevant CPU flags."""
    model, flags = _cpu_model_and_flags()
    key = [platform.machine(), model, os.cpu_count(), flags]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]


def device_description() -> str:
    """The device in words (for the record and the table)."""
    model, flags = _cpu_model_and_flags()
    return f"{model}, {os.cpu_count()} cores, {'/'.join(flags) or 'no listed SIMD flags'}"


def record_path(bundle_dir: str | Path, fingerprint: str | None = None) -> Path:
    """``bench.<fingerprint>.json`` in the bundle folder."""
    return Path(bundle_dir) / f"bench.{fingerprint or device_fingerprint()}.json"


def write_record(bundle_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write the bench record of this device atomically; returns its path."""
    path = record_path(bundle_dir, record.get("device_fingerprint"))
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    return path


@dataclass(frozen=True)
class RecordedChoice:
    """The fastest passing backend/precision of this device's bench record, and why."""

    backend: str
    precision: str
    reason: str


def times_this_engine(record: object, bundle: Bundle) -> bool:
    """Whether ``record`` is a bench record of ``bundle``'s image engine: by the engine it names,
    or (records written before they named it) by the bundle fingerprint."""
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return False
    if "engine" in record:
        return record["engine"] == bundle.engine_fingerprint
    return record.get("bundle") == bundle.fingerprint


def read_record(bundle: Bundle) -> dict[str, Any] | None:
    """This device's bench record of ``bundle``'s image engine, or None (none, or another's)."""
    try:
        record = read_json(record_path(bundle.path), MAX_RECORD_BYTES)
    except UserError:  # none yet, or not one this tool wrote: benchmarks will write a new one
        return None
    return record if times_this_engine(record, bundle) else None


def _finite(value: object) -> float | None:
    """A finite number >= 0 from a record (JSON may hold anything there), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer literal beyond float
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _named(row: dict[str, Any]) -> bool:
    return isinstance(row.get("backend"), str) and isinstance(row.get("precision"), str)


def best_recorded(
    bundle: Bundle,
    backends: Collection[str] | None = None,
    precisions: Collection[str] | None = None,
) -> RecordedChoice | None:
    """The fastest result that passed parity, from this device's record of the bundle's engine.

    Rows a record cannot mean (no backend, a median that is not a positive finite number, a
    backend or precision not among ``backends`` / ``precisions`` when given) are left out, as
    are records whose results are not a list."""
    record = read_record(bundle)
    results = record.get("results") if record is not None else None
    if not isinstance(results, list):
        return None
    passed = [
        (median, row)
        for row in results
        if isinstance(row, dict)
        and row.get("passed") is True
        and _named(row)
        and (backends is None or row["backend"] in backends)
        and (precisions is None or row["precision"] in precisions)
        for median in [_finite(row.get("median_ms"))]
        if median
    ]
    if not passed:
        return None
    median, best = min(passed, key=lambda pair: pair[0])
    reference = next(
        (m for m, row in passed if (row["backend"], row["precision"]) == ("onnxruntime", "fp32")),
        None,
    )
    versus = f", onnxruntime fp32 {reference:.1f} ms" if reference else ""
    name = record_path(bundle.path).name
    reason = f"fastest that passed parity in {name}: {median:.1f} ms median{versus}"
    return RecordedChoice(best["backend"], best["precision"], reason)


def ladder_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The rung timings of a bench record that can be used: a rung number, a backend, a
    precision and a finite ``p90_ms`` (as a float); anything else in ``ladder`` is left out."""
    rows = record.get("ladder")
    if not isinstance(rows, list):
        return []
    usable = []
    for row in rows:
        if not isinstance(row, dict) or not _named(row):
            continue
        rung, p90 = row.get("rung"), _finite(row.get("p90_ms"))
        if type(rung) is int and rung >= 0 and p90 is not None:
            usable.append({**row, "p90_ms": p90})
    return usable


def recorded_rungs(
    bundle: Bundle, backend: str, precision: str = "fp32"
) -> list[dict[str, Any]] | None:
    """This device's recorded rung timings of a ladder bundle for one backend, in rung order
    (rungs 0, 1, ... each once); None when ``vlm-edge bench`` recorded none (no record, another
    engine, no such backend, or rows that do not name each rung once)."""
    record = read_record(bundle)
    if record is None:
        return None
    engine = (backend, precision)
    rows = [row for row in ladder_rows(record) if (row["backend"], row["precision"]) == engine]
    rows.sort(key=lambda row: row["rung"])
    if [row["rung"] for row in rows] != list(range(len(rows))):
        return None
    return rows or None
