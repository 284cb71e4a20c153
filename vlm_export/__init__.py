"""vlm-export: CLIP export with static token condensation, and a torch-free device runtime."""

__version__ = "0.1.0"
