"""RAIL on the device (spec/rail.md): primal and dual analytic adapters, RAIL-Fusion, X-TAIL
metrics and the learner / inference state files. NumPy only."""

from vlm_export.runtime.rail.dual import DualAdapter, DualPredictor, rbf_kernel
from vlm_export.runtime.rail.fusion import BETA, RailFusion, fuse
from vlm_export.runtime.rail.inputs import RailError
from vlm_export.runtime.rail.primal import (
    HIDDEN_DIM,
    PrimalAdapter,
    PrimalPredictor,
    hidden_features,
    random_projection,
)
from vlm_export.runtime.rail.state import (
    load_inference_state,
    load_learner_state,
    merge_learner_states,
    save_inference_state,
    save_learner_state,
    to_inference,
)
from vlm_export.runtime.rail.xtail import accuracy, run_xtail, xtail_metrics

__all__ = [
    "BETA",
    "HIDDEN_DIM",
    "DualAdapter",
    "DualPredictor",
    "PrimalAdapter",
    "PrimalPredictor",
    "RailError",
    "RailFusion",
    "accuracy",
    "fuse",
    "hidden_features",
    "load_inference_state",
    "load_learner_state",
    "merge_learner_states",
    "random_projection",
    "rbf_kernel",
    "run_xtail",
    "save_inference_state",
    "save_learner_state",
    "to_inference",
    "xtail_metrics",
]
