"""Which activation a model's weights were trained with: QuickGELU (OpenAI's CLIP) or GELU.

open_clip builds the activation its model config names, and weights trained with the other one
load without an error and give worse embeddings. A pretrained tag says which (open_clip's table
of tags); a local checkpoint file says it when it is in OpenAI's format (a TorchScript archive,
or a state dict with OpenAI's ``input_resolution``/``context_length``/``vocab_size`` entries),
when it lies in a Hugging Face cache folder whose hub repo is a tag's, or next to an
``open_clip_config.json``; otherwise the user names the tag (``--pretrained-tag``).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_export.models.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()

import open_clip  # noqa: E402
import torch  # noqa: E402

#: entries of OpenAI's released TorchScript checkpoints that no open_clip state dict has
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
HUB_CONFIG = "open_clip_config.json"
HUB_CACHE_PREFIX = "models--"  # huggingface_hub's cache folder of a repo: models--ORG--NAME

#: how the activation was decided (the manifest's model.activation_source)
FROM_TAG = "tag"  # a pretrained tag: --pretrained TAG, or --pretrained FILE --pretrained-tag TAG
FROM_CHECKPOINT = "checkpoint"  # the file is in OpenAI's format
FROM_HUB = "hub-config"  # the hub cache folder's repo or open_clip_config.json
FROM_MODEL = "model-config"  # random weights, a -quickgelu name: the model config says it
FROM_FLAG = "flag"  # --force-quick-gelu
UNKNOWN = "unknown"  # a checkpoint file that does not say: built as the model config says


@dataclass(frozen=True)
class WeightsOrigin:
    """What is known of the weights: their activation (None: unknown), how, and their tag."""

    quick_gelu: bool | None
    source: str
    tag: str | None = None


def tag_config(model: str, tag: str) -> dict[str, Any]:
    """open_clip's record of ``model``/``tag`` (also under the name without ``-quickgelu``)."""
    for name in (model, model.removesuffix("-quickgelu")):
        found = open_clip.get_pretrained_cfg(name, tag)
        if found:
            return dict(found)
    return {}


def tags_of(model: str) -> list[str]:
    """The pretrained tags open_clip publishes for ``model`` (or its name without -quickgelu)."""
    tags = open_clip.list_pretrained_tags_by_model(model)
    return tags or open_clip.list_pretrained_tags_by_model(model.removesuffix("-quickgelu"))


def is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive (OpenAI's released ``ViT-B-16.pt`` files are)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def read_state_dict(path: Path) -> Mapping[str, Any] | None:
    """The checkpoint's state dict (memory-mapped where torch can; of a .safetensors file only
    when it holds OpenAI's entries, else empty), or None when it cannot be read here (then
    open_clip's own load reports why)."""
    try:
        if path.suffix == ".safetensors":  # the keys first: the tensors only when OpenAI's
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as archive:
                keys = set(archive.keys())
            return load_file(str(path)) if keys.intersection(OPENAI_EXTRA_KEYS) else {}
        if is_torchscript(path):
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a file of torch's legacy format cannot be memory-mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable here: the load that follows says why
        return None
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    return checkpoint if isinstance(checkpoint, Mapping) else None


def is_openai_format(path: Path, state_dict: Mapping[str, Any] | None) -> bool:
    """True for a TorchScript archive, or a state dict with entries only OpenAI's have."""
    if is_torchscript(path):
        return True
    return state_dict is not None and any(key in state_dict for key in OPENAI_EXTRA_KEYS)


def _hub_repo(path: Path) -> str | None:
    """The hub repo (ORG/NAME) of a file inside a huggingface_hub cache folder, else None."""
    for parent in path.absolute().parents:
        if parent.name.startswith(HUB_CACHE_PREFIX):
            org, _, name = parent.name[len(HUB_CACHE_PREFIX) :].partition("--")
            return f"{org}/{name}" if name else None
    return None


def hub_tag(model: str, repo: str) -> str | None:
    """The pretrained tag of ``model`` whose weights open_clip downloads from hub ``repo``."""
    for tag in tags_of(model):
        if tag_config(model, tag).get("hf_hub", "").strip("/") == repo.strip("/"):
            return tag
    return None


def _folder_quick_gelu(path: Path) -> bool | None:
    """quick_gelu of the ``open_clip_config.json`` beside the file (open_clip's hub and
    local-dir folders carry one), or None without a readable one."""
    try:
        config = json.loads((path.parent / HUB_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    return bool(model_cfg.get("quick_gelu", False)) if isinstance(model_cfg, dict) else None


def checkpoint_origin(model: str, path: Path, openai_format: bool) -> WeightsOrigin:
    """What the checkpoint file and its folder say of its weights (quick_gelu None: nothing)."""
    if openai_format:
        return WeightsOrigin(
            True, FROM_CHECKPOINT, "openai" if "openai" in tags_of(model) else None
        )
    repo = _hub_repo(path)
    tag = hub_tag(model, repo) if repo else None
    if tag is not None:
        return WeightsOrigin(bool(tag_config(model, tag).get("quick_gelu", False)), FROM_HUB, tag)
    quick_gelu = _folder_quick_gelu(path)
    return WeightsOrigin(quick_gelu, FROM_HUB if quick_gelu is not None else UNKNOWN)


def model_quick_gelu(model: str) -> bool:
    """quick_gelu of the model's own config (a -quickgelu name has it); False without one."""
    config = open_clip.get_model_config(model) or {}
    return bool(config.get("quick_gelu", False))


def load_openai_state_dict(model: torch.nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Load an OpenAI-format state dict into an open_clip CLIP (strict; RuntimeError on a
    mismatch): OpenAI's extra entries and the model's non-persistent buffers (a TorchScript
    archive keeps them) dropped, weights cast to the model's dtype."""
    transient = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    dropped = transient.union(OPENAI_EXTRA_KEYS)
    weights = {key: value for key, value in state_dict.items() if key not in dropped}
    scale = weights.get("logit_scale")
    if isinstance(scale, torch.Tensor) and scale.ndim != model.logit_scale.ndim:
        weights["logit_scale"] = scale.reshape(model.logit_scale.shape)
    model.load_state_dict(weights, strict=True)
