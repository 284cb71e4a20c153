"""The image tower as an ONNX graph: export, parity with PyTorch, ladders, operator checks, text."""
