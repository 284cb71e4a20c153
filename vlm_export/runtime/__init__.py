"""Device side (NumPy + ONNX Runtime or TensorRT, never torch): bundles, engines, state."""
