"""What the benchmarks share: the machine a result was measured on, interleaved timing rounds,
and the results they write (JSON, and PNG plots with matplotlib, the optional ``[plot]`` extra).

Without matplotlib the benchmarks still run and save their JSON; the plot is skipped with a note.
Times from a shared or busy machine are compared as ratios within one run, never across runs;
``machine()`` records what the numbers were measured on.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from vlm_export.core.atomic import atomic_file, atomic_write_bytes
from vlm_export.runtime.engines.checks.bench_record import device_description

#: the repository root, and the folder the benchmarks write their results to
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict[str, Any]:
    """The machine in a result: platform, Python, CPU count, and the CPU with its SIMD flags (the
    ones that change which precision is fastest)."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu": device_description(),
    }


def interleaved_rounds(
    runners: Mapping[Hashable, Callable[[], object]],
    rounds: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
    flip: bool = False,
) -> dict[Hashable, list[float]]:
    """Milliseconds of each runner, timed in turn round after round, so that a change in the
    machine's load slows them alike. The first ``warmup`` rounds run but are not kept. With
    ``flip`` every other round runs them in the reverse order; ``sync`` (a GPU's) is called
    before and after each timed run."""
    order = list(runners)
    times: dict[Hashable, list[float]] = {name: [] for name in order}
    for round_index in range(warmup + rounds):
        for name in order if not flip or round_index % 2 == 0 else order[::-1]:
            if sync is not None:
                sync()
            start = time.perf_counter()
            runners[name]()
            if sync is not None:
                sync()
            if round_index >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def wall_and_cpu_seconds(run: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all its threads) of one call of ``run``."""
    start, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - start, time.process_time() - cpu


def medians(times: Mapping[Hashable, list[float]]) -> dict[Hashable, float]:
    """The median of each runner's times."""
    return {name: statistics.median(values) for name, values in times.items()}


def write_json(path: Path, report: Any, indent: int | None = 2, **options: Any) -> None:
    """Write ``report`` as JSON (one line's end after it) atomically, its folder made, and say
    where. ``options`` go to ``json.dumps`` (``separators``, ``ensure_ascii``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=indent, **options) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    print(f"wrote {_shown(path)}")


def pyplot() -> ModuleType | None:
    """matplotlib.pyplot on the file-only Agg backend, or None (with a note) if not installed."""
    try:
        import matplotlib
    except ImportError:
        print('no plot: matplotlib is not installed (pip install ".[plot]")')
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(figure: Any, path: Path) -> None:
    """Write ``figure`` (a matplotlib Figure) as a PNG atomically, close it, and say where."""
    with atomic_file(path) as handle:
        figure.savefig(handle, format="png", dpi=120, bbox_inches="tight")
    figure.clear()
    print(f"wrote {_shown(path)}")


def _shown(path: Path) -> str:
    """``path`` from the repository root where it lies inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)
