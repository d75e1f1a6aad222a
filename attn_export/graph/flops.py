"""Multiply-accumulates of an ONNX graph at one concrete input shape.

Counted: ``Conv`` and ``ConvTranspose`` (output elements x input channels per
group x kernel size), ``MatMul`` and ``Gemm`` (output elements x the
contracted size), two-operand ``Einsum`` (the product of every index size)
and attention, both the ONNX ``Attention`` op and ONNX Runtime's
``MultiHeadAttention`` (Q·Kᵀ and P·V: batch x heads x S_q x S_kv x (d + d_v)).
The MatMuls of a decomposed attention site (MatMul -> Softmax -> MatMul) are
counted as MatMuls and also reported under ``attention``. Element-wise ops,
normalization, Softmax and resizing are not counted: they are a small share
of a UNet's work and have no agreed MAC figure.

Shapes come from ONNX shape inference on a weightless copy of the graph with
every dynamic input dim pinned (``batch``, ``height``, ``width`` by name), so
the count is of the graph as exported, at the shape asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from .index import TypedIndex, node_attr, weightless_copy
from .probe import pinned_shape


@dataclass
class MacCount:
    """MACs of one graph at one shape: total, per op type, attention, and nodes whose shapes were unknown."""

    shape: tuple[int, int, int]
    total: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    attention: int = 0
    unknown: list[str] = field(default_factory=list)   # counted ops whose shapes inference could not tell

    @property
    def gmac(self) -> float:
        return self.total / 1e9

    @property
    def gflop(self) -> float:
        """2 FLOPs per multiply-accumulate."""
        return 2 * self.total / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "macs": self.total, "gmac": round(self.gmac, 4),
                "gflop": round(self.gflop, 4), "attention_macs": self.attention, "by_op": dict(self.by_op),
                "unknown": list(self.unknown)}


def _concrete(shape: list[Any] | None) -> list[int] | None:
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return [int(d) for d in shape]


def _prod(dims: list[int]) -> int:
    return int(np.prod(dims, dtype=np.int64)) if dims else 1


def pinned_index(model: onnx.ModelProto, batch: int, height: int, width: int) -> TypedIndex:
    """A :class:`TypedIndex` of ``model`` with its dynamic input dims fixed (weights never read)."""
    light = weightless_copy(model)
    inits = {i.name for i in light.graph.initializer}
    for vi in light.graph.input:
        if vi.name in inits:
            continue
        dims = pinned_shape(vi, height=height, width=width, sizes={"batch": batch})
        for d, value in zip(vi.type.tensor_type.shape.dim, dims):
            d.Clear()
            d.dim_value = value
    del light.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    return TypedIndex(inferred, infer=False)


def _attention_macs(node: onnx.NodeProto, idx: TypedIndex) -> int | None:
    """Q·Kᵀ plus P·V of an ``Attention`` / ``MultiHeadAttention`` node (None when a shape is unknown)."""
    q, k, v = (_concrete(idx.shapes.get(node.input[i])) if len(node.input) > i and node.input[i] else None
               for i in range(3))
    if q is None or k is None or v is None:
        return None
    if node.op_type == "Attention" and len(q) == 4:
        b, heads, sq, d = q
        skv, dv = k[-2], v[-1]
        return b * heads * sq * skv * (d + dv)
    # 3-D layouts: [B, S, heads * d]; the head count only splits the hidden size, so MACs = B*S_q*S_kv*(hidden).
    if len(q) == 3 and len(k) == 3 and len(v) == 3:
        b, sq, hq = q
        return b * sq * k[1] * (hq + v[2])
    return None


def count_macs(model: onnx.ModelProto, batch: int, height: int, width: int) -> MacCount:
    """Multiply-accumulates of ``model`` at ``batch`` x ``height`` x ``width`` (see the module docstring)."""
    from .attention import find_attention

    idx = pinned_index(model, batch, height, width)
    result = MacCount((batch, height, width))
    attention_nodes: set[str] = set()
    for site in find_attention(model, probe=False, run=False):
        if site.form != "op":
            attention_nodes.update(site.nodes)

    def add(node: onnx.NodeProto, macs: int | None) -> None:
        if macs is None:
            result.unknown.append(node.name or node.op_type)
            return
        result.total += macs
        result.by_op[node.op_type] = result.by_op.get(node.op_type, 0) + macs
        if node.op_type in ("Attention", "MultiHeadAttention") or node.name in attention_nodes:
            result.attention += macs

    for node in idx.graph.node:
        op = node.op_type
        if op not in ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "Attention", "MultiHeadAttention"):
            continue
        out = _concrete(idx.shapes.get(node.output[0]))
        if op in ("Attention", "MultiHeadAttention"):
            add(node, _attention_macs(node, idx))
        elif op == "Conv":
            w = _concrete(idx.shapes.get(node.input[1]))
            add(node, None if out is None or w is None else _prod(out) * _prod(w[1:]))
        elif op == "ConvTranspose":
            x, w = _concrete(idx.shapes.get(node.input[0])), _concrete(idx.shapes.get(node.input[1]))
            add(node, None if x is None or w is None else _prod(x) * _prod(w[1:]))
        elif op == "MatMul":
            a = _concrete(idx.shapes.get(node.input[0]))
            add(node, None if out is None or a is None else _prod(out) * a[-1])
        elif op == "Gemm":
            a = _concrete(idx.shapes.get(node.input[0]))
            k = None if a is None else (a[0] if node_attr(node, "transA", 0) else a[1])
            add(node, None if out is None or k is None else _prod(out) * k)
        elif op == "Einsum":
            add(node, _einsum_macs(node, idx))
    return result


def _einsum_macs(node: onnx.NodeProto, idx: TypedIndex) -> int | None:
    """Product of every index size of a two-operand Einsum without ellipsis (None otherwise)."""
    eq = node_attr(node, "equation", "")
    eq = eq.decode() if isinstance(eq, bytes) else str(eq)
    lhs = eq.replace(" ", "").split("->")[0].split(",")
    if len(lhs) != 2 or "." in eq:
        return None
    sizes: dict[str, int] = {}
    for term, name in zip(lhs, node.input):
        shape = _concrete(idx.shapes.get(name))
        if shape is None or len(shape) != len(term):
            return None
        for letter, d in zip(term, shape):
            sizes[letter] = max(sizes.get(letter, 1), d)
    return _prod(list(sizes.values()))
