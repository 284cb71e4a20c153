"""The engines themselves, one module per runtime (ONNX Runtime and its C API, OpenVINO and its
bf16 pins, TensorRT, LiteRT, ncnn, RKNN): each opens a bundle's graph and runs a frame."""
