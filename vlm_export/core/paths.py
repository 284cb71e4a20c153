"""One guard for every command: no output may be, or lie inside, what the run reads.

A command names what it reads and what it writes, each with a role (the option that names it).
Command-line tools declare it on their parsers: an option whose argparse ``type`` is a
:class:`PathArg` says what kind of path it is, and :func:`guard_arguments` checks every declared
path of the parsed arguments before any work, so an option added later is guarded by declaring
it. The rules (``check_paths``), after symbolic links and with hard links compared by device and
inode:

- an output may not be an input of another role, nor lie inside an input folder (a bundle, a
  source, image or dataset folder); a file both read and written under one role (``--state``:
  resumed, then saved) is allowed;
- a folder replaced as a whole (``folder_writes``) may not hold an input; a folder written into
  (``into``: pictures, annotated frames) may not directly hold an input (it would write among
  them);
- two outputs may not be one path, nor one inside the other;
- a file output is new, a regular file, or a character device or FIFO (written through, never
  replaced: ``/dev/null``); a folder output is new or a folder; a state (read back, then
  replaced) is new or a regular file. A socket, a block device, a link loop is refused
  (``vlm_export.core.special_files``). A command line's file outputs must also be creatable
  (``check_can_create``), so that a read-only place is said before the work, not after it.

Writing into a bundle is for the commands whose job it is (``classes``, ``quantize``,
``build-engine``: kind ``bundle-rw``); they refuse a bundle whose manifest or files are symbolic
links to outside it (``check_bundle_links``), whose rewrite would replace another file. Hard links
need no refusal there: a bundle write renames a new file over the name, never writes into the
shared file.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_export.core.atomic import check_can_create, final_target, report_interrupted_first_save
from vlm_export.core.errors import UserError, shown, shown_path
from vlm_export.core.globbing import GLOB_CHARS, glob_files
from vlm_export.core.special_files import check_output, check_regular, is_stream

log = logging.getLogger(__name__)

#: kinds of PathArg: read (file, tree, source, bundle-rw), written (out, into, folder), both (state)
READ_KINDS = ("file", "tree", "source", "bundle-rw")
WRITE_KINDS = ("out", "into", "folder", "state")


class PathConflict(UserError):
    """An output path names a file or folder the run reads (or another output)."""


@dataclass(frozen=True)
class _Place:
    role: str
    shown: str
    real: Path
    ident: tuple[int, int] | None
    folder: bool
    stream: bool = False  # a character device or FIFO: written through, may take two outputs

    @classmethod
    def of(cls, role: str, path: str | Path, folder: bool = False) -> _Place:
        real = final_target(path)
        try:
            info = os.stat(real)
        except OSError:
            return cls(role, shown_path(path), real, None, folder, is_stream(path))
        ident = (info.st_dev, info.st_ino)
        return cls(role, shown_path(path), real, ident, folder or real.is_dir(), is_stream(path))

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
    into: Iterable[tuple[str, str | Path | None]] = (),
) -> None:
    """Refuse outputs that would replace, or land among, what the run reads (PathConflict).

    ``writes`` are files, ``folder_writes`` folders replaced as a whole (everything inside is
    lost), ``into`` folders that files are written into. Entries whose path is None or empty are
    skipped. Refuses (SpecialFileError) an output that is a socket, a block device, a link loop,
    or a folder where a file is written (``special_files.check_output``). Logs a warning for
    each file output whose first save was killed, after removing that save's temporary files.
    """
    writes = [(role, path) for role, path in writes if path]
    folder_writes = [(role, path) for role, path in folder_writes if path]
    into = [(role, path) for role, path in into if path]
    inputs = [_Place.of(role, path) for role, path in reads if path]
    outputs = [(_Place.of(role, path), "file") for role, path in writes]
    outputs += [(_Place.of(role, path, True), "folder") for role, path in folder_writes]
    outputs += [(_Place.of(role, path, True), "into") for role, path in into]
    for index, (out, kind) in enumerate(outputs):
        for place in inputs:
            if out.same(place) and (out.role != place.role or kind != "file"):
                _refuse(out, f"is {place.named()}, which this run reads")
            if place.holds(out):
                _refuse(out, f"is inside {place.named()}, which this run reads")
            if kind == "folder" and out.holds(place):
                _refuse(out, f"holds {place.named()}, which this run reads")
            if kind == "into" and out.real == place.real.parent and not place.folder:
                _refuse(out, f"holds {place.named()}: the outputs would land among the inputs")
        for other, _ in outputs[:index]:
            if out.stream and other.stream:
                continue  # /dev/null twice: nothing is replaced
            if out.same(other) or other.holds(out) or out.holds(other):
                _refuse(out, f"and {other.named()} are the same file")
    for role, path in writes:
        check_output(role, path)
    for role, path in [*folder_writes, *into]:
        check_output(role, path, folder=True)
    for role, path in writes:
        if line := report_interrupted_first_save(path):
            log.warning("%s: %s", role, line)


def _refuse(out: _Place, what: str) -> None:
    raise PathConflict(f"{out.named()} {what}: write it to another path")


def check_bundle_links(role: str, folder: str | Path) -> None:
    """Refuse a bundle that this command rewrites when an entry in it is a symbolic link to
    outside it (the manifest, a file): the rewrite would replace a file that is not the
    bundle's."""
    root = final_target(folder)
    try:
        entries = list(os.scandir(root))
    except OSError:
        return  # no folder: the command says so
    for entry in entries:
        if not entry.is_symlink():
            continue
        target = final_target(entry.path)
        if root not in target.parents:
            raise PathConflict(
                f"{role} {shown_path(folder)}: {shown(entry.name)} is a link to "
                f"{shown_path(target)}, "
                "outside the bundle; this command rewrites bundle files: copy the file into "
                "the bundle first"
            )


@dataclass(frozen=True)
class PathArg:
    """An argparse ``type`` that declares an option's value a path the run reads or writes.

    ``kind``: ``file`` (read), ``tree`` (a folder read with its files ``depth`` levels down
    that ``keep`` accepts; a bundle), ``source`` (a file, folder or glob of media files),
    ``bundle-rw`` (a bundle this command writes into), ``out`` (a file written), ``into`` (a
    folder written into, or the file a video source gives), ``folder`` (a folder replaced as a
    whole), ``state`` (read if it exists, then written). ``path_of`` picks the path out of the
    value (``NAME=FILE``); ``convert`` is what the option's value becomes (str or Path).
    """

    kind: str
    convert: Callable[[str], Any] = str
    depth: int = 1
    keep: Callable[[Path], bool] | None = None
    path_of: Callable[[str], str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in READ_KINDS + WRITE_KINDS:
            raise ValueError(f"unknown path kind {self.kind!r}")

    def __call__(self, text: str) -> Any:
        return self.convert(text)

    @property
    def __name__(self) -> str:  # argparse names the type in its "invalid value" message
        return self.kind


@dataclass
class DeclaredPaths:
    """What a parsed command line reads and writes, by role (``check`` applies the guard)."""

    reads: list[tuple[str, Path | str]]
    writes: list[tuple[str, Path | str]]
    into: list[tuple[str, Path | str]]
    folder_writes: list[tuple[str, Path | str]]
    bundles_written: list[tuple[str, Path | str]]
    states: list[tuple[str, Path | str]] = field(default_factory=list)

    def check(self) -> None:
        """Refuse conflicting, special or uncreatable outputs, states that are not regular
        files, and bundles written into that link outside."""
        check_paths(self.reads, self.writes, self.folder_writes, self.into)
        for role, path in self.states:
            check_regular(role, path)
        for role, path in self.writes:
            try:
                check_can_create(path)
            except UserError as exc:
                raise UserError(f"{role}: {exc}") from None
        for role, folder in self.bundles_written:
            check_bundle_links(role, folder)


def path_actions(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Iterator[Any]:
    """The parser's actions, and those of the chosen subcommand's parser (recursively)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if chosen is not None:
                yield from path_actions(chosen, args)
        else:
            yield action


def role_of(action: argparse.Action) -> str:
    """How messages name an option: its longest flag, or a positional's metavar."""
    if action.option_strings:
        return max(action.option_strings, key=len)
    return str(action.metavar or action.dest.upper())


def declared_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> DeclaredPaths:
    """Every path the parsed ``args`` name through options typed with a PathArg."""
    found = DeclaredPaths([], [], [], [], [])
    for action in path_actions(parser, args):
        spec = action.type
        value = getattr(args, action.dest, None)
        if not isinstance(spec, PathArg) or value is None:
            continue
        role = role_of(action)
        for item in value if isinstance(value, list) else [value]:
            path = spec.path_of(str(item)) if spec.path_of else str(item)
            if path:
                _declare(found, spec, role, path)
    return found


def _declare(found: DeclaredPaths, spec: PathArg, role: str, path: str) -> None:
    if spec.kind == "file":
        if os.path.lexists(path):
            found.reads.append((role, path))
    elif spec.kind in ("tree", "bundle-rw"):
        found.reads += tree_reads(role, path, spec.depth, spec.keep)
        if spec.kind == "bundle-rw":
            found.bundles_written.append((role, path))
    elif spec.kind == "source":
        found.reads += source_reads(role, path, spec.keep or (lambda _: True), spec.depth)
    elif spec.kind == "out":
        found.writes.append((role, path))
    elif spec.kind == "state":
        found.reads.append((role, path))
        found.writes.append((role, path))
        found.states.append((role, path))
    elif spec.kind == "into":
        found.into.append((role, path))
    else:
        found.folder_writes.append((role, path))


def guard_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check every declared path of a parsed command line (PathConflict on a conflict)."""
    declared_paths(parser, args).check()
