"""Device side (NumPy + ONNX Runtime or TensorRT, never torch): bundles, engines, state.

The face for Python programs::

    from vlm_export.runtime import open_pipeline

    with open_pipeline("bundles/vitb16-tca", state="tca.npz") as pipeline:
        result = pipeline.classify("photo.jpg")
        print(result.class_name, result.score)

Messages (warnings included) go to the ``vlm_export`` loggers of stdlib ``logging``.
"""

from vlm_export.core.errors import UserError
from vlm_export.runtime.api import EdgePipeline, open_pipeline
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.pipeline import FrameResult

__all__ = ["Bundle", "EdgePipeline", "FrameResult", "UserError", "open_pipeline"]
