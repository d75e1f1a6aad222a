"""How much host memory one forward pass needs at a given shape, estimated before anything runs.

Shape inference with the inputs pinned to the requested shape gives every
tensor's size; walking the nodes in order and freeing each tensor after its
last reader gives the peak of live activations (what an executor without
in-place reuse holds). The ONNX ``Attention`` op keeps its score matrix
inside the node, so for each one the logits and probabilities
(batch x heads x S x S, two of them) are added while it runs. The estimate
is a floor for the PyTorch reference and ONNX Runtime, which keep some more,
and it is what decides whether a shape is refused up front.

Where shape inference cannot size an attention site's scores (reshapes it
cannot follow, as in diffusers' UNets), the attention analysis does: heads,
the resolution level (from a probe run) and the key length give
batch x heads x S_q x S_kv; a site whose level is unknown counts at the
image's full resolution, an upper bound.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Sequence, cast

import numpy as np
import onnx
from onnx import helper

from ..errors import ShapeError, UsageError
from ..spec import ModelSpec
from .attention import AttentionSite, find_attention
from .index import TypedIndex, weightless_copy

UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
         "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


@dataclass
class MemoryEstimate:
    """Bytes one forward pass needs at ``shape`` (batch, height, width)."""

    shape: tuple[int, ...]
    activations: int      # peak of live intermediate tensors, graph inputs and outputs included
    attention: int        # score matrices held inside Attention ops on top of that
    weights: int
    complete: bool        # False when some tensor's shape could not be inferred (then it is a lower bound)

    @property
    def total(self) -> int:
        return self.activations + self.attention + self.weights


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def parse_memory(text: str) -> int:
    """'24GiB', '512M', '0' (no limit) -> bytes; UsageError for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise UsageError(f"--max-memory must be a size such as 16GiB, 512MiB or 0 for no limit (got {text!r})")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def default_memory_limit() -> int:
    """The memory this machine has free now (MemAvailable), or its physical memory where that cannot be read:
    the bound when the user sets none."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _itemsize(elem_type: int | None) -> int:
    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type or onnx.TensorProto.FLOAT)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 4


def _pinned_index(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> TypedIndex | None:
    light = weightless_copy(model)
    for vi in light.graph.input:
        if vi.name in input_shapes:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for value in input_shapes[vi.name]:
                dims.add().dim_value = int(value)
    del light.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is best effort on files from elsewhere
        return None
    return TypedIndex(inferred, infer=False)


# Nodes an attention site is anchored on (the ONNX Attention op, or the Softmax of a decomposed site).
_ANCHORS = ("Attention", "Softmax")


def site_scores(site: AttentionSite, shape: Sequence[int], axes: Mapping[str, int] | None = None) -> int:
    """Bytes of the logits and probabilities of ``site`` at (batch, height, width), from the attention analysis."""
    if len(shape) != 3:
        return 0
    batch, height, width = (int(v) for v in shape)
    level = site.level if site.level is not None else 0  # unknown: the full resolution, an upper bound
    step = 1 << level
    s_q = site.seq_len if isinstance(site.seq_len, int) else -(-height // step) * -(-width // step)
    kv = site.kv_len
    if isinstance(kv, int):
        s_kv = kv
    elif isinstance(kv, str) and axes and kv in axes:
        s_kv = int(axes[kv])
    else:
        s_kv = s_q
    return 2 * 4 * batch * int(site.heads or 1) * int(s_q) * int(s_kv)


class _Sites:
    """The attention analysis of a model, run once and only when an estimate needs it."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self._by_anchor: dict[str, AttentionSite] | None = None

    def at(self, node: str) -> AttentionSite | None:
        if self._by_anchor is None:
            try:
                self._by_anchor = {s.anchor: s for s in find_attention(self.model)}
            except Exception:  # noqa: BLE001 - best effort on files from elsewhere: the estimate stays a floor
                self._by_anchor = {}
        return self._by_anchor.get(node)


def estimate_memory(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]],
                    shape: tuple[int, ...] = (), *, keep_all: bool = False,
                    sites: _Sites | None = None, axes: Mapping[str, int] | None = None,
                    index: TypedIndex | None = None) -> MemoryEstimate:
    """Estimate the host memory of one forward pass of ``model`` with its inputs at ``input_shapes``.

    ``keep_all``: every intermediate stays alive (a run that reads them all, like the FP16 range audit).
    ``sites``: the attention analysis, asked for scores shape inference cannot size (see the module docstring).
    ``index``: the shape inference of ``model`` pinned at ``input_shapes``, when the caller has it.
    """
    weights = sum(int(np.prod(i.dims, dtype=np.int64)) * _itemsize(i.data_type) for i in model.graph.initializer)
    if index is None:
        index = _pinned_index(model, input_shapes)
    if index is None:
        return MemoryEstimate(tuple(shape), 0, 0, weights, complete=False)
    complete = True

    def size(name: str) -> int:
        nonlocal complete
        dims = index.shapes.get(name)
        if dims is None or any(not isinstance(d, int) or d < 0 for d in dims):
            complete = False
            return 0
        # All dims are ints here (checked just above); mypy cannot narrow the list's element type.
        return int(np.prod(cast("list[int]", dims), dtype=np.float64)) * _itemsize(index.types.get(name))

    inits = {i.name for i in model.graph.initializer}
    nodes = list(model.graph.node)
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            if name:
                last_use[name] = i
    keep = {o.name for o in model.graph.output}
    live: dict[str, int] = {vi.name: size(vi.name) for vi in model.graph.input if vi.name not in inits}
    current = sum(live.values())
    peak, peak_scores = current, 0
    for i, node in enumerate(nodes):
        for name in node.output:
            if name and name not in live:
                live[name] = size(name)
                current += live[name]
        scores = _attention_scores(node, index) if node.op_type == "Attention" and node.domain in ("", "ai.onnx") else 0
        if sites is not None and node.op_type in _ANCHORS and not scores and not all(live.get(o) for o in node.output if o):
            site = sites.at(node.name)  # shape inference lost the sequence lengths here
            scores = site_scores(site, shape, axes) if site is not None else 0
        if current + scores > peak + peak_scores:
            peak, peak_scores = current, scores
        for name in list(node.input) + list(node.output):
            if name in live and last_use.get(name, -1) <= i and name not in keep and not keep_all:
                current -= live.pop(name)
    return MemoryEstimate(tuple(shape), int(peak), int(peak_scores), weights, complete)


def _attention_scores(node: onnx.NodeProto, index: TypedIndex) -> int:
    """Bytes of the logits and probabilities an ONNX Attention node materializes (two fp32 matrices)."""
    q = index.shapes.get(node.input[0]) if node.input else None
    k = index.shapes.get(node.input[1]) if len(node.input) > 1 else None
    if not q or not k:
        return 0
    q_dims = [d for d in q if isinstance(d, int)]
    k_dims = [d for d in k if isinstance(d, int)]
    if len(q_dims) != len(q) or len(k_dims) != len(k):
        return 0
    if len(q_dims) == 4:
        batch, heads, sq, sk = q_dims[0], q_dims[1], q_dims[2], k_dims[2]
    else:
        heads = next((a.i for a in node.attribute if a.name == "q_num_heads"), 1)
        batch, sq, sk = q_dims[0], q_dims[1], k_dims[1]
    return 2 * 4 * int(batch) * int(heads) * int(sq) * int(sk)


def _feeds(spec: ModelSpec, shapes: Sequence[tuple[int, int, int]]) -> list[dict[str, tuple[int, ...]]]:
    """Each input's shape at each (batch, height, width), the other named axes at their largest."""
    return [{t.name: spec.shape_of(t, *s, which="max") for t in spec.inputs} for s in shapes]


def over_limit(e: MemoryEstimate, bound: int, what: str) -> str:
    """The one-line reason a shape is refused."""
    parts = f"activations {human_bytes(e.activations)}"
    if e.attention:
        parts += f", attention scores {human_bytes(e.attention)}"
    parts += f", weights {human_bytes(e.weights)}"
    return (f"{what} {'x'.join(map(str, e.shape))} needs about {human_bytes(e.total)} ({parts}), over the "
            f"{human_bytes(bound)} limit; use smaller shapes or raise --max-memory (0 for no limit)")


Shape3 = tuple[int, int, int]

# Shapes chosen on the user's behalf (verify's default sweep, fp16's default calibration) are scaled down past this
# many bytes of live activations: at a full-resolution attention site they grow with the square of the pixels, and
# one such shape can take minutes on a CPU.
DEFAULT_SHAPE_ACTIVATIONS = 2 << 30


def envelope(shapes: Sequence[Shape3]) -> Shape3:
    """The smallest (batch, height, width) at least as large as each of ``shapes`` on every axis."""
    return (max(s[0] for s in shapes), max(s[1] for s in shapes), max(s[2] for s in shapes))


def _covers(big: Shape3, small: Shape3) -> bool:
    return all(b >= s for b, s in zip(big, small))


class SizeModel:
    """Tensor sizes of one model at (batch, height, width) shapes, from as few shape inferences as can tell.

    Every activation of these models grows with batch, height and width, so
    the sizes at a shape that covers several (:func:`envelope`) bound each of
    theirs: one inference there answers "do they all fit?" and "how large can
    each tensor get?" for all of them. A shape is inferred on its own only
    when a bound is not enough (it is over the limit, and the message must
    name the shape). Inferences are kept, and a kept one that covers a new
    request answers it.
    """

    def __init__(self, model: onnx.ModelProto, spec: ModelSpec) -> None:
        self.model = model
        self.spec = spec
        self.inferences = 0
        self._indexes: dict[Shape3, TypedIndex | None] = {}
        self._sites = _Sites(model)

    def index(self, shape: Shape3) -> TypedIndex | None:
        """Shape inference with the inputs pinned at ``shape`` (the other named axes at their largest)."""
        if shape not in self._indexes:
            self.inferences += 1
            self._indexes[shape] = _pinned_index(self.model, _feeds(self.spec, [shape])[0])
        return self._indexes[shape]

    def covering(self, shapes: Sequence[Shape3]) -> Shape3:
        """A shape whose sizes bound those of every one of ``shapes``: one already inferred, or their envelope."""
        env = envelope(shapes)
        known = [s for s, idx in self._indexes.items() if idx is not None and _covers(s, env)]
        return min(known, key=lambda s: s[0] * s[1] * s[2]) if known else env

    def estimate(self, shape: Shape3, *, keep_all: bool = False) -> MemoryEstimate:
        """:func:`estimate_memory` at ``shape``, from the kept inference there."""
        feeds = _feeds(self.spec, [shape])[0]
        return estimate_memory(self.model, feeds, shape, keep_all=keep_all, sites=self._sites,
                               axes=self.spec.axes("max"), index=self.index(shape))

    def element_counts(self, shapes: Sequence[Shape3]) -> dict[str, int]:
        """Per tensor, an element count at least its count at each of ``shapes`` (-1 where unknown)."""
        index = self.index(self.covering(shapes))
        if index is None:
            return {}
        counts: dict[str, int] = {}
        for name, dims in index.shapes.items():
            known = [d for d in dims if isinstance(d, int) and d >= 0]
            counts[name] = int(np.prod(known, dtype=np.int64)) if len(known) == len(dims) else -1
        return counts

    def need(self, shape: Shape3, *, keep_all: bool = False) -> int:
        """Bytes of live activations and attention scores at ``shape`` (the weights left out)."""
        e = self.estimate(shape, keep_all=keep_all)
        return e.activations + e.attention

    def scaled_to_fit(self, shapes: Sequence[Shape3], bound: int, *, keep_all: bool = False,
                      ) -> tuple[list[Shape3], list[tuple[Shape3, Shape3 | None, int]]]:
        """``shapes`` with each one whose activations pass ``bound`` bytes halved in height and width (same batch,
        kept to the model's multiple and range) until it fits; one it cannot make fit is left out.

        Returns the shapes (deduplicated, in order) and, per changed shape, (asked, used or None, bytes asked).
        The smallest of ``shapes`` always stays. Where the covering shape fits, nothing is estimated per shape.
        """
        from ..shapes import accepts

        if not shapes or self.need(self.covering(list(shapes)), keep_all=keep_all) <= bound:
            return list(shapes), []
        smallest = min(shapes, key=lambda s: s[0] * s[1] * s[2])
        m = max(1, self.spec.hw_multiple)
        out: list[Shape3] = []
        changed: list[tuple[Shape3, Shape3 | None, int]] = []
        for shape in shapes:
            asked = self.need(shape, keep_all=keep_all)
            used: Shape3 | None = shape
            b, h, w = shape
            while used is not None and shape != smallest and self.need(used, keep_all=keep_all) > bound:
                h, w = max(m, h // 2 // m * m), max(m, w // 2 // m * m)
                used = (b, h, w) if (b, h, w) != used and accepts(self.spec, (b, h, w)) else None
            if used != shape:
                changed.append((shape, used, asked))
            if used is not None and used not in out:
                out.append(used)
        return out, changed

    def over(self, shapes: Sequence[Shape3], bound: int, *, keep_all: bool = False) -> list[MemoryEstimate]:
        """The estimates of ``shapes`` over ``bound`` bytes (0: none is): none when a covering shape fits."""
        if not bound or not shapes:
            return []
        if self.estimate(self.covering(shapes), keep_all=keep_all).total <= bound:
            return []
        return [e for e in (self.estimate(s, keep_all=keep_all) for s in shapes) if e.total > bound]


def check_shapes_fit(model: onnx.ModelProto, spec: ModelSpec, shapes: Sequence[tuple[int, int, int]],
                     limit: int | None, *, what: str = "shape", keep_all: bool = False,
                     sizes: SizeModel | None = None) -> None:
    """Refuse (ShapeError, exit 2) the first of ``shapes`` whose estimate exceeds ``limit`` bytes
    (None: the memory free here, 0: no limit). ``sizes``: the model's :class:`SizeModel`, to share its inferences."""
    bound = default_memory_limit() if limit is None else limit
    over = (sizes or SizeModel(model, spec)).over(list(shapes), bound, keep_all=keep_all)
    if over:
        raise ShapeError(over_limit(over[0], bound, what))


def shapes_that_fit(model: onnx.ModelProto, spec: ModelSpec, shapes: Sequence[tuple[int, int, int]],
                    limit: int | None, *, keep_all: bool = False,
                    sizes: SizeModel | None = None) -> tuple[list[tuple[int, int, int]], list[str]]:
    """The shapes whose estimate is within half of ``limit``, and a reason for each one left out.

    For shapes chosen on the user's behalf: the estimate is a floor (a run of
    the FP16 audit has held about twice it), so half the bound leaves room.
    """
    bound = (default_memory_limit() if limit is None else limit) // 2
    over = (sizes or SizeModel(model, spec)).over(list(shapes), bound, keep_all=keep_all)
    left_shapes = {e.shape for e in over}
    fit = [s for s in shapes if tuple(s) not in left_shapes]
    left = [f"{'x'.join(map(str, e.shape))} left out: it needs about {human_bytes(e.total)} (attention scores "
            f"{human_bytes(e.attention)}), over half of {human_bytes(2 * bound)}" for e in over]
    return fit, left
