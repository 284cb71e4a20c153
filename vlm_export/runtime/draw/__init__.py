"""Pictures of what the device saw and decided, with PIL only (no plotting library).

Pure functions: numpy arrays and PIL images in, PIL images out; nothing here writes files.

- ``style``: fonts and colours shared by every picture.
- ``fate``: the patch grid coloured by token fate (kept, merged, pruned, already gone), its legend.
- ``annotate``: a label / score / fps banner on a frame.
- ``frame``: ``FrameDrawer``, one frame with a pipeline's decision drawn on it (fate overlay,
  the engine's view, the banner); imported from its module, it needs the bundle's manifest.
- ``bars``: top-k classes as horizontal bars.
- ``explain``: the ``vlm-edge explain`` figure (the engine's view, fate per reduction block,
  legend, top-k, GFLOPs).
- ``heatmap``: an accuracy matrix with numbers in its cells (``vlm-edge eval --plot``).
- ``reliability``: reliability diagrams, accuracy against confidence (``vlm-edge eval-tta --plot``).
"""

from vlm_export.runtime.draw.annotate import annotate_frame
from vlm_export.runtime.draw.bars import topk_bars
from vlm_export.runtime.draw.explain import explain_figure
from vlm_export.runtime.draw.fate import (
    engine_view_box,
    fate_legend,
    fate_overlay,
    final_fate,
    outline_view,
    patch_grid,
)
from vlm_export.runtime.draw.heatmap import heatmap
from vlm_export.runtime.draw.reliability import reliability_diagram

__all__ = [
    "annotate_frame",
    "engine_view_box",
    "explain_figure",
    "fate_legend",
    "fate_overlay",
    "final_fate",
    "heatmap",
    "outline_view",
    "reliability_diagram",
    "patch_grid",
    "topk_bars",
]
