"""Memory the machine can still give, and refusing a size that will not fit before allocating it.

``available_bytes`` is the smaller of the kernel's MemAvailable and what the cgroup (container)
limit leaves; ``require_memory`` raises a one-line UserError such as
"TCA reservoir needs 7.3 GB, 5.1 GB available; --capacity 4 fits".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from vlm_export.core.errors import UserError

_MEMINFO = Path("/proc/meminfo")
# cgroup v2 (unified) and v1 memory controllers, as mounted inside a container
_CGROUP_FILES = (
    (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
    (
        Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
        Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ),
)
# a cgroup "limit" at or above this is the kernel's way of saying "no limit"
_NO_LIMIT = 1 << 60


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    try:
        lines = _MEMINFO.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                unit = 1024 if fields[-1].lower() == "kb" else 1
                return int(fields[1]) * unit
    return None


def _cgroup_available() -> int | None:
    for limit_file, usage_file in _CGROUP_FILES:
        limit = _read_int(limit_file)
        if limit is None or limit >= _NO_LIMIT:
            continue
        usage = _read_int(usage_file) or 0
        return max(limit - usage, 0)
    return None


def _sysconf_available() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes() -> int | None:
    """Bytes this process may still allocate: min(MemAvailable, cgroup limit - usage).

    None when the machine says nothing (then nothing is refused).
    """
    known = [value for value in (_meminfo_available(), _cgroup_available()) if value is not None]
    return min(known) if known else _sysconf_available()


def format_bytes(count: float) -> str:
    """A byte count for people: "512 B", "7.3 MB", "1.8 GB" (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(count) < 1000 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def largest_fitting(cost: Callable[[int], int], budget: int, upper: int) -> int:
    """The largest n in 1..upper with cost(n) <= budget (cost growing with n); 0 if none fits."""
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        if cost(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def require_memory(
    what: str,
    needed: int,
    fits: Callable[[int], str] | None = None,
    available: int | None = None,
) -> None:
    """Raise UserError when ``needed`` bytes exceed what is available.

    ``what`` names the allocation ("TCA reservoir"); ``fits(available)`` returns the hint that names
    a value that fits ("--capacity 4 fits"). ``available`` defaults to ``available_bytes()``.
    """
    if available is None:
        available = available_bytes()
    if available is None or needed <= available:
        return
    message = f"{what} needs {format_bytes(needed)}, {format_bytes(available)} available"
    if fits is not None:
        message += f"; {fits(available)}"
    raise UserError(message)


def capacity_hint(
    option: str, cost: Callable[[int], int], available: int, upper: int, minimum: int = 1
) -> str:
    """ "--capacity 4 fits" for the largest value of ``option`` whose cost fits ``available``.

    Says that nothing fits when even ``minimum`` does not.
    """
    largest = largest_fitting(cost, available, upper)
    if largest < minimum:
        return f"even {option} {minimum} does not fit"
    return f"{option} {largest} fits"
