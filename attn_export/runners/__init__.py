"""Runners: one call interface over PyTorch, ONNX Runtime and TensorRT engines (numpy in, numpy out)."""
