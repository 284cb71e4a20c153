"""Import a package of an optional extra, or say in one line what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from vlm_export.core.errors import UserError


def import_optional(
    module: str, label: str, install_hint: str, error: type[UserError] = UserError
) -> ModuleType:
    """``module`` imported; ``error`` with ``install_hint`` when its package is not installed,
    or naming ``label`` and the cause when it is there but fails to import (a missing library
    it needs, say)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == module.split(".")[0]:
            raise error(install_hint) from None
        raise error(f"{label} cannot be imported ({exc})") from None
    except ImportError as exc:
        raise error(f"{label} is installed but cannot be imported ({exc})") from None
