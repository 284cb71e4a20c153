"""Subcommands of ``vlm-edge``, one module each (protocol: see ``vlm_export.runtime.cli``).

Helpers shared by the commands live here.
"""

from __future__ import annotations

import sys


def status(message: str) -> None:
    """One line on stderr, prefixed with the program name."""
    print(f"vlm-edge: {message}", file=sys.stderr, flush=True)


def format_bytes(size: float) -> str:
    """A byte count in B, KB, MB or GB (powers of 1024)."""
    units = ("B", "KB", "MB", "GB")
    index = 0
    while size >= 1024 and index < len(units) - 1:
        size /= 1024
        index += 1
    return f"{size:.0f} B" if index == 0 else f"{size:.1f} {units[index]}"
