"""A ladder of token budgets on the device: its rungs opened with shared weights (ONNX Runtime
pre-packed, OpenVINO as one model), the choice of a rung for a frame-rate target, switching."""
