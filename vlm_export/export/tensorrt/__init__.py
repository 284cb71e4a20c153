"""`vlm-export build-engine`: TensorRT engines built from the bundle's ONNX graphs."""
