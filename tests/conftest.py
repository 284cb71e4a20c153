"""Shared fixtures: the tiny registered test CLIP (random weights), loaded once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may wait on the network


@pytest.fixture(scope="session")
def tiny_clip():
    torch = pytest.importorskip("torch")
    from vlm_export.models.loading import TEST_MODEL, load_clip

    torch.manual_seed(0)
    return load_clip(TEST_MODEL, "none")
