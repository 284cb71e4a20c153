"""Write a bundle folder atomically: files into a temporary folder, hashes, manifest, rename."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core.atomic import atomic_directory, check_can_create
from vlm_export.core.errors import UserError
from vlm_export.core.manifest import MANIFEST_NAME, file_record, validate_manifest


class OutputExistsError(UserError):
    """The output folder exists and --overwrite was not given."""


def check_output_folder(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless overwriting; return the resolved path."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out_dir} exists; pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"output path {out_dir} exists and is not a folder")
    check_can_create(out_dir, folder=True)
    return out_dir


def write_json(path: Path, data: Any) -> None:
    """Pretty, stable JSON (sorted keys are not used: the manifest reads top-down)."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_array(path: Path, array: np.ndarray) -> None:
    """A .npy file that loads with allow_pickle=False."""
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)


def write_bundle(
    out_dir: str | Path, overwrite: bool, populate: Callable[[Path], dict[str, Any]]
) -> Path:
    """Create a bundle: ``populate(folder)`` writes every file and returns the manifest without
    ``files``; the sha256 and size of each file are added, the manifest is validated and written
    last, and the folder is renamed into place. On any error nothing is left at ``out_dir``.
    """
    out_dir = check_output_folder(out_dir, overwrite)
    try:
        return _write(out_dir, overwrite, populate)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UserError(f"could not write the bundle {out_dir}: {reason}") from None


def _write(out_dir: Path, overwrite: bool, populate: Callable[[Path], dict[str, Any]]) -> Path:
    with atomic_directory(out_dir, overwrite=overwrite) as folder:
        manifest = populate(folder)
        manifest["files"] = {
            path.name: file_record(path)
            for path in sorted(folder.iterdir())
            if path.is_file() and path.name != MANIFEST_NAME
        }
        validate_manifest(manifest)
        write_json(folder / MANIFEST_NAME, manifest)
    return out_dir
