"""The one graph analysis: a graph index, a concrete-shape probe and the attention finder.

Every consumer (export fusion, the FP16 audit and conversion, the TensorRT
readiness check, ``inspect`` and the engine fusion report) reads attention
through :func:`find_attention`; :func:`canonicalize_attention` rewrites the
sites it finds into one ONNX ``Attention`` node or the canonical
Mul(q, scale) -> MatMul -> Softmax -> MatMul chain.
"""

from __future__ import annotations

from .attention import AttentionSite, Operand, find_attention
from .index import GraphIndex, TypedIndex, node_attr
from .rewrite import RewriteResult, canonicalize_attention, to_onnxruntime_form

__all__ = [
    "AttentionSite", "GraphIndex", "Operand", "RewriteResult", "TypedIndex", "canonicalize_attention",
    "find_attention", "node_attr", "to_onnxruntime_form",
]
