"""core/memory.py: available memory and refusing sizes that do not fit before allocating."""

from __future__ import annotations

import pytest

from vlm_export.core import memory
from vlm_export.core.errors import UserError


def test_available_bytes_is_positive_and_at_most_meminfo():
    available = memory.available_bytes()
    assert available is not None and available > 0
    meminfo = memory._meminfo_available()
    if meminfo is not None:
        assert available <= meminfo


def test_meminfo_parsed_in_kilobytes(tmp_path, monkeypatch):
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:  2000 kB\nMemFree:  100 kB\nMemAvailable:  1500 kB\n")
    monkeypatch.setattr(memory, "_MEMINFO", fake)
    assert memory._meminfo_available() == 1500 * 1024


def test_cgroup_limit_lowers_available(tmp_path, monkeypatch):
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("1000000\n")
    usage.write_text("400000\n")
    monkeypatch.setattr(memory, "_CGROUP_FILES", ((limit, usage),))
    assert memory._cgroup_available() == 600000
    assert memory.available_bytes() == 600000
    limit.write_text("max\n")  # cgroup v2 spelling of "no limit"
    assert memory._cgroup_available() is None


def test_format_bytes():
    assert memory.format_bytes(512) == "512 B"
    assert memory.format_bytes(7_300_000_000) == "7.3 GB"
    assert memory.format_bytes(1500) == "1.5 kB"


def test_largest_fitting_matches_a_literal_scan():
    def cost(n: int) -> int:
        return 100 + 7 * n * n

    for budget in (0, 99, 100, 107, 1000, 123456):
        literal = max([n for n in range(0, 200) if n == 0 or cost(n) <= budget])
        assert memory.largest_fitting(cost, budget, 199) == literal


def test_require_memory_names_a_value_that_fits():
    def cost(capacity: int) -> int:
        return capacity * 1_000_000_000

    with pytest.raises(UserError) as info:
        memory.require_memory(
            "TCA reservoir",
            cost(8),
            fits=lambda avail: memory.capacity_hint("--capacity", cost, avail, 8),
            available=5_100_000_000,
        )
    assert str(info.value) == "TCA reservoir needs 8.0 GB, 5.1 GB available; --capacity 5 fits"
    memory.require_memory("small", 10, available=10)  # fits exactly: no error


def test_capacity_hint_when_nothing_fits():
    assert memory.capacity_hint("--capacity", lambda n: n * 10, 5, 100) == (
        "even --capacity 1 does not fit"
    )
