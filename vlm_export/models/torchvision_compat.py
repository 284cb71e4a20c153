"""Make ``import torchvision`` (and so ``import open_clip``) work when its C extension cannot load.

The only torchvision release that matches torch 2.13 (0.28.0) is published as a CUDA build. Next to
a CPU build of torch its C extension (``torchvision/_C.so``) fails to load, and torchvision's import
then dies in ``_meta_registrations.py`` with "operator torchvision::nms does not exist", because it
registers fake kernels for ops whose schemas the missing extension would have defined.

open_clip uses only torchvision's transforms, which are pure Python.
``ensure_torchvision_importable`` defines the two op schemas that the import needs (no
kernels), and does so only when the extension did not load: with a working torchvision it
changes nothing. Detection ops such as NMS still raise
if called, which vlm-export never does.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_fragment = None  # keeps the torch.library fragment (and so the schemas) alive


def _extension_loads(torch_module) -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # not installed: nothing to fix, the import error will speak for itself
    for lib in Path(spec.origin).parent.glob("_C*.so"):
        try:
            torch_module.ops.load_library(str(lib))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def ensure_torchvision_importable() -> bool:
    """Define the missing torchvision op schemas if its C extension cannot load.

    Returns True when the compatibility step was applied, False when it was not needed.
    """
    global _fragment
    if "torchvision" in sys.modules or _fragment is not None:
        return False
    import torch

    if _extension_loads(torch):
        return False
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not _op_exists(name):
            _fragment.define(schema)
    return True


def _op_exists(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False
