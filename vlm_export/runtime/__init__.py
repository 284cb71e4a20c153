"""Device side (NumPy + ONNX Runtime or TensorRT, never torch): bundles, engines, state.

The face for Python programs::

    from vlm_export.runtime import open_pipeline

    with open_pipeline("bundles/vitb16-tca", state="tca.npz") as pipeline:
        result = pipeline.classify("photo.jpg")
        print(result.class_name, result.score)

Messages (warnings included) go to the ``vlm_export`` loggers of stdlib ``logging``.

The names are imported when first used (module ``__getattr__``), so ``import vlm_export.runtime``
(and the ``vlm-edge`` launcher inside it) loads neither NumPy nor the pipeline.
"""

from __future__ import annotations

# No import at all here (not even typing): this module runs before the vlm-edge launcher can
# install its Ctrl-C handler, so every import here would widen the window for a traceback.
_HOMES = {
    "Bundle": "vlm_export.runtime.bundle",
    "EdgePipeline": "vlm_export.runtime.api",
    "FrameResult": "vlm_export.runtime.result",
    "UserError": "vlm_export.core.errors",
    "open_pipeline": "vlm_export.runtime.api",
}

__all__ = ["Bundle", "EdgePipeline", "FrameResult", "UserError", "open_pipeline"]


def __getattr__(name: str) -> object:
    """Import a public name on first use."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
