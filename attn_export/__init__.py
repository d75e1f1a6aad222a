"""attn-export: diffusion UNets with self-attention from PyTorch to ONNX and TensorRT."""

__version__ = "0.1.0"
