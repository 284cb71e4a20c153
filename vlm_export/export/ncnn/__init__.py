"""`vlm-export build-ncnn`: the ONNX graph rewritten for pnnx, converted, checked, installed."""
