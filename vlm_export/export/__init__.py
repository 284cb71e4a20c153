"""Torch side: text embeddings, ONNX export and checks, TensorRT build, bundle writing, the CLI."""
