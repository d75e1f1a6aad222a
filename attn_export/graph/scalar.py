"""Evaluate small constant subgraphs: the attention scale written as ``c ** -0.5`` with ``c`` read from a shape.

PyTorch code such as ``torch.bmm(q, k) * (c ** (-0.5))`` with ``b, c, h, w =
x.shape`` exports as Shape -> Gather -> Cast -> Pow. When the dims it reads are
static (the channel count always is), the value is a constant; this module
computes it from the inferred shapes without running the model. Dynamic dims
evaluate to NaN, so a scale that really depends on H or W is never folded.
"""

from __future__ import annotations

import numpy as np
from typing import cast

import onnx

from .index import TypedIndex, node_attr

_MAX_DEPTH = 24
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
_MAX_ELEMENTS = 64


def _shape_value(idx: TypedIndex, tensor: str, node: onnx.NodeProto) -> np.ndarray | None:
    shape = idx.shapes.get(tensor)
    if shape is None:
        return None
    full = np.array([float(d) if isinstance(d, int) and d >= 0 else np.nan for d in shape], dtype=np.float64)
    # Shape's start and end are INT attributes (node_attr is typed object).
    start = int(cast(int, node_attr(node, "start", 0)) or 0)
    end = cast("int | None", node_attr(node, "end"))
    return full[start:None if end is None else int(end)]


def eval_scalar(idx: TypedIndex, tensor: str) -> float | None:
    """The value of ``tensor`` when it is a single number computable from constants and static dims; else None."""
    value = _eval(idx, tensor, 0)
    if value is None or value.size != 1:
        return None
    v = float(value.reshape(()))
    return v if np.isfinite(v) else None


def _eval(idx: TypedIndex, tensor: str, depth: int) -> np.ndarray | None:
    if depth > _MAX_DEPTH:
        return None
    const = idx.const(tensor)
    if const is not None:
        return const.astype(np.float64) if const.size <= _MAX_ELEMENTS else None
    node = idx.producer.get(tensor)
    if node is None:
        return None
    op = node.op_type
    if op == "Shape":
        return _shape_value(idx, node.input[0], node)
    if op == "Size":
        shape = _shape_value(idx, node.input[0], node)
        return None if shape is None else np.array(np.prod(shape))
    args = [_eval(idx, i, depth + 1) if i else None for i in node.input]
    x = args[0] if args else None
    if x is None:
        return None
    try:
        if op in ("Cast", "Identity", "CastLike"):
            to = node_attr(node, "to")
            if op == "Cast" and to is not None and to not in _FLOAT_TYPES:
                return np.trunc(x)
            return x
        if op == "Gather":
            ind = args[1]
            if ind is None:
                return None
            return np.take(x, ind.astype(np.int64), axis=int(cast(int, node_attr(node, "axis", 0)) or 0))  # axis: an INT attribute
        if op == "Slice":
            starts, ends = args[1], args[2] if len(args) > 2 else None
            if x.ndim != 1 or starts is None or ends is None or any(a is not None for a in args[3:4]) and \
                    args[3] is not None and int(args[3].reshape(-1)[0]) != 0:
                return None
            step = int(args[4].reshape(-1)[0]) if len(args) > 4 and args[4] is not None else 1
            n = len(x)
            lo, hi = (int(np.clip(v, -n - 1, n)) for v in (starts.reshape(-1)[0], ends.reshape(-1)[0]))
            return x[lo:hi:step]
        if op == "Squeeze":
            return x.reshape(()) if x.size == 1 else None
        if op == "Unsqueeze":
            return x.reshape((1,) * (x.ndim + 1)) if x.size == 1 else None
        if op == "Reshape":
            return x.reshape(-1) if x.size == 1 else None
        if op == "Sqrt":
            return np.sqrt(x)
        if op == "Reciprocal":
            return 1.0 / x
        if op == "Neg":
            return -x
        if op in ("Pow", "Div", "Mul", "Add", "Sub"):
            y = args[1] if len(args) > 1 else None
            if y is None:
                return None
            return {"Pow": np.power, "Div": np.divide, "Mul": np.multiply, "Add": np.add, "Sub": np.subtract}[op](x, y)
    except (ValueError, IndexError, FloatingPointError):
        return None
    return None
