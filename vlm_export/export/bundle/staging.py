"""Writing into a bundle, never half-written: a staging folder inside the bundle, a file moved in
only once checked and then recorded, and what a killed run left behind (build-engine, register
and quantize share it).

The write guard's bundle argument (``BUNDLE_RW``) is here too: every command that writes into a
bundle takes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from vlm_export.core.atomic import WriteError, claim, is_claimed
from vlm_export.core.errors import BundleError, UserError
from vlm_export.core.manifest import read_manifest, sha256_file, verify_files
from vlm_export.core.paths import PathArg, check_bundle_links

#: a bundle a command writes into (the write guard refuses one that links outside)
BUNDLE_RW = PathArg("bundle-rw", Path)


#: staging folders in a bundle: ``.engine-`` and mkdtemp's 8 random characters
STAGING_PREFIX = ".engine-"
_STAGING_NAME = re.compile(rf"^{re.escape(STAGING_PREFIX)}[a-z0-9_]{{8}}$")
#: written into the staging folder just before its file moves into the bundle: {file, sha256}
INSTALLING = "installing.json"


@contextlib.contextmanager
def _staging(bundle_dir: Path) -> Iterator[Path]:
    """A temporary folder inside the bundle (same file system), removed with what it holds.

    After a successful block, staging folders that killed runs left (older than this one) are
    removed too: a kill leaves nothing that the next successful build, register or quantize
    does not remove. A run holds its own folder (``claim``): a concurrent run's clean-up
    leaves it alone.
    """
    check_bundle_links("bundle", bundle_dir)  # also for library callers (the CLI checked)
    started = time.time()
    try:
        folder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=bundle_dir))
    except OSError as exc:
        raise WriteError(f"cannot write into {bundle_dir}: {exc.strerror or exc}") from None
    held: int | None = None
    try:
        held = claim(folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if held is not None:
            os.close(held)
    for stale in stale_staging(bundle_dir, started):
        shutil.rmtree(stale, ignore_errors=True)


def check_bundle_intact(bundle_dir: Path) -> None:
    """Refuse to add to a bundle whose files do not match its manifest (size, sha256): what is
    built from a damaged file would be recorded as sound. Before any work."""
    manifest = read_manifest(bundle_dir)
    try:
        verify_files(bundle_dir, manifest)
    except BundleError as exc:
        raise BundleError(
            f"{bundle_dir}: {exc}; nothing was added (re-export the bundle or restore the file)"
        ) from None


def stale_staging(bundle_dir: Path, before: float) -> list[Path]:
    """Staging folders in ``bundle_dir`` last changed before ``before`` that no live run holds
    (killed runs')."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(bundle_dir):
            with contextlib.suppress(OSError):
                if (
                    _STAGING_NAME.match(entry.name)
                    and entry.is_dir(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime < before
                    and not is_claimed(Path(entry.path))
                ):
                    found.append(Path(entry.path))
    return sorted(found)


def move_into_bundle(staged: Path, bundle_dir: Path, name: str, sha256: str) -> None:
    """Move a checked file from its staging folder into the bundle under ``name``.

    ``installing.json`` in the staging folder names it first: a run killed before the manifest
    lists the file leaves that record, by which the next run knows the unlisted file as its
    own (``_left_by_killed_install``) and replaces it.
    """
    record = {"file": name, "sha256": sha256}
    try:
        (staged.parent / INSTALLING).write_text(json.dumps(record), encoding="utf-8")
        os.replace(staged, bundle_dir / name)
    except OSError as exc:
        raise WriteError(f"cannot write {bundle_dir / name}: {exc.strerror}") from None


def _left_by_killed_install(bundle_dir: Path, name: str) -> bool:
    """``name`` (unlisted) is the file a killed run moved in: a stale staging folder's
    ``installing.json`` names it with its sha256."""
    for folder in stale_staging(bundle_dir, time.time()):
        try:
            record = json.loads((folder / INSTALLING).read_text(encoding="utf-8"))
            if record.get("file") == name and record.get("sha256") == sha256_file(
                bundle_dir / name
            ):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def _refuse_listed(
    bundle_dir: Path,
    manifest: dict[str, Any],
    name: str,
    overwrite: bool,
    what: str,
    source: Path | None = None,
) -> None:
    """Refuse to replace a listed engine without ``overwrite``, and a file of that name that the
    manifest does not list at all (never ours to delete), unless it is ``source`` itself."""
    listed = any(entry.get("file") == name for entry in manifest.get("engines") or [])
    if listed and not overwrite:
        raise UserError(f"{name} is already in the bundle; pass --overwrite to {what} it")
    target = bundle_dir / name
    if listed or not os.path.lexists(target):
        return
    if source is not None and target.exists() and os.path.samefile(source, target):
        return
    if not target.is_symlink() and _left_by_killed_install(bundle_dir, name):
        target.unlink()  # a killed run's own file, never listed: replaced by this run
        return
    raise UserError(
        f"{target} exists but the bundle's manifest does not list it; move it away first "
        "(it is not replaced)"
    )


class EngineRecord(Protocol):
    """What every engine record of a bundle has (TensorRT engines, INT8 graphs, ...)."""

    @property
    def file(self) -> str: ...

    @property
    def sha256(self) -> str: ...

    @property
    def nbytes(self) -> int: ...

    def to_manifest(self) -> dict[str, Any]: ...


def record_engine(manifest: dict[str, Any], record: EngineRecord) -> dict[str, Any]:
    """Add ``record`` to ``engines`` (replacing an entry of that file) and to ``files``."""
    engines = [entry for entry in manifest.get("engines") or [] if entry.get("file") != record.file]
    manifest["engines"] = [*engines, record.to_manifest()]
    manifest["files"][record.file] = {"sha256": record.sha256, "bytes": record.nbytes}
    return manifest
