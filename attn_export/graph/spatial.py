"""Score-SDE's NCSN++ attention (``AttnBlockpp``) put in the channel-first form the attention finder reads.

NCSN++ writes single-head attention over an image's positions with 5-D
einsums and two reshapes::

    w = einsum("bchw,bcij->bhwij", q, k) * C**-0.5
    w = softmax(reshape(w, [B, H, W, H*W]), -1)
    h = einsum("bhwij,bcij->bchw", reshape(w, [B, H, W, H, W]), v)

The reshapes only flatten and unflatten the key positions: they are layout,
not a mask or bias. :func:`flatten_spatial_attention` rewrites each such
site into the same computation over flattened positions, which
guided-diffusion also uses and the finder already reads::

    w = softmax(einsum("bct,bcs->bts", reshape(q, [B, C, HW]), reshape(k, [B, C, HW])) * C**-0.5, -1)
    h = reshape(einsum("bts,bcs->bct", w, reshape(v, [B, C, HW])), [B, C, H, W])

The scalar Mul/Div nodes on the logits move with them unchanged. Softmax
over the flattened axis is the same function; the result is exact.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .index import GraphIndex, node_attr

# b c h w , b c i j -> b h w i j   and   b h w i j , b c i j -> b c h w  (any letters, the same roles)
_PRODUCT = re.compile(r"^(\w)(\w)(\w)(\w),\1\2(\w)(\w)->\1\3\4\5\6$")
_APPLY = re.compile(r"^(\w)(\w)(\w)(\w)(\w),\1(\w)\4\5->\1\6\2\3$")


def _equation(node: onnx.NodeProto) -> str:
    eq = node_attr(node, "equation", b"")
    return (eq.decode() if isinstance(eq, bytes) else str(eq)).replace(" ", "")


def _scalar_chain(idx: GraphIndex, tensor: str) -> tuple[list[onnx.NodeProto], str]:
    """The scalar Mul/Div nodes that follow ``tensor`` one after the other, and the tensor after them."""
    chain: list[onnx.NodeProto] = []
    while True:
        node = idx.only_consumer(tensor)
        if node is None or node.op_type not in ("Mul", "Div") or len(node.input) != 2 or node.input[0] != tensor:
            return chain, tensor
        other = idx.const(node.input[1])
        if other is None or other.size != 1:
            return chain, tensor
        chain.append(node)
        tensor = node.output[0]


def flatten_spatial_attention(model: onnx.ModelProto) -> int:
    """Rewrite every NCSN++-style spatial attention site of ``model`` in place; returns how many were rewritten."""
    graph = model.graph
    idx = GraphIndex(graph)
    edits: list[tuple[list[onnx.NodeProto], list[onnx.NodeProto]]] = []
    initializers: list[onnx.TensorProto] = []
    for e1 in graph.node:
        if e1.op_type != "Einsum" or not _PRODUCT.match(_equation(e1)):
            continue
        scales, logits = _scalar_chain(idx, e1.output[0])
        flat = idx.only_consumer(logits)
        if flat is None or flat.op_type != "Reshape":
            continue
        softmax = idx.only_consumer(flat.output[0])
        if softmax is None or softmax.op_type != "Softmax" or node_attr(softmax, "axis", -1) not in (-1, 3):
            continue
        unflat = idx.only_consumer(softmax.output[0])
        if unflat is None or unflat.op_type != "Reshape":
            continue
        e2 = idx.only_consumer(unflat.output[0])
        if e2 is None or e2.op_type != "Einsum" or not _APPLY.match(_equation(e2)) or e2.input[0] != unflat.output[0]:
            continue
        q, k, v = e1.input[0], e1.input[1], e2.input[1]
        p = f"{e1.name or e1.output[0]}/flat"
        names = {n: f"{p}/{n}" for n in ("bc_1", "q", "k", "v", "logits", "probs", "out", "shape_q", "shape_v",
                                         "bc", "hw", "out_shape", "zero", "two", "four")}
        initializers += [numpy_helper.from_array(np.array([0, 0, -1], np.int64), names["bc_1"]),
                         numpy_helper.from_array(np.array([0], np.int64), names["zero"]),
                         numpy_helper.from_array(np.array([2], np.int64), names["two"]),
                         numpy_helper.from_array(np.array([4], np.int64), names["four"])]
        new = [
            helper.make_node("Reshape", [q, names["bc_1"]], [names["q"]], name=f"{p}/reshape_q"),
            helper.make_node("Reshape", [k, names["bc_1"]], [names["k"]], name=f"{p}/reshape_k"),
            helper.make_node("Reshape", [v, names["bc_1"]], [names["v"]], name=f"{p}/reshape_v"),
            helper.make_node("Einsum", [names["q"], names["k"]], [names["logits"]], name=f"{p}/qk", equation="bct,bcs->bts"),
        ]
        tensor = names["logits"]
        for i, node in enumerate(scales):  # the same scalar factors, now on the flattened logits
            out = f"{p}/scaled_{i}"
            new.append(helper.make_node(node.op_type, [tensor, node.input[1]], [out], name=f"{p}/{node.op_type.lower()}_{i}"))
            tensor = out
        new += [
            helper.make_node("Softmax", [tensor], [names["probs"]], name=f"{p}/softmax", axis=-1),
            helper.make_node("Einsum", [names["probs"], names["v"]], [names["out"]], name=f"{p}/pv", equation="bts,bcs->bct"),
            helper.make_node("Shape", [q], [names["shape_q"]], name=f"{p}/shape_q"),
            helper.make_node("Shape", [v], [names["shape_v"]], name=f"{p}/shape_v"),
            helper.make_node("Slice", [names["shape_v"], names["zero"], names["two"]], [names["bc"]], name=f"{p}/bc"),
            helper.make_node("Slice", [names["shape_q"], names["two"], names["four"]], [names["hw"]], name=f"{p}/hw"),
            helper.make_node("Concat", [names["bc"], names["hw"]], [names["out_shape"]], name=f"{p}/out_shape", axis=0),
            helper.make_node("Reshape", [names["out"], names["out_shape"]], [e2.output[0]], name=f"{p}/reshape_out"),
        ]
        edits.append(([e1, *scales, flat, softmax, unflat, e2], new))
    if not edits:
        return 0
    removed = {id(n) for old, _ in edits for n in old}
    out_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) not in removed:
            out_nodes.append(node)
            continue
        for old, new in edits:
            if node is old[-1]:  # the site's last node: everything it needs is defined before it
                out_nodes.extend(new)
    del graph.node[:]
    graph.node.extend(out_nodes)
    graph.initializer.extend(initializers)
    return len(edits)
