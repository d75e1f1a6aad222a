"""Graph passes over exported ONNX models.

* :func:`optimize` folds constants and removes dead nodes (onnxscript's optimizer).
* :func:`fuse_attention` rewrites the MatMul -> Softmax -> MatMul chain on
  [B, heads, S, D] tensors into one ONNX ``Attention`` node (opset >= 23).
* :func:`find_attention` lists attention sites in either form.
* :func:`name_dynamic_dims` makes sure every graph input/output dim that is
  dynamic carries its intended name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper


@dataclass
class AttentionSite:
    """One attention computation found in a graph."""

    name: str             # module path prefix, e.g. "/downs.1/attention"
    form: str             # "op" (ONNX Attention) or "decomposed" (MatMul/Softmax/MatMul)
    scale_before_product: bool  # True when the scale sits on Q/K (the form TensorRT fuses)
    scale: float | None
    nodes: list[str]


class GraphIndex:
    """Producer/consumer index over a GraphProto, with constant lookup (shared by the graph passes and checks)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
        self.inits = {i.name: i for i in graph.initializer}
        self.outputs = {o.name for o in graph.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def scalar(self, name: str) -> float | None:
        value = self.const(name)
        if value is not None and value.size == 1:
            return float(value.reshape(()))
        return None

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and tensor not in self.outputs:
            return users[0]
        return None


def node_attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """The value of a node attribute, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _strip_scale(g: GraphIndex, tensor: str) -> tuple[str, float, onnx.NodeProto | None]:
    """If ``tensor`` is Mul(x, c) or Div(x, c) with scalar c, return (x, c or 1/c, node)."""
    node = g.producer.get(tensor)
    if node is not None and node.op_type in ("Mul", "Div"):
        for i, j in ((1, 0), (0, 1)) if node.op_type == "Mul" else ((1, 0),):
            c = g.scalar(node.input[i])
            if c is not None and c != 0:
                return node.input[j], (c if node.op_type == "Mul" else 1.0 / c), node
    return tensor, 1.0, None


def _is_last_two_transpose(node: onnx.NodeProto | None) -> bool:
    if node is None or node.op_type != "Transpose":
        return False
    perm = list(node_attr(node, "perm", []) or [])
    n = len(perm)
    return n >= 3 and perm[: n - 2] == list(range(n - 2)) and perm[n - 2:] == [n - 1, n - 2]


def _prefix(node_name: str) -> str:
    return node_name.rsplit("/", 1)[0] if "/" in node_name else node_name


def _match_chain(g: GraphIndex, softmax: onnx.NodeProto) -> dict | None:
    """Match [scale] MatMul(Q', K'^T) [scale] -> Softmax(-1) -> MatMul(., V)."""
    if softmax.op_type != "Softmax" or node_attr(softmax, "axis", -1) not in (-1, 3):
        return None
    logits, post_scale, post_node = _strip_scale(g, softmax.input[0])
    mm1 = g.producer.get(logits)
    if mm1 is None or mm1.op_type != "MatMul":
        return None
    mm2 = g.only_consumer(softmax.output[0])
    if mm2 is None or mm2.op_type != "MatMul" or mm2.input[0] != softmax.output[0]:
        return None
    q, q_scale, q_node = _strip_scale(g, mm1.input[0])
    kt, k_scale_outer, k_outer = _strip_scale(g, mm1.input[1])
    tr = g.producer.get(kt)
    if not _is_last_two_transpose(tr):
        return None
    assert tr is not None
    k, k_scale_inner, k_inner = _strip_scale(g, tr.input[0])
    return {
        "q": q, "k": k, "v": mm2.input[1], "out": mm2.output[0],
        "scale": q_scale * k_scale_outer * k_scale_inner * post_scale,
        "pre_scaled": post_node is None,
        "nodes": [n for n in (q_node, k_inner, tr, k_outer, mm1, post_node, softmax, mm2) if n is not None],
        "mm1": mm1,
    }


def find_attention(model: onnx.ModelProto) -> list[AttentionSite]:
    """Attention sites in ``model``: ONNX Attention nodes and MatMul/Softmax/MatMul chains."""
    g = GraphIndex(model.graph)
    sites: list[AttentionSite] = []
    for node in model.graph.node:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            scale = node_attr(node, "scale")
            sites.append(AttentionSite(_prefix(node.name), "op", True, float(scale) if scale is not None else None, [node.name]))
        elif node.op_type == "Softmax":
            m = _match_chain(g, node)
            if m is not None:
                sites.append(AttentionSite(_prefix(m["mm1"].name), "decomposed", m["pre_scaled"], m["scale"],
                                           [n.name for n in m["nodes"]]))
    return sites


def _rank(model: onnx.ModelProto, name: str) -> int | None:
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


def fuse_attention(model: onnx.ModelProto) -> int:
    """Replace each 4-D MatMul/Softmax/MatMul attention chain by one ONNX ``Attention`` node.

    The node carries the chain's total scale, so scale-after-product chains are
    fused too (the TensorRT importer moves sqrt(scale) onto Q and K itself).
    The model must already be at opset >= 23. Returns the number of fusions.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 23:
        raise ValueError(f"the ONNX Attention op needs opset 23 or later (model is at {opset})")
    inferred = onnx.shape_inference.infer_shapes(model)
    g = GraphIndex(model.graph)
    remove: set[int] = set()
    new_nodes: dict[int, onnx.NodeProto] = {}
    index = {id(n): i for i, n in enumerate(model.graph.node)}
    count = 0
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        m = _match_chain(g, node)
        if m is None or _rank(inferred, m["q"]) != 4 or _rank(inferred, m["k"]) != 4 or _rank(inferred, m["v"]) != 4:
            continue
        chain = m["nodes"]
        # Intermediate results must not be used outside the chain, or removing them would break the graph.
        internal = {o for n in chain for o in n.output} - {m["out"]}
        chain_ids = {id(n) for n in chain}
        if any(any(id(c) not in chain_ids for c in g.consumers.get(t, [])) or t in g.outputs for t in internal):
            continue
        attn = helper.make_node(
            "Attention", [m["q"], m["k"], m["v"]], [m["out"]], name=_prefix(m["mm1"].name) + "/Attention",
            scale=float(m["scale"]),
        )
        for n in chain:
            remove.add(index[id(n)])
        new_nodes[index[id(m["nodes"][-1])]] = attn
        count += 1
    if count:
        nodes = []
        for i, n in enumerate(model.graph.node):
            if i in new_nodes:
                nodes.append(new_nodes[i])
            elif i not in remove:
                nodes.append(n)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        _drop_unused_initializers(model)
    return count


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants, remove Identity/dead nodes and unused initializers."""
    import onnxscript.optimizer

    out = onnxscript.optimizer.optimize(model)
    _drop_unused_initializers(out)
    return out


def name_dynamic_dims(model: onnx.ModelProto, names: dict[str, Iterable[int | str]]) -> None:
    """Set each listed graph input/output's dims: strings become dim_param, ints dim_value."""
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name not in names:
            continue
        dims = list(names[vi.name])
        shape = vi.type.tensor_type.shape
        if len(shape.dim) != len(dims):
            raise ValueError(f"{vi.name}: expected rank {len(dims)}, graph says {len(shape.dim)}")
        for d, want in zip(shape.dim, dims):
            if isinstance(want, str):
                d.dim_param = want
            else:
                d.dim_value = int(want)


def dims_of(vi: onnx.ValueInfoProto) -> list[int | str]:
    """Dims of a graph input/output: ints, symbolic names, or '?' where unknown."""
    out: list[int | str] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append("?")
    return out


def foldable_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes whose inputs are all constants: clutter a clean export should not carry."""
    consts = {i.name for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "Constant" or (n.input and all((not i) or i in consts for i in n.input)):
            out.append(n.name or n.op_type)
    return out
