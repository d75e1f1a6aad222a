"""Rewrite every attention site into one canonical form.

* ``"op"``: one ONNX ``Attention`` node (opset >= 23) carrying the site's total
  scale as its ``scale`` attribute; 3-D sites are lifted to [B, 1, S, d].
* ``"decomposed"``: Mul(q, scale) -> MatMul(., Kᵀ) -> Softmax(-1) -> MatMul(., v),
  the chain TensorRT's MHA pattern fusion matches.

A site's mask becomes the ``Attention`` op's ``attn_mask`` (boolean masks stay
boolean, True = attend), or an ``Add`` before the Softmax in the decomposed
chain (a boolean mask as 0 / -inf). In the op form the mask's query axis is
expanded to the query length when it is broadcast: ONNX Runtime's Attention
kernel refuses a broadcast query axis ("inconsistent q_sequence_length").

Layout changes (an Einsum's channel-first operands, K given as [B, C, S])
become Transposes around the site, and Casts keep each tensor's dtype, so the
rewritten graph computes what the original did. The scale subgraph that only
fed the old site (Shape -> Gather -> Cast -> Pow) is removed with it.
"""

from __future__ import annotations

from pathlib import Path

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .spatial import flatten_spatial_attention
from .attention import AttentionSite, Mask, Operand, find_attention
from .index import TypedIndex, default_opset, drop_unused_initializers, read_names, swap_last_two

TARGET_FORMS = ("op", "decomposed")
_ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
         "float64": TensorProto.DOUBLE}
_NP: dict[int, Any] = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


@dataclass
class RewriteResult:
    """What :func:`canonicalize_attention` did."""

    form: str
    sites: list[AttentionSite]                                   # the sites found before the rewrite
    rewritten: list[str] = field(default_factory=list)           # site names rewritten
    unchanged: list[str] = field(default_factory=list)           # already in the requested form
    unfused: list[AttentionSite] = field(default_factory=list)   # sites that could not be rewritten (see .problem)

    @property
    def count(self) -> int:
        return len(self.rewritten) + len(self.unchanged)


class _Builder:
    def __init__(self, model: onnx.ModelProto, site: AttentionSite, names: "_Names") -> None:
        self.model = model
        self.site = site
        self.nodes: list[onnx.NodeProto] = []
        # New nodes keep the site's module path, so the site's name survives the rewrite.
        self.prefix = (site.name or "attention").split("#")[0].rstrip("/")
        self._names = names

    def _tensor(self, what: str) -> str:
        return self._names.fresh(f"{self.prefix}/{what}")

    # ``attrs`` go to helper.make_node as they are (its **kwargs: Any): node attributes and its ``domain``.
    def node(self, op: str, inputs: list[str], what: str, output: str | None = None, **attrs: Any) -> str:
        out = output or self._tensor(what)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self._names.fresh(f"{self.prefix}/{op}_{what}"),
                                           **attrs))
        return out

    def const(self, value: np.ndarray, what: str) -> str:
        name = self._tensor(what)
        self.model.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def operand(self, op: Operand, what: str, dtype: int, perm: list[int] | None) -> str:
        t = op.tensor
        if _ELEM.get(op.dtype or "", dtype) != dtype:
            t = self.node("Cast", [t], f"{what}_cast", to=dtype)
        if perm is not None and perm != list(range(len(perm))):
            t = self.node("Transpose", [t], f"{what}_t", perm=perm)
        return t


class _Names:
    """Fresh tensor and node names that collide with nothing in the model."""

    def __init__(self, used: set[str]) -> None:
        self.used = used

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "_Names":
        used = {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
        for n in model.graph.node:
            used.add(n.name)
            used.update(n.output)
        return cls(used)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def _finish(b: _Builder, y: str, t_elem: int) -> None:
    """Put the canonical [.., S, dv] result back in the site's layout and dtype, under its output name."""
    site = b.site
    assert site.out is not None
    out_elem = _ELEM.get(site.out_dtype or "", t_elem)
    steps: list[tuple[str, dict[str, object]]] = []
    if site.out_perm is not None:
        steps.append(("Transpose", {"perm": site.out_perm}))
    if out_elem != t_elem:
        steps.append(("Cast", {"to": out_elem}))
    if not steps:
        # Rename the last node's output to the site's output.
        last = b.nodes[-1]
        last.output[0] = site.out
        return
    for i, (op, attrs) in enumerate(steps):
        y = b.node(op, [y], f"out_{op.lower()}", output=site.out if i == len(steps) - 1 else None, **attrs)


def _build_op(model: onnx.ModelProto, site: AttentionSite, names: _Names) -> list[onnx.NodeProto]:
    assert site.q and site.k and site.v and site.rank and site.scale is not None
    b = _Builder(model, site, names)
    t_elem = _ELEM.get(site.dtype or site.q.compute_dtype or "", TensorProto.FLOAT)
    q = b.operand(site.q, "q", t_elem, site.q.perm)
    k = b.operand(site.k, "k", t_elem, site.k.perm)
    v = b.operand(site.v, "v", t_elem, site.v.perm)
    if site.rank == 3:
        axes = b.const(np.array([1], dtype=np.int64), "head_axis")
        q, k, v = (b.node("Unsqueeze", [t, axes], f"{w}_4d") for t, w in ((q, "q"), (k, "k"), (v, "v")))
    inputs = [q, k, v]
    if site.mask is not None:
        inputs.append(_op_mask(b, site.mask, q, t_elem, site.rank))
    soft = _ELEM.get(site.softmax_dtype or "", t_elem)
    # make_node leaves out attributes that are None: softmax_precision only where it differs.
    y = b.node("Attention", inputs, "y", scale=float(site.scale), softmax_precision=soft if soft != t_elem else None)
    if site.rank == 3:
        y = b.node("Squeeze", [y, axes], "y_3d")
    _finish(b, y, t_elem)
    return b.nodes


def _op_mask(b: _Builder, mask: Mask, q4: str, t_elem: int, rank: int) -> str:
    """The Attention op's attn_mask: boolean (True attends) or additive in the site's dtype, broadcast like the logits.

    ``q4`` is the 4-D query the op reads; its length sizes a broadcast query axis.
    """
    m = mask.tensor
    if mask.kind == "drop":
        m = b.node("Not", [m], "mask_keep")
    elif mask.kind == "keep" and mask.fill is not None:
        # A finite fill (masked_fill(-1e9)) is not "never attend": keep its value as an additive mask.
        m = _additive_mask(b, mask, t_elem)
    elif mask.kind == "additive":
        m = _additive_mask(b, mask, t_elem)
    if rank == 3 and mask.shape is not None and len(mask.shape) == 3:
        # A [B, S_q, S_kv] mask broadcast against 3-D logits; the op's logits are [B, 1, S_q, S_kv].
        m = b.node("Unsqueeze", [m, b.const(np.array([1], dtype=np.int64), "mask_head_axis")], "mask_4d")
    if not mask.full_query_axis:
        s_q = b.node("Shape", [q4], "q_len", start=-2, end=-1)
        target = b.node("Concat", [s_q, b.const(np.array([1], dtype=np.int64), "one")], "mask_target", axis=0)
        m = b.node("Expand", [m, target], "mask_q")
    return m


def _additive_mask(b: _Builder, mask: Mask, elem: int) -> str:
    """The mask as a tensor added to the logits: itself (additive) or 0 where attended, ``fill`` (or -inf) elsewhere."""
    if mask.kind == "additive":
        same = _ELEM.get(mask.dtype or "") == elem
        return mask.tensor if same else b.node("Cast", [mask.tensor], "mask_cast", to=elem)
    dtype = _NP.get(elem, np.float32)
    fill = np.array(-np.inf if mask.fill is None else mask.fill, dtype=dtype)
    zero, masked = b.const(np.array(0, dtype=dtype), "mask_zero"), b.const(fill, "mask_fill")
    pair = [zero, masked] if mask.kind == "keep" else [masked, zero]
    return b.node("Where", [mask.tensor, *pair], "mask_bias")


def scaled_operands(b: _Builder) -> tuple[str, str, str, int]:
    """Append Mul(q, scale), Kᵀ and v in the [.., S, d] layout and the site's compute dtype to ``b``.

    Returns (scaled q, Kᵀ, v, element type); Kᵀ comes straight from k: the composition of k's layout change
    and the last-two-axes swap.
    """
    site = b.site
    assert site.q and site.k and site.v and site.rank and site.scale is not None
    t_elem = _ELEM.get(site.dtype or site.q.compute_dtype or "", TensorProto.FLOAT)
    q = b.operand(site.q, "q", t_elem, site.q.perm)
    k_perm = site.k.perm or list(range(site.rank))
    kt = b.operand(site.k, "k", t_elem, [k_perm[i] for i in swap_last_two(site.rank)])
    v = b.operand(site.v, "v", t_elem, site.v.perm)
    scale = b.const(np.array(site.scale, dtype=_NP.get(t_elem, np.float32)), "scale")
    return b.node("Mul", [q, scale], "q_scaled"), kt, v, t_elem


def _build_decomposed(model: onnx.ModelProto, site: AttentionSite, names: _Names) -> list[onnx.NodeProto]:
    b = _Builder(model, site, names)
    qs, kt, v, t_elem = scaled_operands(b)
    _finish(b, softmax_product(b, qs, kt, v, t_elem), t_elem)
    return b.nodes


def softmax_product(b: _Builder, qs: str, kt: str, v: str, t_elem: int, what: str = "") -> str:
    """Append MatMul(qs, kt) -> Softmax(-1) -> MatMul(., v) to ``b`` (the softmax in the site's softmax dtype,
    between Casts where it differs); returns the result. ``what`` prefixes the new names."""
    logits = b.node("MatMul", [qs, kt], f"{what}logits")
    if b.site.mask is not None:
        logits = b.node("Add", [logits, _additive_mask(b, b.site.mask, t_elem)], f"{what}logits_masked")
    soft = _ELEM.get(b.site.softmax_dtype or "", t_elem)
    if soft != t_elem:
        logits = b.node("Cast", [logits], f"{what}logits_cast", to=soft)
    p = b.node("Softmax", [logits], f"{what}weights", axis=-1)
    if b.site.nan_to_zero:
        zero = b.const(np.array(0, dtype=_NP.get(soft, np.float32)), f"{what}zero")
        p = b.node("Where", [b.node("IsNaN", [p], f"{what}weights_nan"), zero, p], f"{what}weights_finite")
    if soft != t_elem:
        p = b.node("Cast", [p], f"{what}weights_cast", to=t_elem)
    return b.node("MatMul", [p, v], f"{what}y")


MS_DOMAIN = "com.microsoft"


def _build_mha(model: onnx.ModelProto, site: AttentionSite, names: _Names) -> list[onnx.NodeProto]:
    """ONNX Runtime's contrib MultiHeadAttention: q, k, v as [B, S, heads*d] (flash attention on CPU and CUDA)."""
    assert site.q and site.k and site.v and site.rank and site.scale is not None and site.heads
    b = _Builder(model, site, names)
    t_elem = TensorProto.FLOAT
    q = b.operand(site.q, "q", t_elem, site.q.perm)
    k = b.operand(site.k, "k", t_elem, site.k.perm)
    v = b.operand(site.v, "v", t_elem, site.v.perm)
    heads = int(site.heads)
    if site.rank == 4:
        if heads == 1:
            axes = b.const(np.array([1], dtype=np.int64), "head_axis")
            q, k, v = (b.node("Squeeze", [t, axes], f"{w}_bsd") for t, w in ((q, "q"), (k, "k"), (v, "v")))
        else:
            flat = b.const(np.array([0, 0, -1], dtype=np.int64), "flat_heads")
            q, k, v = (b.node("Reshape", [b.node("Transpose", [t], f"{w}_bshd", perm=[0, 2, 1, 3]), flat], f"{w}_bsd")
                       for t, w in ((q, "q"), (k, "k"), (v, "v")))
    y = b.node("MultiHeadAttention", [q, k, v], "y", domain=MS_DOMAIN, num_heads=heads, scale=float(site.scale))
    if site.rank == 4:
        if heads == 1:
            y = b.node("Unsqueeze", [y, axes], "y_4d")
        else:
            split = b.const(np.array([0, 0, heads, -1], dtype=np.int64), "split_heads")
            y = b.node("Transpose", [b.node("Reshape", [y, split], "y_bshd")], "y_4d", perm=[0, 2, 1, 3])
    _finish(b, y, t_elem)
    return b.nodes


def _mha_problem(site: AttentionSite) -> str | None:
    if site.problem:
        return site.problem
    if site.mask is not None:
        return "a masked site keeps its written form in ONNX Runtime's serving form"
    if site.dtype not in ("float32", None) or (site.q is not None and site.q.compute_dtype not in ("float32", None)):
        return f"ONNX Runtime's MultiHeadAttention CPU kernel takes float32 only (the site computes in {site.dtype})"
    if site.rank not in (3, 4):
        return "the rank of the attention is unknown"
    if site.rank == 3 and (site.heads or 1) != 1:
        return "3-D attention with several heads"
    if not site.heads:
        return "the head count is unknown"
    if site.scale is None:
        return "the scale is unknown"
    return None


def to_onnxruntime_form(model: onnx.ModelProto, weights_folder: Path | None = None) -> RewriteResult:
    """Rewrite (in place) every FP32 attention site into ``com.microsoft.MultiHeadAttention``.

    The form ONNX Runtime serves fastest: its contrib kernel runs flash
    attention on CPU and CUDA, in memory linear in the sequence length, where
    MatMul/Softmax/MatMul and the ONNX ``Attention`` CPU kernel hold the whole
    S x S matrix. TensorRT cannot parse it, so this is never written into the
    standard artifact; runners apply it when they create a session.
    ``weights_folder``: where the data files of a model loaded without its
    external data are (for a scale only a run can tell).
    """
    ensure_node_names(model)
    result = _rewrite(model, "onnxruntime", _build_mha, _mha_problem, lambda site: False,
                      find_attention(model, probe=False, index=TypedIndex(model), weights_folder=weights_folder))
    if result.rewritten and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return result


def _op_to_decomposed_problem(site: AttentionSite) -> str | None:
    if site.problem:
        return site.problem
    if site.rank != 4:
        return "only 4-D Attention nodes are decomposed"
    if site.scale is None:
        return "the head size (hence the default scale) is unknown"
    return None


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Drop nodes whose outputs nothing reads, and initializers nothing reads; returns the nodes dropped."""
    g = model.graph
    outputs = {o.name for o in g.output}
    dropped = 0
    while True:
        used = read_names(g) | outputs
        keep = [n for n in g.node if any(o in used for o in n.output if o)]
        if len(keep) == len(g.node):
            break
        dropped += len(g.node) - len(keep)
        del g.node[:]
        g.node.extend(keep)
    drop_unused_initializers(model)
    return dropped


def canonicalize_attention(model: onnx.ModelProto, form: str = "op", *,
                           sites: list[AttentionSite] | None = None, run: bool = True) -> RewriteResult:
    """Rewrite every attention site of ``model`` (in place) into ``form``: "op" or "decomposed".

    Sites that cannot be rewritten are left as they are and listed in
    ``unfused`` with the reason; the caller decides whether that is an error.
    NCSN++'s spatial attention is first put in its flattened form
    (:func:`.spatial.flatten_spatial_attention`).
    """
    if form not in TARGET_FORMS:
        raise ValueError(f"form must be one of {TARGET_FORMS} (got {form!r})")
    if form == "op" and default_opset(model) < 23:
        raise ValueError(f"the ONNX Attention op needs opset 23 or later (model is at {default_opset(model)})")
    ensure_node_names(model)
    if sites is None and flatten_spatial_attention(model):
        remove_dead_nodes(model)  # the reshapes' shape computations
    found = sites if sites is not None else find_attention(model, probe=False, index=TypedIndex(model), run=run)

    def problem(site: AttentionSite) -> str | None:
        p = _op_to_decomposed_problem(site) if site.form == "op" else site.problem
        if p is None and (site.scale is None or site.q is None or site.rank is None):
            p = "the site is not fully described"
        return p

    def unchanged(site: AttentionSite) -> bool:
        if form == "op":
            # An Attention node whose mask broadcasts the query axis crashes ONNX Runtime: rewrite it (4-D only).
            return site.form == "op" and (site.mask is None or site.mask.full_query_axis or site.rank != 4)
        return site.canonical

    return _rewrite(model, form, _build_op if form == "op" else _build_decomposed, problem, unchanged, found)


Build = Callable[[onnx.ModelProto, AttentionSite, "_Names"], list[onnx.NodeProto]]


def _rewrite(model: onnx.ModelProto, form: str, build: Build, problem: Callable[[AttentionSite], str | None],
             unchanged: Callable[[AttentionSite], bool], found: list[AttentionSite]) -> RewriteResult:
    """The loop every target shares: skip what is already in form, record what cannot be rewritten, splice the rest.

    ``found`` must come from ``model`` after :func:`ensure_node_names`: edits address nodes by name.
    """
    names = _Names.of(model)
    result = RewriteResult(form=form, sites=found)
    edits: list[tuple[set[str], list[onnx.NodeProto]]] = []
    for site in found:
        if unchanged(site):
            result.unchanged.append(site.name)
            continue
        reason = problem(site)
        if reason is not None:
            site.problem = reason
            result.unfused.append(site)
            continue
        edits.append((set(site.nodes), build(model, site, names)))
        result.rewritten.append(site.name)
    if edits:
        _splice(model, edits)
        remove_dead_nodes(model)
    return result


def _splice(model: onnx.ModelProto, edits: list[tuple[set[str], list[onnx.NodeProto]]]) -> None:
    """Remove each edit's nodes and insert its new nodes where the last removed node stood."""
    g = model.graph
    owner = {name: k for k, (names, _) in enumerate(edits) for name in names}
    last: dict[int, int] = {}
    removed: set[int] = set()
    for i, n in enumerate(g.node):
        if n.name in owner:
            removed.add(i)
            last[owner[n.name]] = i
    position = {i: edits[k][1] for k, i in last.items()}
    nodes: list[onnx.NodeProto] = []
    for i, n in enumerate(g.node):
        if i in position:
            nodes.extend(position[i])
        elif i not in removed:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    # Stale value_info for removed tensors would contradict the new graph; shape inference restores it.
    live = {o for n in g.node for o in n.output}
    keep = [vi for vi in g.value_info if vi.name in live]
    del g.value_info[:]
    g.value_info.extend(keep)


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Give every unnamed or duplicate-named node a unique name (rewrites address nodes by name)."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            base = n.name or f"{n.op_type}_{i}"
            name, k = base, 1
            while name in seen:
                k += 1
                name = f"{base}_{k}"
            n.name = name
        seen.add(n.name)
