"""Glob patterns matched without ``glob.glob``'s recursive walk, which follows every symbolic link
again: two links to ``.`` make it exponential (and a link loop endless)."""

from __future__ import annotations

import fnmatch
import glob
import os
from pathlib import Path

GLOB_CHARS = "*?["


def glob_files(pattern: str) -> list[Path]:
    """The paths matching ``pattern``; a ``**`` pattern visits each folder once by its real
    path."""
    if "**" not in pattern:
        return [Path(name) for name in glob.glob(pattern)]
    return _walk_glob(pattern)


def _segments_match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """glob's rules for one relative path: ``**`` is any number of folders, other wildcards stay
    inside one name, and a wildcard does not match a leading dot."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        if _segments_match(parts, pattern[1:]):
            return True
        return bool(parts) and not parts[0].startswith(".") and _segments_match(parts[1:], pattern)
    if not parts or (parts[0].startswith(".") and not pattern[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], pattern[0]) and _segments_match(parts[1:], pattern[1:])


def _walk_glob(pattern: str) -> list[Path]:
    """A ``**`` pattern's matches, each folder visited once by its real path (``glob.glob``
    follows every symbolic link again: two links to ``.`` make its walk exponential)."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
    root, rest = Path(*parts[:fixed]) if fixed else Path(), parts[fixed:]
    found, visited = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders.clear()
            continue
        visited.add(real)
        relative = Path(folder).relative_to(root).parts
        found += [Path(folder, name) for name in names if _segments_match((*relative, name), rest)]
    return found
