"""Engines: the backend interface and its ONNX Runtime and TensorRT implementations, engine choice
for a device, and engine parity against ONNX Runtime on CPU."""
