"""Verify a bundle's files once and remember it: a record that re-hashes only what changed.

Hashing every file the manifest lists costs a read of the whole bundle (572 MB for ViT-B/16 with
its text engine) on every start. After a file has been hashed and found to match, its record
entry keeps what ``stat`` said of it then (size, mtime_ns, ctime_ns, inode, device) with the
sha256 it had. On the next start a file whose ``stat`` is unchanged and whose manifest sha256
equals the remembered one is not read again; anything else is hashed again. ``ctime`` cannot be
set back by a user (any write, rename, chmod or copy moves it), so a file changed in any ordinary
way is hashed again. What the record cannot see, a disk that flips bits under an unchanged
``stat``, is what ``full`` mode is for.

The record is kept in the user's cache folder (``verified/`` in $VLM_EXPORT_CACHE, else in
$XDG_CACHE_HOME/vlm-export or ~/.cache/vlm-export), one file per bundle folder (named from the
folder's real path, device and inode), not in the bundle: a read-only command leaves the bundle
byte for byte as vlm-export wrote it. It is trusted only if it is a regular file owned by this
user, well formed, and written for this very folder; anything else (damaged, foreign, a link) is
ignored and the files are hashed. A record that cannot be written (no home, read-only cache)
only means hashing on every start. Files changed within the last ``SETTLE_NS`` are hashed but not
remembered: a write in the same clock tick as the hash would leave the same ``stat``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_export.core.errors import BundleError, UserError
from vlm_export.core.manifest import sha256_file

#: how a bundle is verified: not at all, through the record, or every file hashed
VERIFY_MODES = ("off", "cached", "full")
RECORD_FORMAT = "vlm-export-verified"
RECORD_VERSION = 1
#: a file changed this recently is hashed but not remembered (2 s covers coarse clocks)
SETTLE_NS = 2_000_000_000
#: a record larger than this is not read (one entry is about 200 bytes)
MAX_RECORD_BYTES = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger(__name__)


@dataclass
class Verification:
    """What a verification did: files hashed now, files taken from the record."""

    hashed: list[str] = field(default_factory=list)
    remembered: list[str] = field(default_factory=list)


def verify_mode(verify: bool | str) -> str:
    """``True`` -> "cached", ``False`` -> "off", or one of VERIFY_MODES."""
    if verify is True:
        return "cached"
    if verify is False:
        return "off"
    if verify not in VERIFY_MODES:
        raise UserError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r:.80}")
    return str(verify)


def cache_folder() -> Path | None:
    """Where records are kept: $VLM_EXPORT_CACHE/verified, else $XDG_CACHE_HOME/vlm-export/
    verified, else ~/.cache/vlm-export/verified."""
    own = os.environ.get("VLM_EXPORT_CACHE")
    if own and os.path.isabs(own):
        return Path(own) / "verified"
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):
        home = os.path.expanduser("~")
        if not os.path.isabs(home):
            return None
        base = os.path.join(home, ".cache")
    return Path(base) / "vlm-export" / "verified"


def _folder_key(bundle_dir: Path) -> str:
    """The bundle folder's identity: real path, device and inode."""
    real = os.path.realpath(bundle_dir)
    info = os.stat(real)
    return f"{real}\0{info.st_dev}\0{info.st_ino}"


def record_path(bundle_dir: str | Path) -> Path | None:
    """The record file of a bundle folder, or None when there is no cache folder."""
    folder = cache_folder()
    if folder is None:
        return None
    name = hashlib.sha256(_folder_key(Path(bundle_dir)).encode("utf-8", "surrogateescape"))
    return folder / f"{name.hexdigest()[:32]}.json"


def _stat_key(info: os.stat_result) -> list[int]:
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev]


def _valid_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and _SHA256.fullmatch(entry["sha256"]) is not None
        and isinstance(entry.get("stat"), list)
        and len(entry["stat"]) == 5
        and all(type(value) is int for value in entry["stat"])
    )


def read_record(path: Path, folder_key: str) -> dict[str, dict[str, Any]]:
    """The remembered entries by file name; empty for a missing, damaged or foreign record."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_RECORD_BYTES:
            return {}
        if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
            return {}
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        return {}
    files = data.get("files")
    if data.get("version") != RECORD_VERSION or data.get("folder") != folder_key:
        return {}
    if not isinstance(files, dict):
        return {}
    return {name: entry for name, entry in files.items() if _valid_entry(entry)}


def _write_record(path: Path, folder_key: str, files: dict[str, dict[str, Any]]) -> None:
    """Write the record atomically; a record that cannot be written is only a debug line."""
    from vlm_export.core.atomic import WriteError, atomic_write_bytes

    data = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "folder": folder_key}
    data["files"] = files
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.path.islink(path):  # never written through a link someone placed there
            return
        atomic_write_bytes(path, json.dumps(data, indent=1).encode("utf-8", "surrogateescape"))
    except (OSError, WriteError) as exc:
        log.debug("verification record not written (%s)", exc)


def _hash_and_check(path: Path, name: str, record: dict[str, Any]) -> str:
    digest = sha256_file(path)
    if digest != record["sha256"]:
        raise BundleError(f"bundle file {name} does not match its sha256 (modified or corrupt)")
    return digest


def verify_bundle_files(
    bundle_dir: str | Path, manifest: dict[str, Any], mode: str = "cached"
) -> Verification:
    """Check every file the manifest lists: present, its size, its sha256 (see module doc).

    ``mode`` "full" hashes every file (and refreshes the record), "cached" hashes only files the
    record does not vouch for, "off" does nothing. Raises BundleError naming the first bad file.
    """
    done = Verification()
    if mode == "off":
        return done
    bundle_dir = Path(bundle_dir)
    try:
        folder_key = _folder_key(bundle_dir)
        where = record_path(bundle_dir)
    except OSError:
        folder_key, where = "", None
    remembered = read_record(where, folder_key) if where and mode == "cached" else {}
    keep: dict[str, dict[str, Any]] = {}
    for name, expected in manifest["files"].items():
        path = bundle_dir / name
        try:
            before = path.stat()
        except OSError:
            raise BundleError(f"bundle file missing: {name}") from None
        if not stat.S_ISREG(before.st_mode):
            raise BundleError(f"bundle file missing: {name}")
        if before.st_size != expected["bytes"]:
            raise BundleError(
                f"bundle file {name} is {before.st_size} bytes, manifest says "
                f"{expected['bytes']} (truncated?)"
            )
        entry = remembered.get(name)
        key = _stat_key(before)
        if entry and entry["stat"] == key and entry["sha256"] == expected["sha256"]:
            keep[name] = entry
            done.remembered.append(name)
            continue
        digest = _hash_and_check(path, name, expected)
        done.hashed.append(name)
        after = path.stat()
        settled = time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns) > SETTLE_NS
        if _stat_key(after) == key and settled:
            keep[name] = {"sha256": digest, "stat": key}
    if where is not None and (done.hashed or keep.keys() != remembered.keys()):
        _write_record(where, folder_key, keep)
    return done
