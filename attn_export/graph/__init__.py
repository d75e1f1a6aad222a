"""The one graph analysis: a graph index, a concrete-shape probe and the attention finder.

Every consumer (export fusion, the FP16 audit and conversion, the TensorRT
readiness check, ``inspect`` and the engine fusion report) reads attention
through :func:`find_attention`; :func:`canonicalize_attention` rewrites the
sites it finds into one ONNX ``Attention`` node or the canonical
Mul(q, scale) -> MatMul -> Softmax -> MatMul chain; :func:`onnxruntime_serving_form`
builds what ONNX Runtime sessions run (on CPU attention in query chunks and Winograd 3x3
convolutions, on CUDA MultiHeadAttention).
"""

from __future__ import annotations

from .attention import AttentionSite, Mask, Operand, find_attention
from .chunked import to_chunked_form
from .index import GraphIndex, TypedIndex, node_attr
from .rewrite import RewriteResult, canonicalize_attention, to_onnxruntime_form
from .serving import ServingForm, onnxruntime_serving_form
from .winograd import WinogradResult, winograd_convolutions

__all__ = [
    "AttentionSite", "GraphIndex", "Mask", "Operand", "RewriteResult", "ServingForm", "TypedIndex", "WinogradResult",
    "canonicalize_attention", "find_attention", "node_attr", "onnxruntime_serving_form", "to_chunked_form",
    "to_onnxruntime_form", "winograd_convolutions",
]
