"""open_clip model names without importing open_clip (or torch): its model config files.

open_clip registers one model per ``model_configs/*.json`` in its package folder; this project adds
``vlm_export/models/model_configs``. Reading the file names lets ``vlm-export`` refuse an unknown
model before the seconds that importing torch takes.
"""

from __future__ import annotations

import difflib
import importlib.util
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
    """UserError for a name without a config (with close matches); hub and folder names pass."""
    if name.startswith(EXTERNAL_PREFIXES):
        return
    names = model_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown model {name!r}{hint} (vlm-export --list-models lists all)")
