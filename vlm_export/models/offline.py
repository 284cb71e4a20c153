"""Pretrained weights without network: know within a second, and say what to fetch.

open_clip downloads a pretrained tag's weights from the Hugging Face hub; without network the
hub client retries for about a minute before failing. ``weights_problem`` checks the cache and
a short connection to the hub first: weights in the cache are used offline (no retries), missing
weights give one line naming the hub file, the ``--pretrained PATH`` alternative and the offline
switch.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import types
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"  # open_clip's default hub file names
HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
CONNECT_TIMEOUT_S = 2.0
TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # huggingface_hub's spellings of a true switch


def hub_files(pretrained_cfg: dict[str, Any]) -> tuple[str, list[str]] | None:
    """(hub repo, file names open_clip tries, the safetensors one first), or None when the tag
    is not downloaded from the hub (a URL or a local file)."""
    hub = pretrained_cfg.get("hf_hub", "")
    if not hub or "file" in pretrained_cfg:
        return None
    repo, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    names = [HF_SAFE_WEIGHTS_NAME, filename] if filename == HF_WEIGHTS_NAME else [filename]
    return repo, names


def hub_reachable(endpoint: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """True when a TCP connection to the hub endpoint opens within ``timeout`` seconds."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def weights_problem(name: str, tag: str, pretrained_cfg: dict[str, Any]) -> str | None:
    """Why the weights of ``name``/``tag`` cannot be had now, or None (then open_clip loads them).

    Weights already in the Hugging Face cache switch the hub client to offline mode when the hub
    is unreachable, so open_clip takes them from the cache without retrying.
    """
    files = hub_files(pretrained_cfg)
    if files is None:
        return None
    from huggingface_hub import constants, try_to_load_from_cache

    repo, names = files
    switch = os.environ.get("HF_HUB_OFFLINE", "").upper()
    offline = bool(constants.HF_HUB_OFFLINE) or switch in TRUE_VALUES
    if not offline and hub_reachable(constants.ENDPOINT):
        return None
    if any(isinstance(try_to_load_from_cache(repo, file), str) for file in names):
        constants.HF_HUB_OFFLINE = True
        return None
    reason = "HF_HUB_OFFLINE is set" if offline else f"{constants.ENDPOINT} cannot be reached"
    file = names[-1]
    return (
        f"{name} weights {tag!r} are not in the Hugging Face cache and {reason}: fetch {file} "
        f"from the hub repo {repo} where there is network and pass that local checkpoint file "
        f"with --pretrained path/to/{file} --pretrained-tag {tag} (the tag builds the model "
        f"its weights were trained with, e.g. QuickGELU), or put it in the cache (hf download "
        f"{repo} {file}) and set HF_HUB_OFFLINE=1; --pretrained none exports random weights"
    )


def pretrained_cfg_without_torch(model: str, tag: str) -> dict[str, Any] | None:
    """open_clip's pretrained-weights record of ``model``/``tag`` (hub repo, file), read from its
    ``pretrained.py`` without importing open_clip or torch; None when it cannot be read.

    ``vlm-export`` uses it to refuse a download that cannot happen before importing torch (which
    takes seconds); the full check after loading open_clip still stands behind it.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    package = "_vlm_export_open_clip_table"
    shadowed = ("safetensors.torch",)  # pretrained.py's try-import of it would import torch
    saved = {name: sys.modules.get(name) for name in (package, *shadowed)}
    try:
        holder = types.ModuleType(package)
        holder.__path__ = [str(folder)]
        sys.modules[package] = holder
        for name in shadowed:
            sys.modules[name] = None  # type: ignore[assignment]  # makes the import fail
        table_spec = importlib.util.spec_from_file_location(
            f"{package}.pretrained", folder / "pretrained.py"
        )
        if table_spec is None or table_spec.loader is None:
            return None
        table = importlib.util.module_from_spec(table_spec)
        table_spec.loader.exec_module(table)
        found = table.get_pretrained_cfg(model, tag)
        return dict(found) if isinstance(found, dict) else None
    except Exception:  # noqa: BLE001 - another open_clip layout: the later check still runs
        return None
    finally:
        for name in [key for key in sys.modules if key.startswith(f"{package}.")]:
            del sys.modules[name]
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
