"""The one attention finder: every attention site of an ONNX graph, described completely.

A site is anchored on a ``Softmax`` whose input is a product of two
activations (MatMul or Einsum: the Q·Kᵀ shape), or on an ONNX ``Attention``
node. From the anchor the finder walks back over Casts and scalar Mul/Div
(the scale, wherever it sits: on q, on k, on both as √scale, or on the
logits; constant or computed from a static dim at run time) and Transposes
on the K side, and forward to the second product with V. Each site records
q, k and v as they enter it, the permutation that brings each into the
[..., S, d] layout, the total scale and where it was applied, heads, head
size, the sequence length, dtypes, and the nodes that make it up.

A mask or bias on the logits is part of the site: an ``Add`` of a tensor
that does not come from Q·Kᵀ (an additive mask, SDPA's float ``attn_mask``,
a position bias), a ``Where`` that writes a large negative value where a
boolean mask says so (``masked_fill``), or the ``Attention`` op's
``attn_mask`` input. It is recorded as :class:`Mask` and carried through
every rewrite.

A Softmax over a Q·Kᵀ-shaped product that cannot be described (an op between
Q·Kᵀ and the Softmax that is not a scale, Cast or mask, an Einsum that is not
a contraction over the channels, a scale that depends on H or W, ...) is
still a site, with
``problem`` saying why it cannot be rewritten: every command counts the same
sites, and none is silently left unfused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence, cast

import onnx
from onnx import numpy_helper

from .index import TypedIndex, dtype_name, node_attr, swap_last_two
from .probe import DEFAULT_P, eval_dim_expression, level_at, level_of, probe_index, run_probe, seq_expression
from .scalar import eval_scalar

PASS_THROUGH = ("Cast", "Identity")
# Ops that move elements without changing them (a scalar factor behind one still scales every element).
_MOVES_ONLY = ("Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")
# A Where writing a value at or below this where a boolean mask says so is masking (masked_fill(-inf), -1e9, fp16 lowest).
_MASK_FILL_MAX = -1e4
# How far back from a Softmax to look for a Q·Kᵀ product behind ops the finder does not understand.
_LOOKBACK = 6


@dataclass
class Operand:
    """One of q, k, v as it enters an attention site."""

    tensor: str                      # the graph tensor (before any scale, Cast or layout change of the site)
    perm: list[int] | None = None    # transpose that puts it in [..., S, d] (None: it already is)
    dtype: str | None = None         # its element type
    compute_dtype: str | None = None  # the element type the site's product computes in

    def canonical_shape(self, shape: Sequence[Any] | None) -> list[Any] | None:
        """``shape`` (of ``tensor``) in the [..., S, d] layout; None when unknown or of another rank."""
        if shape is None:
            return None
        if self.perm is None:
            return list(shape)
        if len(self.perm) != len(shape):
            return None
        return [shape[i] for i in self.perm]


@dataclass
class Mask:
    """A mask or bias on the logits: softmax(scale·Q·Kᵀ + bias), or with masked positions set to ``fill``."""

    tensor: str                 # the mask as the site reads it
    kind: str                   # "additive" (added to the logits) | "keep" (bool, True = attend) | "drop" (bool, True = masked)
    fill: float | None = None   # for a boolean mask: the logit written at masked positions (-inf when None)
    shape: list[Any] | None = None  # its shape, as far as shape inference knows it
    full_query_axis: bool = False   # its second-to-last axis is the query axis at full length (not broadcast)
    dtype: str | None = None        # its element type

    @property
    def description(self) -> str:
        what = {"additive": "additive", "keep": "boolean, True attends", "drop": "boolean, True masks"}[self.kind]
        shown = ["?" if isinstance(d, str) and d.startswith("unk__") else str(d) for d in self.shape or []]
        dims = "[" + ", ".join(shown) + "]" if self.shape is not None else "shape unknown"
        return f"{what} {dims}"


@dataclass
class Factor:
    """One scalar multiplier of the site (Mul by c or Div by c), wherever it sits."""

    placement: str           # "q" | "k" | "logits"
    tensor: str              # the scalar operand
    divides: bool            # Div(x, c): the factor is 1/c
    value: float | None      # the factor (already inverted for Div); None while unknown
    source: str              # "constant" | "shape" | "dynamic"

    def at(self, placement: str) -> "Factor":
        return Factor(placement, self.tensor, self.divides, self.value, self.source)


# TensorRT's fused multi-head attention kernels take FP16/BF16 head sizes 16..256 in steps of 8 (its developer
# guide, "multi-head attention fusion"); outside that window a site runs as separate kernels.
HEAD_SIZE_MIN, HEAD_SIZE_MAX, HEAD_SIZE_ALIGN = 16, 256, 8


def head_size_fusable(head_size: int | None) -> bool | None:
    """FP16/BF16 fused MHA window: 16 <= H <= 256 and H % 8 == 0 (None if unknown)."""
    if head_size is None:
        return None
    return HEAD_SIZE_MIN <= head_size <= HEAD_SIZE_MAX and head_size % HEAD_SIZE_ALIGN == 0


DYNAMIC_SCALE = "the attention scale depends on a dynamic dim (it cannot be folded into a constant)"


def finish_scale(site: "AttentionSite") -> None:
    """Total scale, placement and source from the site's factors."""
    factors = site.factors
    places = [p for p in ("q", "k", "logits") if any(f.placement == p for f in factors)]
    site.scale_placement = "+".join(places) if places else "none"
    sources = {f.source for f in factors}
    site.scale_source = "dynamic" if "dynamic" in sources else ("shape" if "shape" in sources else "constant")
    if site.scale_source == "dynamic":
        site.scale = None
        if site.problem is None:
            site.problem = DYNAMIC_SCALE
        return
    if site.problem == DYNAMIC_SCALE:
        site.problem = None
    site.scale = math.prod(float(f.value) for f in factors if f.value is not None) if factors else 1.0


@dataclass
class AttentionSite:
    """One attention computation: softmax(scale · Q·Kᵀ)·V."""

    name: str                       # module-path prefix, e.g. "/downs.1/attention"
    form: str                       # "op" (ONNX Attention) | "decomposed" (MatMul/Softmax/MatMul) | "einsum"
    anchor: str                     # the Softmax (or Attention) node
    nodes: list[str] = field(default_factory=list)
    q: Operand | None = None
    k: Operand | None = None
    v: Operand | None = None
    out: str | None = None          # the tensor the site produces
    out_perm: list[int] | None = None  # transpose from [..., S, dv] back to the layout of ``out``
    out_dtype: str | None = None
    rank: int | None = None         # 3 ([B, S, d]) or 4 ([B, heads, S, d]) after the layout change
    scale: float | None = None      # the total scale (None: unknown)
    scale_placement: str = "none"   # "q", "k", "q+k", "logits", combinations joined by "+", "attribute", "default"
    scale_source: str = "constant"  # "constant" | "shape" (computed at run time from a static dim) | "dynamic"
    heads: int | None = None
    head_size: int | None = None
    seq_len: int | str | None = None
    kv_len: int | str | None = None  # the key/value sequence length (the query's is seq_len)
    kind: str = "self"              # "self" (K/V from the image path) | "cross" (K/V from other inputs only)
    level: int | None = None        # resolution level: seq_len = (H/2**level)*(W/2**level)
    dtype: str | None = None        # element type of the Q·Kᵀ product
    softmax_dtype: str | None = None
    factors: list[Factor] = field(default_factory=list)
    canonical: bool = False         # exactly Mul(q, scale) -> MatMul(., Kᵀ) -> Softmax(-1) -> MatMul(., v)
    problem: str | None = None      # why the site cannot be rewritten (None: it can)
    # Scalar factors on Q and K further up, behind reshapes or transposes (guided-diffusion's QKVAttention:
    # (q * √scale).view(...)): part of the softmax scale, but they stay in the graph on a rewrite.
    upstream_scale: float = 1.0
    mask: Mask | None = None        # a mask or bias on the logits (None: none)
    nan_to_zero: bool = False       # the weights of a fully masked row are 0, not NaN (Where(IsNaN(p), 0, p))

    @property
    def total_scale(self) -> float | None:
        """The whole softmax scale: the site's own factors times those on Q and K further up."""
        return None if self.scale is None else self.scale * self.upstream_scale

    @property
    def scale_before_product(self) -> bool:
        """True when no scale sits on the logits (the placement TensorRT's pattern fusion needs)."""
        return "logits" not in self.scale_placement.split("+")

    @property
    def form_description(self) -> str:
        return {"op": "ONNX Attention op", "decomposed": "MatMul/Softmax/MatMul",
                "einsum": "Einsum/Softmax/Einsum"}.get(self.form, self.form)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale_before_product"] = self.scale_before_product
        return d


class _Operands(NamedTuple):
    """What reading a site's operands learned besides q, k, v: its scale factors and how canonical it is."""

    factors: list[Factor]
    casts: int
    q_mul_only: bool   # the scale is one Mul on q
    k_direct: bool     # the product takes k as Kᵀ directly or through one Transpose


# ---------------------------------------------------------------------------------------------------------------------
class _Finder:
    def __init__(self, idx: TypedIndex) -> None:
        self.idx = idx
        # The image: the 4-D graph inputs (a denoiser has one; cross-attention is K computed without it).
        self.images = {i.name for i in idx.graph.input
                       if i.name in idx.inputs and len(i.type.tensor_type.shape.dim) == 4}

    # -- scalars ---------------------------------------------------------------------------------------------------
    def _is_scalar_shaped(self, name: str) -> bool:
        const = self.idx.const(name)
        if const is not None:
            return const.size == 1
        shape = self.idx.shapes.get(name)
        return shape is not None and all(d == 1 for d in shape)

    def _scalar(self, name: str) -> tuple[float | None, str]:
        """(value, source) of a scalar operand: source "constant", "shape" or "dynamic"."""
        c = self.idx.scalar(name)
        if c is not None:
            return c, "constant"
        v = eval_scalar(self.idx, name)
        return (v, "shape") if v is not None else (None, "dynamic")

    def _scale_factor(self, node: onnx.NodeProto) -> tuple[str, Factor] | None:
        """For Mul/Div by a scalar: (the other input, the factor); None for anything else."""
        if node.op_type == "Mul":
            for i, j in ((1, 0), (0, 1)):
                if self._is_scalar_shaped(node.input[i]) and not self._is_scalar_shaped(node.input[j]):
                    value, source = self._scalar(node.input[i])
                    return node.input[j], Factor("", node.input[i], False, value, source)
        elif node.op_type == "Div" and self._is_scalar_shaped(node.input[1]):
            value, source = self._scalar(node.input[1])
            if value == 0:
                return None
            return node.input[0], Factor("", node.input[1], True, (1.0 / value if value is not None else None), source)
        return None

    # -- walks -----------------------------------------------------------------------------------------------------
    def inputs_behind(self, tensor: str) -> set[str]:
        """The graph inputs whose values ``tensor`` is computed from (not those that only size it)."""
        return self.idx.behind(tensor, through_shape=False) & self.idx.inputs

    def kind(self, site: AttentionSite, model: onnx.ModelProto) -> str:
        """"cross" when K is not computed from the image (a text context), else "self".

        The image is the 4-D graph input. Q deeper in a conditioned UNet reads
        the context too (through earlier cross-attention), so sharing inputs
        with Q does not make K the image's.
        """
        if site.q is None or site.k is None:
            return "self"
        k_in = self.inputs_behind(site.k.tensor)
        if len(self.images) == 1:
            if not k_in or k_in & self.images:
                return "self"
        elif not k_in or k_in & self.inputs_behind(site.q.tensor):
            return "self"
        if site.kv_len is None:
            # Shape inference often loses K's length behind the head split: a [B, S, D] context input names it.
            for vi in model.graph.input:
                dims = vi.type.tensor_type.shape.dim
                if vi.name in k_in and len(dims) == 3:
                    site.kv_len = dims[1].dim_value if dims[1].HasField("dim_value") else (dims[1].dim_param or None)
                    break
        return "cross"

    def upstream_scale(self, site: AttentionSite) -> float:
        """The product of constant scalar Mul/Div on Q and on K behind ops that only move elements.

        A Split, Slice or anything that mixes elements ends the walk: a factor
        behind it would also scale V, or only part of a tensor.
        """
        total = 1.0
        for operand in (site.q, site.k):
            if operand is None:
                continue
            tensor = operand.tensor
            for _ in range(16):
                node = self.idx.producer.get(tensor)
                if node is None:
                    break
                scaled = self._scale_factor(node)
                if scaled is not None:
                    tensor, factor = scaled
                    if factor.value is None or factor.source == "dynamic":
                        break
                    total *= float(factor.value)
                    continue
                if node.op_type in _MOVES_ONLY:
                    tensor = node.input[0]
                    continue
                break
        return total

    def strip(self, tensor: str, *, transposes: bool = False) -> tuple[str, list[int] | None, list[Factor],
                                                                       list[onnx.NodeProto], int]:
        """Walk back over Casts, scalar Mul/Div and (optionally) Transposes.

        Returns (tensor reached, composed permutation from it to ``tensor``,
        scale factors, nodes walked, Casts walked).
        """
        perm: list[int] | None = None
        factors: list[Factor] = []
        nodes: list[onnx.NodeProto] = []
        casts = 0
        for _ in range(16):
            node = self.idx.producer.get(tensor)
            if node is None:
                break
            if node.op_type in PASS_THROUGH:
                casts += node.op_type == "Cast"
                nodes.append(node)
                tensor = node.input[0]
                continue
            if node.op_type == "Add" and len(node.input) == 2:
                # torch.baddbmm(empty, q, kᵀ, beta=0, alpha=scale), as diffusers' classic AttnProcessor
                # writes attention, exports as Add(Mul(logits, alpha), Mul(ConstantOfShape(0), 0)).
                zero = [i for i in node.input if self._is_zero(i)]
                if len(zero) == 1:
                    nodes.append(node)
                    tensor = next(i for i in node.input if i != zero[0])
                    continue
            scaled = self._scale_factor(node)
            if scaled is not None:
                tensor, factor = scaled
                factors.append(factor)
                nodes.append(node)
                continue
            if transposes and node.op_type == "Transpose":
                t = list(cast("list[int]", node_attr(node, "perm", [])) or [])  # perm: an INTS attribute
                if not t:
                    break
                current = perm or list(range(len(t)))
                if len(current) != len(t):
                    break
                perm = [t[i] for i in current]
                nodes.append(node)
                tensor = node.input[0]
                if perm == swap_last_two(len(perm)):
                    break  # Kᵀ reached: what lies behind is how the model makes K
                continue
            break
        return tensor, perm, factors, nodes, casts

    def _is_zero(self, name: str, depth: int = 0) -> bool:
        """True for a tensor that is zero by construction: a zero constant, ConstantOfShape(0), or x * 0 of those."""
        const = self.idx.const(name)
        if const is not None:
            return const.size > 0 and not const.any()
        node = self.idx.producer.get(name)
        if node is None or depth > 3:
            return False
        if node.op_type == "ConstantOfShape":
            value = cast("onnx.TensorProto | None", node_attr(node, "value"))  # value: a TENSOR attribute
            return value is None or not numpy_helper.to_array(value).any()
        if node.op_type == "Mul" and len(node.input) == 2:
            a, b = node.input
            finite = lambda t: self.idx.const(t) is not None or self._is_zero(t, depth + 1) or (  # noqa: E731
                self.idx.producer.get(t) is not None and self.idx.producer[t].op_type == "ConstantOfShape")
            return (self._is_zero(a, depth + 1) and finite(b)) or (self._is_zero(b, depth + 1) and finite(a))
        return False

    def _is_activation(self, name: str) -> bool:
        return bool(name) and not self.idx.is_const(name)

    def _product_behind(self, tensor: str) -> onnx.NodeProto | None:
        """A MatMul/Einsum of two activations up to a few nodes behind ``tensor`` (masks, biases, odd ops)."""
        frontier = [tensor]
        for _ in range(_LOOKBACK):
            nxt: list[str] = []
            for t in frontier:
                node = self.idx.producer.get(t)
                if node is None:
                    continue
                if node.op_type in ("MatMul", "Einsum") and len(node.input) == 2 and all(
                        self._is_activation(i) for i in node.input):
                    return node
                nxt.extend(i for i in node.input if self._is_activation(i))
            frontier = nxt
        return None

    # -- masks -------------------------------------------------------------------------------------------------------
    def _nan_guard(self, p: str, users: list[onnx.NodeProto]) -> list[onnx.NodeProto] | None:
        """[IsNaN, Where] when the weights ``p`` are read only by Where(IsNaN(p), 0, p)."""
        if len(users) != 2 or p in self.idx.outputs:
            return None
        isnan = next((u for u in users if u.op_type == "IsNaN"), None)
        where = next((u for u in users if u.op_type == "Where"), None)
        if isnan is None or where is None or list(where.input[::2]) != [isnan.output[0], p]:
            return None
        if not self._is_zero(where.input[1]) or [u.name for u in self.idx.users(isnan.output[0])] != [where.name]:
            return None
        return [isnan, where]

    def _leads_to_product(self, tensor: str) -> bool:
        end = self.strip(tensor)[0]
        node = self.idx.producer.get(end)
        return node is not None and node.op_type in ("MatMul", "Einsum") and len(node.input) == 2 and all(
            self._is_activation(i) for i in node.input)

    def _fill_value(self, name: str) -> float | None:
        """The constant a masked position gets, when it is one large negative scalar (masked_fill(-inf))."""
        value = self.idx.scalar(name)
        if value is None:
            value = eval_scalar(self.idx, name)
        return float(value) if value is not None and value <= _MASK_FILL_MAX else None

    def _mask_at(self, tensor: str) -> tuple[Mask, onnx.NodeProto, str] | None:
        """(mask, its node, the logits side) when ``tensor`` is the logits with a mask or bias applied."""
        node = self.idx.producer.get(tensor)
        if node is None:
            return None
        if node.op_type == "Add" and len(node.input) == 2:
            for i in (0, 1):
                logits, bias = node.input[i], node.input[1 - i]
                if self._leads_to_product(logits) and not self._reads(bias, self.strip(logits)[0]):
                    return Mask(bias, "additive"), node, logits
        if node.op_type == "Where" and len(node.input) == 3:
            cond, a, b = node.input
            for kind, logits, fill in (("keep", a, b), ("drop", b, a)):
                value = self._fill_value(fill)
                if value is not None and self._leads_to_product(logits) and not self._reads(cond, self.strip(logits)[0]):
                    return Mask(cond, kind, None if math.isinf(value) else value), node, logits
        return None

    def _reads(self, tensor: str, target: str) -> bool:
        """True when ``tensor`` is computed from ``target`` (a bias made from the logits is not a mask)."""
        return target in self.idx.behind(tensor)

    def _describe_mask(self, site: AttentionSite, logits: str) -> None:
        """The mask's shape, and whether it spans the query axis at full length."""
        assert site.mask is not None
        shape = self.idx.shapes.get(site.mask.tensor)
        site.mask.shape = list(shape) if shape is not None else None
        site.mask.dtype = self.idx.dtype(site.mask.tensor)
        site.mask.full_query_axis = _full_query_axis(site.mask.shape, self.idx.shapes.get(logits))

    # -- the match -------------------------------------------------------------------------------------------------
    def softmax_site(self, softmax: onnx.NodeProto) -> AttentionSite | None:
        idx = self.idx
        logits_in = softmax.input[0]
        pre, _, post_factors, post_nodes, post_casts = self.strip(logits_in)
        masked = self._mask_at(pre)
        mask_node: onnx.NodeProto | None = None
        mask_problem: str | None = None
        if masked is not None:
            mask, mask_node, logits_side = masked
            if post_factors:
                mask_problem = (f"a scale is applied after the mask ({mask_node.name}); "
                                "only a scale before the mask can move onto Q")
            pre, _, post_factors, more_nodes, more_casts = self.strip(logits_side)
            post_nodes = post_nodes + [mask_node] + more_nodes
            post_casts += more_casts
        product = idx.producer.get(pre)
        is_product = product is not None and product.op_type in ("MatMul", "Einsum") and len(product.input) == 2 \
            and all(self._is_activation(i) for i in product.input)
        site = AttentionSite(name="", form="decomposed", anchor=softmax.name, softmax_dtype=idx.dtype(logits_in))
        if masked is not None and is_product:
            site.mask = masked[0]
            site.problem = mask_problem
        if not is_product:
            behind = self._product_behind(logits_in)
            if behind is None:
                return None  # a Softmax that is not over a Q·Kᵀ product: not attention
            site.name = _prefix(behind.name) or softmax.name
            site.form = "einsum" if behind.op_type == "Einsum" else "decomposed"
            between = idx.producer.get(pre)
            what = between.op_type if between is not None else "an input"
            site.problem = (f"{what} node {between.name if between is not None else ''} sits between Q·Kᵀ and the "
                            "Softmax (a mask or bias); only a scalar scale and Casts may").replace("  ", " ")
            site.nodes = [behind.name, softmax.name]
            return site
        assert product is not None
        site.name = _prefix(product.name) or softmax.name
        site.form = "einsum" if product.op_type == "Einsum" else "decomposed"
        site.dtype = idx.dtype(product.output[0])
        nodes: list[onnx.NodeProto] = [product] + post_nodes + [softmax]
        rank_logits = idx.rank(product.output[0]) or idx.rank(logits_in)

        # Softmax over the last axis (the keys).
        default_axis = -1 if idx.opset >= 13 else 1
        axis = int(cast(int, node_attr(softmax, "axis", default_axis)))  # axis: an INT attribute
        if axis != -1 and (rank_logits is None or axis != rank_logits - 1):
            site.problem = f"Softmax {softmax.name} runs over axis {axis}, not the key axis (the last)"
            site.nodes = [n.name for n in nodes]
            return site

        # Forward: Casts, then the product with V.
        p_tensor = softmax.output[0]
        fwd: list[onnx.NodeProto] = []
        second: onnx.NodeProto | None = None
        for _ in range(8):
            users = idx.users(p_tensor)
            guard = self._nan_guard(p_tensor, users)
            if guard is not None:
                # PyTorch's SDPA with a boolean mask writes 0 for a fully masked row (the Attention op does too).
                site.nan_to_zero = True
                fwd.extend(guard)
                p_tensor = guard[-1].output[0]
                continue
            if len(users) != 1 or p_tensor in idx.outputs:
                break
            u = users[0]
            if u.op_type in PASS_THROUGH:
                fwd.append(u)
                p_tensor = u.output[0]
                continue
            if u.op_type in ("MatMul", "Einsum") and len(u.input) == 2:
                second = u
            break
        nodes += fwd
        if second is None:
            site.problem = (f"the output of Softmax {softmax.name} does not go (through Casts only) to a single "
                            "MatMul or Einsum with V")
            site.nodes = [n.name for n in nodes]
            return site
        nodes.append(second)
        site.out = second.output[0]
        site.out_dtype = idx.dtype(site.out)

        if product.op_type == "MatMul":
            if second.op_type != "MatMul" or second.input[0] != p_tensor:
                site.problem = f"{second.op_type} {second.name} does not take the attention weights as its first input"
                site.nodes = [n.name for n in nodes]
                return site
            found = self._matmul_operands(site, product, second, nodes)
        else:
            found = self._einsum_operands(site, product, second, nodes, p_tensor)
        site.nodes = [n.name for n in _unique(nodes)]
        if found is None:
            return site

        site.factors = found.factors + [f.at("logits") for f in post_factors]
        finish_scale(site)
        casts = post_casts + found.casts + sum(1 for n in fwd if n.op_type == "Cast")
        if site.problem is None:
            self._check_exclusive(site, _unique(nodes))
        if site.mask is not None:
            self._describe_mask(site, product.output[0])
        # A canonical masked site adds an additive mask straight to Q·Kᵀ: MatMul -> Add -> Softmax.
        mask_direct = site.mask is None or (
            site.mask.kind == "additive" and mask_node is not None and product.output[0] in mask_node.input
            and softmax.input[0] == mask_node.output[0])
        site.canonical = (site.problem is None and site.form == "decomposed" and casts == 0 and mask_direct
                          and site.scale_placement == "q"
                          and site.scale_source == "constant" and found.q_mul_only and site.q is not None
                          and site.q.perm is None and site.v is not None and site.v.perm is None
                          and site.out_perm is None and found.k_direct)
        return site

    # operands of a MatMul site ----------------------------------------------------------------------------------------
    def _matmul_operands(self, site: AttentionSite, mm1: onnx.NodeProto, mm2: onnx.NodeProto,
                         nodes: list[onnx.NodeProto]) -> _Operands | None:
        idx = self.idx
        q, q_perm, q_f, q_nodes, q_casts = self.strip(mm1.input[0])
        k, k_perm, k_f, k_nodes, k_casts = self.strip(mm1.input[1], transposes=True)
        v, _, v_f, v_nodes, v_casts = self.strip(mm2.input[1])
        nodes += q_nodes + k_nodes + v_nodes
        rank = idx.rank(mm1.output[0]) or idx.rank(mm1.input[0])
        ranks = {r for t in (q, k, v) if (r := idx.rank(t)) is not None}
        if rank is None:
            site.problem = f"the rank of {mm1.name}'s output is unknown (shape inference could not tell)"
            return None
        if rank not in (3, 4) or (ranks and ranks != {rank}):
            site.problem = f"Q·Kᵀ is {rank}-D with operands of rank {sorted(ranks)}; the Attention op takes 3-D or 4-D q, k, v"
            return None
        if v_f:
            site.problem = f"V is scaled inside the attention ({mm2.name}); only q, k and the logits may be"
            return None
        swap = swap_last_two(rank)
        total = k_perm or list(range(rank))
        if sorted(total) != list(range(rank)):
            site.problem = f"K reaches {mm1.name} through a transpose of another rank"
            return None
        k_canon = [total[i] for i in swap]  # k -> [..., S, d]
        site.rank = rank
        site.q = Operand(q, None, idx.dtype(q), idx.dtype(mm1.input[0]))
        site.k = Operand(k, None if k_canon == list(range(rank)) else k_canon, idx.dtype(k), idx.dtype(mm1.input[1]))
        site.v = Operand(v, None, idx.dtype(v), idx.dtype(mm2.input[1]))
        q_muls = [n for n in q_nodes if n.op_type != "Cast"]
        # Canonical K side: MatMul takes k itself as Kᵀ, or one Transpose of the last two axes of k.
        return _Operands(factors=[f.at("q") for f in q_f] + [f.at("k") for f in k_f], casts=q_casts + k_casts + v_casts,
                         q_mul_only=len(q_muls) == 1 and q_muls[0].op_type == "Mul" and not k_f,
                         k_direct=[n.op_type for n in k_nodes] in ([], ["Transpose"]))

    # operands of an Einsum site ---------------------------------------------------------------------------------------
    def _einsum_operands(self, site: AttentionSite, e1: onnx.NodeProto, e2: onnx.NodeProto,
                         nodes: list[onnx.NodeProto], p_tensor: str) -> _Operands | None:
        idx = self.idx
        if e2.op_type != "Einsum":
            site.problem = f"{e1.name} is an Einsum but {e2.name} is a {e2.op_type}; both products must be Einsums"
            return None
        parsed1 = _parse_einsum(_equation(e1))
        parsed2 = _parse_einsum(_equation(e2))
        if parsed1 is None or parsed2 is None:
            site.problem = f"Einsum equations {_equation(e1)!r} / {_equation(e2)!r} are not two-operand contractions without ellipsis"
            return None
        (x, y), z = parsed1
        batch = z[:-2]
        t, s = z[-2], z[-1]
        cs = (set(x) & set(y)) - set(z)
        if len(cs) != 1 or set(x) != set(batch) | {t} | cs or set(y) != set(batch) | {s} | cs or len(x) != len(z) or len(y) != len(z):
            site.problem = f"Einsum {e1.name} ({_equation(e1)}) is not Q·Kᵀ over one channel axis"
            return None
        c = cs.pop()
        # The attention weights enter the second Einsum in the logits' layout.
        (a, b), o = parsed2
        first = 0 if e2.input[0] == p_tensor else 1
        pw, vw = (a, b) if first == 0 else (b, a)
        if len(pw) != len(z):
            site.problem = f"Einsum {e2.name} ({_equation(e2)}) does not read the weights in the logits' layout"
            return None
        batch2, t2, s2 = pw[:-2], pw[-2], pw[-1]
        es = set(vw) - set(pw)
        if len(es) != 1 or set(vw) != set(batch2) | {s2} | es or set(o) != set(batch2) | {t2} | es or len(o) != len(z):
            site.problem = f"Einsum {e2.name} ({_equation(e2)}) is not weights·V over the key axis"
            return None
        e = es.pop()
        rank = len(z)
        if rank not in (3, 4):
            site.problem = f"the Einsum attention is {rank}-D; the Attention op takes 3-D or 4-D q, k, v"
            return None
        q, _, q_f, q_nodes, q_casts = self.strip(e1.input[0])
        k, _, k_f, k_nodes, k_casts = self.strip(e1.input[1])
        v_in = e2.input[1 - first]
        v, _, v_f, v_nodes, v_casts = self.strip(v_in)
        nodes += q_nodes + k_nodes + v_nodes
        if v_f:
            site.problem = f"V is scaled inside the attention ({e2.name}); only q, k and the logits may be"
            return None
        ident = list(range(rank))
        q_perm = [x.index(ch) for ch in batch + t + c]
        k_perm = [y.index(ch) for ch in batch + s + c]
        v_perm = [vw.index(ch) for ch in batch2 + s2 + e]
        canon_out = batch2 + t2 + e
        out_perm = [canon_out.index(ch) for ch in o]
        site.rank = rank
        site.q = Operand(q, None if q_perm == ident else q_perm, idx.dtype(q), idx.dtype(e1.input[0]))
        site.k = Operand(k, None if k_perm == ident else k_perm, idx.dtype(k), idx.dtype(e1.input[1]))
        site.v = Operand(v, None if v_perm == ident else v_perm, idx.dtype(v), idx.dtype(v_in))
        site.out_perm = None if out_perm == ident else out_perm
        return _Operands(factors=[f.at("q") for f in q_f] + [f.at("k") for f in k_f], casts=q_casts + k_casts + v_casts,
                         q_mul_only=False, k_direct=False)

    # exclusivity ------------------------------------------------------------------------------------------------------
    def _check_exclusive(self, site: AttentionSite, nodes: list[onnx.NodeProto]) -> None:
        """Intermediate results used outside the site would be lost by a rewrite."""
        inside = {id(n) for n in nodes}
        for n in nodes:
            for o in n.output:
                if o == site.out:
                    continue
                if o in self.idx.outputs or any(id(u) not in inside for u in self.idx.users(o)):
                    site.problem = f"{o} (from {n.name}) inside the attention is also used elsewhere"
                    return

    def op_site(self, node: onnx.NodeProto) -> AttentionSite:
        idx = self.idx
        q, k, v = (node.input[i] if len(node.input) > i else "" for i in range(3))
        rank = idx.rank(q)
        scale = cast("float | None", node_attr(node, "scale"))  # scale: a FLOAT attribute
        site = AttentionSite(
            name=_prefix(node.name) or node.name, form="op", anchor=node.name, nodes=[node.name],
            q=Operand(q, None, idx.dtype(q), idx.dtype(q)), k=Operand(k, None, idx.dtype(k), idx.dtype(k)),
            v=Operand(v, None, idx.dtype(v), idx.dtype(v)), out=node.output[0], out_dtype=idx.dtype(node.output[0]),
            rank=rank, scale=float(scale) if scale is not None else None,
            scale_placement="attribute" if scale is not None else "default", dtype=idx.dtype(q),
            softmax_dtype=dtype_name(int(cast(int, node_attr(node, "softmax_precision", 0)) or 0)) or idx.dtype(q),
        )
        if len(node.input) > 3 and node.input[3]:
            m = node.input[3]
            site.mask = Mask(m, "keep" if idx.dtype(m) == "bool" else "additive", dtype=idx.dtype(m))
            shape = idx.shapes.get(m)
            site.mask.shape = list(shape) if shape is not None else None
            q_shape = idx.shapes.get(q)
            site.mask.full_query_axis = _full_query_axis(site.mask.shape, q_shape if rank == 4 else None) or (
                (p := idx.producer.get(m)) is not None and p.op_type == "Expand")
        extras = [i for i in node.input[4:] if i]
        if extras or len([o for o in node.output if o]) > 1 or node_attr(node, "is_causal", 0):
            site.problem = "the Attention node has a KV cache, extra outputs or is causal"
        return site


def _full_query_axis(mask: Sequence[Any] | None, logits_or_q: Sequence[Any] | None) -> bool:
    """True when the mask's second-to-last dim is known to equal the query length (ONNX Runtime's Attention
    kernel does not broadcast that axis)."""
    if mask is None or logits_or_q is None or len(mask) < 2 or len(logits_or_q) < 2:
        return False
    m, q = mask[-2], logits_or_q[-2]
    return m == q and (isinstance(m, int) or (isinstance(m, str) and not m.startswith("unk__")))


def _unique(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    seen: set[int] = set()
    out = []
    for n in nodes:
        if id(n) not in seen:
            seen.add(id(n))
            out.append(n)
    return out


def _prefix(node_name: str) -> str:
    return node_name.rsplit("/", 1)[0] if "/" in node_name else ""


def _equation(node: onnx.NodeProto) -> str:
    eq = node_attr(node, "equation", "")
    return (eq.decode() if isinstance(eq, bytes) else str(eq or "")).replace(" ", "")


def _parse_einsum(eq: str) -> tuple[tuple[str, str], str] | None:
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    parts = lhs.split(",")
    if len(parts) != 2 or not all(p.isalpha() for p in parts + [out]):
        return None
    return (parts[0], parts[1]), out


def _fill_shapes(site: AttentionSite, idx: TypedIndex, probe: TypedIndex | None, p: int,
                 probe_hw: tuple[int, int] | None = None) -> None:
    """Heads, head size, sequence length and level from symbolic shapes, then from the probe
    (pinned at ``probe_hw``, (height, width); the standard probe's (2p, p) when None)."""
    if site.q is None or site.problem is not None and site.rank is None:
        return

    for index in (idx, probe):
        if index is None:
            continue
        qs = site.q.canonical_shape(index.shapes.get(site.q.tensor))
        if not qs or len(qs) < 3:
            continue
        if site.head_size is None and isinstance(qs[-1], int) and qs[-1] > 0:
            site.head_size = qs[-1]
        ks = site.k.canonical_shape(index.shapes.get(site.k.tensor)) if site.k is not None and index is idx else None
        if ks and len(ks) >= 2 and site.kv_len is None:  # symbolic shapes only: the probe's sizes are its own
            kv = ks[-2]
            if isinstance(kv, int) or (isinstance(kv, str) and not kv.startswith("unk__")):
                site.kv_len = kv
        if site.heads is None:
            if len(qs) == 4 and isinstance(qs[1], int) and qs[1] > 0:
                site.heads = qs[1]
            elif len(qs) == 3:
                site.heads = int(cast(int, node_attr(idx.producer.get(site.out or "") or onnx.NodeProto(), "q_num_heads", 0)) or 0) or 1
        if index is idx:
            seq = qs[-2]
            # Anonymous dims ("unk__12") say nothing; leave them to the probes.
            site.seq_len = seq if isinstance(seq, int) or (isinstance(seq, str) and not seq.startswith("unk__")) else None
            if isinstance(site.seq_len, str):
                # Exporters such as dynamo write the dim as an expression of the input dims' names.
                level = level_of(eval_dim_expression(site.seq_len, {"batch": 1, "height": 2 * p, "width": p}), p)
                if level is not None:
                    site.level = level
                    site.seq_len = seq_expression(level)
        elif site.level is None:
            seq = qs[-2] if isinstance(qs[-2], int) else None
            level = level_at(seq, *probe_hw) if probe_hw else level_of(seq, p)
            if level is not None:
                site.level = level
                if not isinstance(site.seq_len, int):
                    site.seq_len = seq_expression(level)


_SMALL_P = 16


def _all_sites_resolved(values: dict[str, Any], sites: list[AttentionSite]) -> bool:
    """True when each site's Q came back with a sequence of at least 8 positions (a level the small probe can tell)."""
    for site in sites:
        assert site.q is not None
        q = values.get(site.q.tensor)
        shape = site.q.canonical_shape(q.shape) if q is not None else None
        if shape is None or len(shape) < 3 or int(shape[-2]) < 8:
            return False
    return True


def _resolve_by_running(model: onnx.ModelProto, sites: list[AttentionSite], p: int, want_level: bool,
                        weights_folder: Path | None = None) -> None:
    """Scales and head sizes that shape inference cannot tell, read from two ONNX Runtime runs.

    A scale computed from the shape is accepted as a constant only when it is
    the same at two different input sizes.
    """
    # A self-attention site whose key length shape inference lost is run too: its keys may be more than its
    # queries (denoising-diffusion-pytorch adds 4 learned memory key/value pairs).
    todo = [s for s in sites if s.q is not None and (s.head_size is None or (want_level and s.level is None)
                                                       or any(f.source == "dynamic" for f in s.factors)
                                                       or (want_level and s.kind == "self" and s.kv_len is None))]
    if not todo:
        return
    scalars = [f.tensor for s in todo for f in s.factors if f.source == "dynamic"]
    names = scalars + [s.q.tensor for s in todo if s.q is not None] + [s.k.tensor for s in todo if s.k is not None]
    # A small run first: the full-resolution scores of a 128x64 probe took 12 s per run on a tiny SD-layout UNet.
    # It decides only when every site is a few positions long or more there (deeper levels would look alike).
    first = None
    if p > _SMALL_P:
        first = run_probe(model, names, height=2 * _SMALL_P, width=_SMALL_P, weights_folder=weights_folder)
        if first is not None and _all_sites_resolved(first, todo):
            p = _SMALL_P
        else:
            first = None
    if first is None:
        first = run_probe(model, names, height=2 * p, width=p, weights_folder=weights_folder)
    if first is None:
        return
    second = run_probe(model, scalars, height=p, width=p, weights_folder=weights_folder) if scalars else {}
    if second is None:
        second = {}
    for site in todo:
        for f in site.factors:
            if f.source != "dynamic" or f.tensor not in second:
                continue
            a, b = first[f.tensor], second[f.tensor]
            if a.size == 1 and b.size == 1 and float(a.reshape(())) == float(b.reshape(())) and float(a.reshape(())) != 0:
                value = float(a.reshape(()))
                f.value, f.source = (1.0 / value if f.divides else value), "shape"
        if site.form != "op":  # an Attention node's scale is its attribute, not a product of factors
            finish_scale(site)
        assert site.q is not None
        q = first.get(site.q.tensor)
        shape = site.q.canonical_shape(q.shape) if q is not None else None
        if shape is not None and len(shape) >= 3:
            site.head_size = site.head_size or int(shape[-1])
            if len(shape) == 4:
                site.heads = site.heads or int(shape[1])
            if site.level is None:
                site.level = level_of(int(shape[-2]), p)
                if site.level is not None and not isinstance(site.seq_len, int):
                    site.seq_len = seq_expression(site.level)
            k = first.get(site.k.tensor) if site.k is not None else None
            k_shape = site.k.canonical_shape(k.shape) if site.k is not None and k is not None else None
            if site.kind == "self" and site.kv_len is None and k_shape is not None and len(k_shape) >= 2:
                extra = int(k_shape[-2]) - int(shape[-2])
                if extra > 0 and isinstance(site.seq_len, str):
                    site.kv_len = f"{site.seq_len}+{extra}"  # keys beyond the image's positions (learned memory)


def find_attention(model: onnx.ModelProto, *, probe: bool = True, index: TypedIndex | None = None,
                   probed: TypedIndex | None = None, p: int = DEFAULT_P, run: bool = True,
                   weights_folder: Path | None = None, probed_at: tuple[int, int] | None = None) -> list[AttentionSite]:
    """Every attention site of ``model`` in graph order (see the module docstring).

    ``probe`` also runs shape inference with concrete input dims, for the
    sequence length as an expression in height/width and the level (pass
    ``index``/``probed`` to reuse inferences already made). ``run``
    lets ONNX Runtime run the model at two small sizes when a scale or head
    size can be learned no other way (weights loaded, or their data files in
    ``weights_folder``). ``probed_at``: the (height, width) ``probed`` was
    pinned at, when it is not the standard probe (a memory estimate's
    inference, say; a site whose Q it does not size is left to the runs).
    """
    idx = index or TypedIndex(model)
    finder = _Finder(idx)
    sites: list[AttentionSite] = []
    for node in model.graph.node:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            sites.append(finder.op_site(node))
        elif node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            site = finder.softmax_site(node)
            if site is not None:
                sites.append(site)
    if probed is None and probe and sites:
        probed = probe_index(model, p=p)
    for i, site in enumerate(sites):
        if not site.name:
            site.name = site.anchor or f"attention_{i}"
        _fill_shapes(site, idx, probed, p, probed_at)
    for site in sites:
        site.kind = finder.kind(site, model)
    if run and sites:
        _resolve_by_running(model, sites, p, want_level=probe, weights_folder=weights_folder)
    for site in sites:
        if site.form == "op" and site.scale is None and site.head_size:
            site.scale = 1.0 / math.sqrt(site.head_size)  # the Attention op's default
        site.upstream_scale = finder.upstream_scale(site)
        if site.kind == "self" and site.kv_len is None:
            site.kv_len = site.seq_len  # self-attention: the keys are the queries' positions
    names = [s.name for s in sites]
    for i, site in enumerate(sites):
        if names.count(site.name) > 1:
            site.name = f"{site.name}#{names[:i].count(site.name)}"
    return sites
