"""Write a bundle folder atomically: files into a temporary folder, hashes, manifest, rename."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.atomic import TEMP_MARK, atomic_directory, check_can_create
from vlm_export.core.errors import UserError
from vlm_export.core.json_text import dumps
from vlm_export.core.manifest import FORMAT, MANIFEST_NAME, file_record, validate_manifest


class OutputExistsError(UserError):
    """The output folder exists and --overwrite was not given."""


def _ours(name: str, listed: set[str]) -> bool:
    """A name a bundle folder may hold: a listed file, the manifest, our temporary files."""
    return (
        name in listed or name == MANIFEST_NAME or TEMP_MARK in name or name.startswith(".engine-")
    )


def _foreign_entries(out_dir: Path) -> list[str]:
    """What in ``out_dir`` is not part of a vlm-export bundle (all of it when there is no
    manifest with the bundle format marker); empty for an empty folder or a pure bundle."""
    try:
        names = sorted(os.listdir(out_dir))
    except OSError as exc:
        raise OutputExistsError(f"cannot read {out_dir}: {exc.strerror}") from None
    if not names:
        return []
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return names
        listed = set(manifest.get("files") or {})
    except (OSError, ValueError, RecursionError, TypeError):
        return names
    return [name for name in names if not _ours(name, listed)]


def check_output_folder(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless overwriting; return the resolved path.

    ``overwrite`` replaces only an empty folder or a vlm-export bundle (a manifest with the
    bundle format marker, and no file that its manifest does not list): any other folder is
    refused, so that --overwrite can never delete a user's files.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out_dir} exists; pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"output path {out_dir} exists and is not a folder")
    if out_dir.exists():
        foreign = _foreign_entries(out_dir)
        if foreign:
            shown = ", ".join(foreign[:3]) + (
                f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            )
            raise OutputExistsError(
                f"--overwrite replaces only a vlm-export bundle, and {out_dir} holds other files "
                f"({shown}); choose another --out"
            )
    check_can_create(out_dir, folder=True)
    return out_dir


def write_json(path: Path, data: Any) -> None:
    """Pretty, stable, strict JSON (sorted keys are not used: the manifest reads top-down)."""
    try:
        text = dumps(data, indent=2)
    except ValueError:
        raise UserError(f"not writing {path.name}: it would hold NaN or infinity") from None
    path.write_text(text + "\n", encoding="utf-8")


def write_array(path: Path, array: np.ndarray) -> None:
    """A .npy file that loads with allow_pickle=False."""
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)


def write_bundle(
    out_dir: str | Path,
    overwrite: bool,
    populate: Callable[[Path], dict[str, Any]],
    finish: Callable[[Path], None] | None = None,
    placed: Callable[[], None] | None = None,
) -> Path:
    """Create a bundle: ``populate(folder)`` writes every file and returns the manifest without
    ``files``; the sha256 and size of each file are added, the manifest is validated and written,
    ``finish(folder)`` may then add engines to the complete bundle (as build-engine and quantize
    add them to a written one), and the folder is renamed into place. On any error, in
    ``finish`` too, nothing is left at ``out_dir`` and a bundle it replaces is kept.
    ``placed()`` is called the moment the bundle stands at ``out_dir``.
    """
    out_dir = check_output_folder(out_dir, overwrite)
    try:
        return _write(out_dir, overwrite, populate, finish, placed)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UserError(f"could not write the bundle {out_dir}: {reason}") from None


def _write(
    out_dir: Path,
    overwrite: bool,
    populate: Callable[[Path], dict[str, Any]],
    finish: Callable[[Path], None] | None,
    placed: Callable[[], None] | None,
) -> Path:
    with atomic_directory(out_dir, overwrite=overwrite, placed=placed) as folder:
        manifest = populate(folder)
        manifest["files"] = {
            path.name: file_record(path)
            for path in sorted(folder.iterdir())
            if path.is_file() and path.name != MANIFEST_NAME
        }
        validate_manifest(manifest)
        write_json(folder / MANIFEST_NAME, manifest)
        if finish is not None:
            finish(folder)
    return out_dir
