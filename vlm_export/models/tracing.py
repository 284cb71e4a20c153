"""Run open_clip blocks on their plain attention path, for tracing and FLOP counting."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextlib.contextmanager
def plain_attention() -> Iterator[None]:
    """Turn off nn.MultiheadAttention's fused inference fast path and fused SDPA kernels.

    Both are single opaque ops: the ONNX exporter cannot translate the fast path, and torch's FLOP
    counter counts neither. The plain path (linear + math attention) computes the same result.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
