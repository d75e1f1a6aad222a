"""Graph rewrites of the ONNX Runtime serving form that were tried for speed on the CPU provider.

Each one is exact (the same function up to float rounding) and is measured by ``run_benchmarks.py`` in its
tuning table against the serving form as OrtRunner builds it. None of them is part of the product: a rewrite
moves into the serving form only once it measures faster.

- ``gn_affine_bn``: GroupNorm's per-channel affine after InstanceNormalization (Mul by gamma, then Add beta,
  two passes over the activation) as one inference-mode BatchNormalization (mean 0, variance 1, epsilon 0:
  one pass).
- ``upsample_convtranspose``: nearest 2x upsampling followed by a 3x3 convolution (stride 1, padding 1) as one
  stride-2 4x4 ConvTranspose on the small input; 16 instead of 36 multiply-adds per output pixel and channel
  pair, and no upsampled tensor.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from attn_export.graph.index import GraphIndex, node_attr


class _Graph(GraphIndex):
    """The project's graph index, plus the three edits the rewrites below make."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model.graph)
        self._fresh = 0

    def only_user(self, tensor: str, op: str) -> onnx.NodeProto | None:
        user = self.only_consumer(tensor)
        return user if user is not None and user.op_type == op else None

    def add_const(self, stem: str, array: np.ndarray) -> str:
        self._fresh += 1
        name = f"bench_variant_{stem}_{self._fresh}"
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def replace(self, old: list[onnx.NodeProto], new: onnx.NodeProto) -> None:
        """Put ``new`` where the first of ``old`` was (its inputs are produced before it) and drop ``old``."""
        at = list(self.graph.node).index(old[0])
        for n in old:
            self.graph.node.remove(n)
        self.graph.node.insert(at, new)


def _per_channel(g: _Graph, node: onnx.NodeProto, data: str) -> np.ndarray | None:
    """The constant operand of a binary node if it is a [C, 1, 1] (or [1, C, 1, 1]) per-channel array."""
    other = [i for i in node.input if i != data]
    if len(other) != 1:
        return None
    arr = g.const(other[0])
    if arr is None or arr.dtype != np.float32 or arr.ndim not in (3, 4) or any(d != 1 for d in arr.shape[-2:]):
        return None
    if arr.ndim == 4 and arr.shape[0] != 1:
        return None
    return arr.reshape(-1)


def _gn_affines(g: _Graph) -> Iterator[tuple[str, onnx.NodeProto, onnx.NodeProto, np.ndarray, np.ndarray]]:
    """(normalized tensor, its Mul, the Add, gamma, beta) for each GroupNorm affine after InstanceNormalization."""
    for norm in list(g.graph.node):
        if norm.op_type != "InstanceNormalization":
            continue
        back = g.only_user(norm.output[0], "Reshape")
        mul = back and g.only_user(back.output[0], "Mul")
        add = mul and g.only_user(mul.output[0], "Add")
        if not (back and mul and add):
            continue
        gamma, beta = _per_channel(g, mul, back.output[0]), _per_channel(g, add, mul.output[0])
        if gamma is not None and beta is not None and gamma.shape == beta.shape:
            yield back.output[0], mul, add, gamma, beta


def gn_affine_bn(model: onnx.ModelProto) -> int:
    """Rewrite (in place) each GroupNorm affine Mul/Add into one BatchNormalization; returns the count."""
    g = _Graph(model)
    count = 0
    for data, mul, add, gamma, beta in list(_gn_affines(g)):
        c = gamma.shape[0]
        stats = [g.add_const("gn_gamma", gamma), g.add_const("gn_beta", beta),
                 g.add_const("gn_mean", np.zeros(c, np.float32)), g.add_const("gn_var", np.ones(c, np.float32))]
        bn = helper.make_node("BatchNormalization", [data, *stats], [add.output[0]],
                              name=f"bench_gn_affine_{count}", epsilon=0.0)
        g.replace([mul, add], bn)
        count += 1
    return count


# Rows: the 4 taps of the stride-2 transposed kernel; columns: the 3 taps of the convolution on the upsampled grid.
# Output row 2i reads input rows i-1 (tap 0) and i (taps 1, 2); row 2i+1 reads i (taps 0, 1) and i+1 (tap 2). With
# ConvTranspose's o = 2i + t - 1, those land on transposed taps t = 3, 1 and 2, 0.
_UP2_TAPS = np.array([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=np.float64)


def _nearest_2x(g: _Graph, node: onnx.NodeProto) -> bool:
    if node.op_type != "Resize" or node_attr(node, "mode", b"nearest") != b"nearest" or len(node.input) < 3:
        return False
    if node_attr(node, "coordinate_transformation_mode", b"half_pixel") != b"asymmetric":
        return False
    if node_attr(node, "nearest_mode", b"round_prefer_floor") != b"floor":
        return False
    scales = g.const(node.input[2])
    return scales is not None and [float(s) for s in scales] == [1.0, 1.0, 2.0, 2.0]


def _plain_3x3(g: _Graph, conv: onnx.NodeProto) -> np.ndarray | None:
    w = g.const(conv.input[1]) if len(conv.input) > 1 else None
    if w is None or w.ndim != 4 or w.shape[2:] != (3, 3):
        return None
    if node_attr(conv, "group", 1) != 1 or node_attr(conv, "strides", [1, 1]) != [1, 1]:
        return None
    if node_attr(conv, "dilations", [1, 1]) != [1, 1] or node_attr(conv, "pads", [0] * 4) != [1, 1, 1, 1]:
        return None
    if node_attr(conv, "auto_pad", b"NOTSET") != b"NOTSET":
        return None
    return w


def upsample_convtranspose(model: onnx.ModelProto) -> int:
    """Rewrite (in place) each nearest-2x Resize feeding only a 3x3 Conv into one ConvTranspose; returns the count."""
    g = _Graph(model)
    count = 0
    for resize in list(g.graph.node):
        if not _nearest_2x(g, resize):
            continue
        conv = g.only_user(resize.output[0], "Conv")
        w = _plain_3x3(g, conv) if conv is not None else None
        if conv is None or w is None:
            continue
        # ConvTranspose weights are [C_in, C_out, kH, kW].
        v = np.einsum("tk,sl,ockl->cots", _UP2_TAPS, _UP2_TAPS, w.astype(np.float64)).astype(w.dtype)
        inputs = [resize.input[0], g.add_const("up_conv_w", v), *conv.input[2:]]
        ct = helper.make_node("ConvTranspose", inputs, list(conv.output), name=f"bench_up_conv_{count}",
                              kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1])
        g.replace([resize, conv], ct)
        count += 1
    return count


GRAPH_VARIANTS: dict[str, Callable[[onnx.ModelProto], int]] = {
    "gn_affine_bn": gn_affine_bn,
    "upsample_convtranspose": upsample_convtranspose,
}
