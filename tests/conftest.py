"""Shared fixtures: the tiny registered test CLIP (random weights), loaded once per session."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile

import pytest
from ctrl_c import python_sigint

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may wait on the network
# bundle verification records (core.verified) go to a cache of this session, not the user's
os.environ["VLM_EXPORT_CACHE"] = tempfile.mkdtemp(prefix="vlm-test-cache-")
atexit.register(shutil.rmtree, os.environ["VLM_EXPORT_CACHE"], True)

#: the workstation side (torch, open_clip) is installed: not so in a device-only (.[cpu]) venv
EXPORTER = all(importlib.util.find_spec(name) for name in ("torch", "open_clip"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``exporter`` run vlm-export: skipped where only the device side is installed."""
    if EXPORTER:
        return
    skip = pytest.mark.skip(reason="needs the exporter: pip install '.[export]'")
    for item in items:
        if "exporter" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt in this test, as in a program started from a terminal,
    even when the test run started with SIGINT ignored (a background job)."""
    with python_sigint():
        yield


@pytest.fixture(scope="session")
def tiny_clip():
    torch = pytest.importorskip("torch")
    from vlm_export.models.loading import TEST_MODEL, load_clip

    torch.manual_seed(0)
    return load_clip(TEST_MODEL, "none")
