"""PNG plots beside the benchmarks' JSON, with matplotlib (the optional ``[plot]`` extra).

Without matplotlib the benchmarks still run and save their JSON; the plot is skipped with a note.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from vlm_export.core.atomic import atomic_file


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


def save(figure, path: Path) -> None:  # noqa: ANN001 - a matplotlib Figure
    """Write ``figure`` as a PNG atomically and close it."""
    with atomic_file(path) as handle:
        figure.savefig(handle, format="png", dpi=120, bbox_inches="tight")
    figure.clear()
    print(f"saved {path}")
