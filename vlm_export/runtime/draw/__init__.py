"""Pictures of what the device saw and decided, with PIL only (no plotting library).

Pure functions: numpy arrays and PIL images in, PIL images out; nothing here writes files.

- ``style``: fonts and colours shared by every picture.
- ``fate``: the patch grid coloured by token fate (kept, merged, pruned, already gone), its legend.
- ``annotate``: a label / score / fps banner on a frame.
- ``bars``: top-k classes as horizontal bars.
- ``explain``: the ``vlm-edge explain`` figure (the engine's view, fate per reduction block,
  legend, top-k, GFLOPs).
- ``heatmap``: an accuracy matrix with numbers in its cells (``vlm-edge eval --plot``).
"""
