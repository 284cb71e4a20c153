"""Load an open_clip CLIP by name: a pretrained tag, a local checkpoint file, or random weights."""

from __future__ import annotations

import contextlib
import difflib
import logging
import pickle
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_export.core.errors import UserError
from vlm_export.core.special_files import FILE, NEW, kind_of
from vlm_export.models.offline import weights_problem
from vlm_export.models.torchvision_compat import ensure_torchvision_importable
from vlm_export.models.weights_origin import (
    FROM_FLAG,
    FROM_HUB,
    FROM_MODEL,
    FROM_TAG,
    UNKNOWN,
    WeightsOrigin,
    checkpoint_origin,
    is_openai_format,
    load_openai_state_dict,
    model_quick_gelu,
    read_state_dict,
    tag_config,
    tags_of,
)

ensure_torchvision_importable()

import open_clip  # noqa: E402
import torch  # noqa: E402

CONFIG_DIR = Path(__file__).with_name("model_configs")
TEST_MODEL = "vlm-test-tiny"
RANDOM_WEIGHTS = "none"
#: the torch seed random weights are drawn with, so a random-weight bundle can be rebuilt
RANDOM_SEED = 0
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
log = logging.getLogger(__name__)

open_clip.add_model_config(CONFIG_DIR)


class ModelLoadError(UserError):
    """The model name, pretrained tag or checkpoint cannot be used."""


@dataclass
class LoadedClip:
    """A CLIP model in eval mode with what the manifest needs to describe it."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    pretrained: str
    untrained: bool
    activation: str
    preprocess_cfg: dict[str, Any]
    #: how the activation was decided (weights_origin.FROM_*, or UNKNOWN)
    activation_source: str = FROM_MODEL
    #: the open_clip pretrained tag the weights are, when known
    pretrained_tag: str | None = None
    #: the torch seed of random weights (``RANDOM_SEED``); None for trained weights
    random_seed: int | None = None


@contextlib.contextmanager
def _quiet_loaders() -> Iterator[None]:
    """Silence open_clip's and huggingface_hub's log lines; our error says it in one line."""
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():  # open_clip's QuickGELU-mismatch warning: decided here
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def available_models() -> list[str]:
    """Model names that open_clip knows, the registered test config included."""
    return open_clip.list_models()


def config_geometry(name: str) -> tuple[int, int] | None:
    """(tokens entering the first block, blocks) of ``name``'s ViT tower from open_clip's model
    config, without building the model; None where the config does not say (a hub or folder
    model, a timm or ResNet tower, an unknown name)."""
    if name.startswith(("hf-hub:", "local-dir:")) or name not in available_models():
        return None
    vision = (open_clip.get_model_config(name) or {}).get("vision_cfg") or {}
    size, patch, layers = (vision.get(key) for key in ("image_size", "patch_size", "layers"))
    if vision.get("timm_model_name") or type(layers) is not int or type(patch) is not int:
        return None
    sides = (size, size) if type(size) is int else size
    if not (isinstance(sides, list | tuple) and len(sides) == 2):
        return None
    return (sides[0] // patch) * (sides[1] // patch) + 1, layers


def _check_model_name(name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    models = available_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"unknown model {name!r}{hint} (vlm-export --list-models lists all)")


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.endswith(CHECKPOINT_SUFFIXES)


def _not_a_file(path: Path, shown: str) -> str | None:
    """What ``path`` is when it exists but is no regular file (looked at, never opened: a FIFO
    would block), else None."""
    kind, words = kind_of(path)
    if kind in (NEW, FILE):
        return None
    return f"{shown} is {words}, not a checkpoint file"


def _resolve_pretrained(name: str, pretrained: str) -> str | None:
    """Return what to hand open_clip: None (random), a checkpoint path, or a tag."""
    if pretrained.lower() == RANDOM_WEIGHTS or name.startswith(("hf-hub:", "local-dir:")):
        return None if pretrained.lower() == RANDOM_WEIGHTS else pretrained
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path)
    not_a_file = _not_a_file(path, pretrained)
    if _looks_like_path(pretrained):
        raise ModelLoadError(not_a_file or f"checkpoint file not found: {pretrained}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        if not_a_file:
            raise ModelLoadError(not_a_file)
        known = ", ".join(tags) if tags else "none published"
        raise ModelLoadError(
            f"{name} has no pretrained tag {pretrained!r} (tags: {known}); "
            f"or pass a local checkpoint file, or 'none' for random weights"
        )
    return pretrained


def _mismatch_summary(message: str) -> str:
    """One line from torch's multi-line load_state_dict error: what kind and how many."""
    missing = re.search(r"Missing key\(s\) in state_dict: (.*?)(?:\.\s*$|\.\s*\n)", message, re.M)
    unexpected = re.search(
        r"Unexpected key\(s\) in state_dict: (.*?)(?:\.\s*$|\.\s*\n)", message, re.M
    )
    mismatches = re.findall(r"size mismatch for ([^:]+):", message)
    parts = []
    if missing:
        parts.append(f"{missing.group(1).count(',') + 1} missing keys")
    if unexpected:
        parts.append(f"{unexpected.group(1).count(',') + 1} unexpected keys")
    if mismatches:
        parts.append(f"{len(mismatches)} shape mismatches (first: {mismatches[0]})")
    if not parts:
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        return lines[-1][:300] if lines else "unreadable checkpoint"
    return ", ".join(parts) + " (a checkpoint of another architecture?)"


def _origin(
    name: str, pretrained: str, source: str | None, tag: str | None, force_quick_gelu: bool
) -> tuple[WeightsOrigin, Any]:
    """What is known of the weights' activation, and an OpenAI-format state dict to load
    (None: open_clip loads ``source`` itself)."""
    if tag is not None and (source is None or not Path(source).is_file()):
        raise ModelLoadError(
            f"--pretrained-tag names the tag of the weights in a local checkpoint file "
            f"(--pretrained FILE); {pretrained!r} is not one"
        )
    if tag is not None and not tag_config(name, tag):
        known = ", ".join(tags_of(name)) or "none published"
        raise ModelLoadError(f"{name} has no pretrained tag {tag!r} (tags: {known})")
    if force_quick_gelu:
        return WeightsOrigin(True, FROM_FLAG, tag), _openai_weights(source)
    if source is None or name.startswith(("hf-hub:", "local-dir:")):
        return WeightsOrigin(None, FROM_HUB if source else FROM_MODEL), None
    if not Path(source).is_file():
        return WeightsOrigin(
            bool(tag_config(name, source).get("quick_gelu")), FROM_TAG, source
        ), None
    state_dict = _openai_weights(source)
    found = checkpoint_origin(name, Path(source), state_dict is not None)
    if tag is None:
        return found, state_dict
    quick_gelu = bool(tag_config(name, tag).get("quick_gelu", False))
    if found.quick_gelu is not None and found.quick_gelu != quick_gelu:
        said = "OpenAI's format" if found.source != FROM_HUB else "its hub folder"
        raise ModelLoadError(
            f"--pretrained-tag {tag} means {'QuickGELU' if quick_gelu else 'GELU'} weights, but "
            f"{Path(source).name} ({said}) was trained with "
            f"{'QuickGELU' if found.quick_gelu else 'GELU'}: leave --pretrained-tag out"
        )
    return WeightsOrigin(quick_gelu, FROM_TAG, tag), state_dict


def _openai_weights(source: str | None) -> Any:
    """The state dict of an OpenAI-format checkpoint file (open_clip cannot load a TorchScript
    archive with weights_only), else None."""
    if source is None or not Path(source).is_file():
        return None
    state_dict = read_state_dict(Path(source))
    return state_dict if is_openai_format(Path(source), state_dict) else None


def _unknown_warning(name: str, file: str, activation: str) -> str:
    quick = [tag for tag in tags_of(name) if tag_config(name, tag).get("quick_gelu")]
    tag = f"--pretrained-tag {quick[0]}" if quick else "--force-quick-gelu"
    return (
        f"cannot tell which activation the weights in {file} were trained with: built "
        f"{activation} as {name}'s config says; OpenAI-trained weights need {tag} (a tag's "
        f"weights: --pretrained-tag TAG)"
    )


def _activation(model: torch.nn.Module) -> str:
    block = model.visual.transformer.resblocks[0]
    return "quick_gelu" if type(block.mlp.gelu).__name__ == "QuickGELU" else "gelu"


def load_clip(
    name: str,
    pretrained: str = RANDOM_WEIGHTS,
    force_quick_gelu: bool = False,
    pretrained_tag: str | None = None,
) -> LoadedClip:
    """Create an open_clip model and load its weights; raise ModelLoadError with one clear line.

    ``pretrained`` is an open_clip tag (downloaded by open_clip, cached by huggingface_hub), a path
    to a checkpoint file (.pt/.bin/.safetensors, strict load), or ``none`` for random weights.
    The model is built with the activation its weights were trained with: a tag's (the ``openai``
    tag's QuickGELU), an OpenAI-format checkpoint file's (QuickGELU), its hub cache folder's, or
    ``pretrained_tag``'s (the tag whose weights a local file holds); ``force_quick_gelu`` forces
    QuickGELU. A file that says nothing is built as the model config says, with a warning.
    """
    _check_model_name(name)
    source = _resolve_pretrained(name, pretrained)
    if source is not None and not Path(source).is_file() and not name.startswith("hf-hub:"):
        problem = weights_problem(name, source, open_clip.get_pretrained_cfg(name, source))
        if problem:
            raise ModelLoadError(problem)
    with _quiet_loaders():  # torch.load's warnings on a file it then cannot read
        origin, openai_weights = _origin(name, pretrained, source, pretrained_tag, force_quick_gelu)
    if origin.source == UNKNOWN and model_quick_gelu(name):
        origin = WeightsOrigin(True, FROM_MODEL)  # a -quickgelu name says it
    quick_gelu = {} if origin.quick_gelu is None else {"quick_gelu": origin.quick_gelu}
    is_file = source is not None and Path(source).is_file()
    # a file holding a tag's weights is prepared as the tag's (open_clip does it for tags only)
    preprocess = tag_config(name, origin.tag) if is_file and origin.tag else None
    try:
        with _quiet_loaders(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)  # random weights are the same on every export
            model = open_clip.create_model(
                name,
                pretrained=None if openai_weights is not None else source,
                device="cpu",
                force_preprocess_cfg=preprocess,
                **quick_gelu,
            )
            if openai_weights is not None:
                load_openai_state_dict(model, openai_weights)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if source is not None and Path(source).is_file():
            raise ModelLoadError(
                f"checkpoint {source} does not fit {name}: {_mismatch_summary(str(exc))}"
            ) from None
        if "download" in first_line.lower() or "connection" in first_line.lower():
            raise ModelLoadError(
                f"could not download {name} weights {pretrained!r} (no network or Hugging Face "
                f"unreachable); pass a local checkpoint file with --pretrained PATH "
                f"--pretrained-tag {pretrained}, or --pretrained none for random weights"
            ) from None
        raise ModelLoadError(f"could not load {name} ({pretrained}): {first_line[:300]}") from None
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):
            raise ModelLoadError(f"checkpoint {source} is not a readable checkpoint file") from None
        raise ModelLoadError(
            f"checkpoint {source} holds pickled objects beyond plain weights; open_clip loads "
            "checkpoints with weights_only=True: re-save its state_dict (or use .safetensors)"
        ) from None
    except Exception as exc:  # a corrupt file raises many types (zip, safetensors, OS, key)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load {name} ({pretrained}): {detail[:300]}") from None
    model.eval()
    if not hasattr(model, "visual") or not hasattr(model.visual, "transformer"):
        raise ModelLoadError(f"{name} is not a ViT CLIP (its image tower has no transformer)")
    label = Path(source).name if source and Path(source).is_file() else pretrained
    activation = _activation(model)
    if origin.source == UNKNOWN:
        log.warning(_unknown_warning(name, label, activation))
    return LoadedClip(
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        name=name,
        pretrained=label,
        untrained=source is None,
        activation=activation,
        preprocess_cfg=dict(open_clip.get_model_preprocess_cfg(model)),
        activation_source=origin.source,
        pretrained_tag=origin.tag,
        random_seed=RANDOM_SEED if source is None else None,
    )
