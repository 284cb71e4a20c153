"""Engine backends: one interface, ONNX Runtime and TensorRT implementations."""
