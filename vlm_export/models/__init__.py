"""Torch side: open_clip loading, the condensing image tower, FLOP counting."""
