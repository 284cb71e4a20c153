"""open_clip model names without importing open_clip (or torch): its model config files.

open_clip registers one model per ``model_configs/*.json`` in its package folder; this project adds
``vlm_export/models/model_configs``. Reading the file names lets ``vlm-export`` refuse an unknown
model before the seconds that importing torch takes.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
from pathlib import Path

from vlm_export.core.errors import UserError

CONFIG_DIR = Path(__file__).with_name("model_configs")
#: name prefixes open_clip resolves itself (a Hugging Face hub repo, a local folder)
EXTERNAL_PREFIXES = ("hf-hub:", "local-dir:")


def config_folders() -> list[Path]:
    """open_clip's config folder (found without importing it) and this project's."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return [Path(location) / "model_configs" for location in locations] + [CONFIG_DIR]


def model_names() -> list[str]:
    """Model names with a config file, sorted."""
    return sorted({path.stem for folder in config_folders() for path in folder.glob("*.json")})


def check_model_name(name: str) -> None:
    """UserError for a name without a config (with close matches) or whose image tower cannot
    be exported; hub and folder names pass (their towers are checked when loaded)."""
    if name.startswith(EXTERNAL_PREFIXES):
        return
    names = model_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown model {name!r:.80}{hint} (vlm-export --list-models lists all)")
    problem = tower_problem(name)
    if problem:
        raise UserError(
            f"model {name} cannot be exported: {problem}; TCA needs a CLS-pooled open_clip ViT "
            "(vlm-export --list-models lists those)"
        )


def _config(name: str) -> dict | None:
    for folder in config_folders():
        path = folder / f"{name}.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return data if isinstance(data, dict) else None
    return None


def tower_problem(name: str) -> str | None:
    """Why a model's image tower cannot be exported (it is not a plain CLS-pooled open_clip ViT),
    read from its config file; None when it can, or when there is no config to read."""
    config = _config(name)
    vision = config.get("vision_cfg") if config else None
    if not isinstance(vision, dict):
        return None
    if vision.get("timm_model_name"):
        return f"its image tower is a timm model ({str(vision['timm_model_name'])[:80]})"
    if not isinstance(vision.get("layers"), int):
        return "its image tower is a ResNet"
    if vision.get("attentional_pool"):
        return "its image tower pools with attention"
    pool = vision.get("pool_type", "tok")
    if vision.get("global_average_pool") or pool not in ("tok", None):
        return f"its image tower pools with {str(pool if pool != 'tok' else 'avg')[:20]!r}"
    return None


def exportable_model_names() -> tuple[list[str], int]:
    """The model names whose image tower exports (see ``tower_problem``), and how many do not."""
    names = model_names()
    good = [name for name in names if tower_problem(name) is None]
    return good, len(names) - len(good)
