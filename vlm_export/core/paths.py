"""One guard for every command: no output may be a file or folder that the run reads.

A command names what it reads and what it writes, each with a role (the option that names it):
``check_paths(reads, writes)`` refuses, before any work, an output that is the same file as an
input of another role (after symbolic links, and hard links by device and inode), an output
that is an input folder, a folder output that holds an input, and two outputs that are one
file. A file both read and written under one role (``--state``: resumed, then saved) is
allowed. Folders are read as trees: ``tree_reads`` lists the files in them that the run reads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vlm_export.core.atomic import final_target, report_interrupted_first_save
from vlm_export.core.errors import UserError
from vlm_export.core.globbing import GLOB_CHARS, glob_files

log = logging.getLogger(__name__)


class PathConflict(UserError):
    """An output path names a file or folder the run reads (or another output)."""


@dataclass(frozen=True)
class _Place:
    role: str
    shown: str
    real: Path
    ident: tuple[int, int] | None
    folder: bool

    @classmethod
    def of(cls, role: str, path: str | Path) -> _Place:
        real = final_target(path)
        try:
            info = os.stat(real)
        except OSError:
            return cls(role, str(path), real, None, False)
        return cls(role, str(path), real, (info.st_dev, info.st_ino), os.path.isdir(real))

    def same(self, other: _Place) -> bool:
        """The same file or folder (by inode when both exist, else by resolved path)."""
        if self.ident is not None and other.ident is not None:
            return self.ident == other.ident
        return self.real == other.real

    def holds(self, other: _Place) -> bool:
        """``other`` lies inside this folder."""
        return self.folder and self.real in other.real.parents

    def named(self) -> str:
        return f"{self.role} {self.shown}"


def tree_reads(
    role: str, folder: str | Path, depth: int = 1, keep: Callable[[Path], bool] | None = None
) -> list[tuple[str, Path]]:
    """``folder`` and the files up to ``depth`` levels below it (those ``keep`` accepts)."""
    root = Path(folder)
    found: list[tuple[str, Path]] = [(role, root)]
    if not root.is_dir():
        return found
    base = len(root.parts)
    for current, dirs, files in os.walk(root, onerror=lambda _: None):
        level = len(Path(current).parts) - base
        if level + 1 >= depth:
            dirs.clear()
        for name in files:
            path = Path(current, name)
            if keep is None or keep(path):
                found.append((role, path))
    return found


def source_reads(
    role: str, spec: str, keep: Callable[[Path], bool], depth: int = 1
) -> list[tuple[str, Path]]:
    """What a source argument reads: a file, a folder's files, or a glob's matches."""
    path = Path(spec).expanduser()
    if path.exists():
        return tree_reads(role, path, depth, keep)
    if any(char in spec for char in GLOB_CHARS):
        return [(role, p) for p in glob_files(spec) if keep(p)]
    return []  # a camera, a stream URL, or nothing (the command says so)


def check_paths(
    reads: Iterable[tuple[str, str | Path | None]],
    writes: Iterable[tuple[str, str | Path | None]],
    folder_writes: Iterable[tuple[str, str | Path | None]] = (),
) -> None:
    """Refuse outputs that would replace what the run reads; PathConflict names the pair.

    ``writes`` are files, ``folder_writes`` folders replaced as a whole (everything inside is
    lost). Entries whose path is None are skipped. Logs a warning for each file
    output whose first save was killed, after removing that save's temporary files.
    """
    inputs = [_Place.of(role, path) for role, path in reads if path is not None]
    outputs = [_Place.of(role, path) for role, path in writes if path is not None]
    folders = [_Place.of(role, path) for role, path in folder_writes if path is not None]
    for index, out in enumerate(outputs + folders):
        is_folder = index >= len(outputs)
        for place in inputs:
            if out.same(place) and (out.role != place.role or is_folder):
                _refuse(out, f"is {place.named()}")
            if is_folder and out.holds(place):
                _refuse(out, f"holds {place.named()}, which this run reads")
        for other in (outputs + folders)[:index]:
            if out.same(other) or other.holds(out) or out.holds(other):
                _refuse(out, f"and {other.named()} are the same path")
    for role, path in writes:
        if path is not None and (line := report_interrupted_first_save(path)):
            log.warning("%s: %s", role, line)


def _refuse(out: _Place, what: str) -> None:
    if what.startswith("is "):
        what += ", which this run reads"
    raise PathConflict(f"{out.named()} {what}: write it to another path")
