"""FP16 range audit of an FP32 ONNX model, and an FP16 overflow emulation check.

The audit runs the FP32 model in ONNX Runtime (CPU) on realistic inputs made
from the model's own description (:meth:`ModelSpec.make_inputs`) at several
batch sizes and resolutions, with every intermediate float tensor exposed as
a graph output (on a copy), and records each tensor's absolute maximum.
For every attention block it also computes the attention logits from Q and
K (``q·kᵀ·scale``, and Q·√scale, K·√scale as TensorRT feeds its fused
kernel), because in the ``Attention``-op form the logits never exist as a
tensor. From that it decides which nodes must stay FP32:

* normalization layers (statistics over many elements: an FP16 sum of
  squares overflows or loses the variance; GroupNorm in FP16 is a known
  source of wrong images, e.g. huggingface/diffusers#371);
* the sinusoidal time embedding (Sin/Cos and the float ops feeding them):
  arguments reach ~1000 rad, where FP16 spacing is 0.5, so sin/cos would be
  noise;
* every node with an input or output whose absmax exceeds ``threshold``
  (producer and consumers both, as ModelOpt AutoCast's IORangeRule does:
  an FP32 producer alone would still hand an overflowing value to an FP16
  consumer through a Cast);
* attention blocks whose logits exceed ``threshold``.

Default threshold: 4096, 16x below the FP16 maximum of 65504. Calibration
covers a few shapes only, while activations grow at other resolutions
(border effects at the deepest level, see the tests) and with real
checkpoints; four binary orders of magnitude of headroom cover that
without sending ordinary activations (tens to hundreds) to FP32, which
ModelOpt's default of 512 can do on trained diffusion UNets.

ONNX Runtime on CPU runs FP16 ops in FP32 behind Casts and therefore hides
FP16 overflow (its InsertCastTransformer wraps ops without an FP16 kernel in
Casts). :func:`emulate_fp16` exposes every
FP16 intermediate of a converted model as an output: an exposed FP16 output
is rounded to FP16, so an overflow shows up as ``inf``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, cast

import numpy as np
import onnx
from onnx import TensorProto, helper

from .. import heap
from ..errors import UsageError
from ..graph import GraphIndex, find_attention, node_attr
from ..graph.attention import AttentionSite
from ..graph.probe import read_external_data_from
from ..progress import ProgressFn
from ..shapes import DEFAULT_LARGE_CAP, LARGE_CAP, Shape, fit_shapes, preset_of, round_up, typical_size
from ..spec import ModelSpec, format_shape
from .foreign import spec_of
from .metadata import load_onnx
from .weights import has_external

if TYPE_CHECKING:
    from ..graph.memory import SizeModel

FP16_MAX = 65504.0
DEFAULT_THRESHOLD = 4096.0
NORM_OPS = frozenset({"InstanceNormalization", "GroupNormalization", "BatchNormalization", "LayerNormalization",
                      "RMSNormalization", "LpNormalization", "MeanVarianceNormalization"})
# Ops whose float ancestors (back to a graph input) form the sinusoidal time embedding.
TRIG_OPS = frozenset({"Sin", "Cos"})
# Exposed outputs per ONNX Runtime run are grouped to stay under a budget: an eighth of the memory free now, within
# these bounds. Every exposed tensor of a run is held at once, so the budget sets the audit's memory. Tied to the
# weights (half of them, once), a 1.7 MiB model got the 64 MiB floor and its audit 18 sessions per shape, most of
# its 83 s in session creation.
MEMORY_BUDGET = 1 << 30
MIN_MEMORY_BUDGET = 64 << 20


def memory_budget_for(model: onnx.ModelProto) -> int:
    """Bytes of exposed outputs per run: an eighth of the memory free now, between 64 MiB and 1 GiB (beyond the
    model's own weights, which the session holds anyway)."""
    from ..graph.memory import default_memory_limit

    return max(MIN_MEMORY_BUDGET, min(MEMORY_BUDGET, default_memory_limit() // 8))

_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
_ITEMSIZE: dict[int, int] = {TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8}


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class TensorStat:
    """Absmax of one tensor over the calibration shapes."""

    name: str
    producer: str | None        # node name, None for a graph input
    op_type: str                # producer's op type, "input" for a graph input
    absmax: float
    shape: Shape                # calibration shape (B, H, W) where the max happened
    per_shape: dict[str, float] = field(default_factory=dict)

    @property
    def overflows(self) -> bool:
        return not self.absmax <= FP16_MAX

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.name, "node": self.producer, "op_type": self.op_type, "absmax": _num(self.absmax),
                "shape": format_shape(self.shape), "overflows_fp16": self.overflows,
                "per_shape": {k: _num(v) for k, v in self.per_shape.items()}}


@dataclass
class AttentionStat:
    """Attention logits of one block: computed from Q and K, never a tensor in the op form."""

    name: str
    form: str                   # "op" or "decomposed"
    nodes: list[str]
    scale: float
    logits_absmax: float        # |q·kᵀ·scale|
    raw_absmax: float           # |q·kᵀ| (the intermediate if the scale were applied after the product)
    q_prescaled_absmax: float   # |q·√scale|, TensorRT's BMM1 input
    k_prescaled_absmax: float   # |k·√scale|
    shape: Shape                # where logits_absmax happened
    keys: int                   # S_kv at that shape

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.name, "form": self.form, "nodes": list(self.nodes), "scale": self.scale,
                "logits_absmax": _num(self.logits_absmax), "rawqk_absmax": _num(self.raw_absmax),
                "q_sqrt_scale_absmax": _num(self.q_prescaled_absmax), "k_sqrt_scale_absmax": _num(self.k_prescaled_absmax),
                "shape": format_shape(self.shape), "keys": self.keys}


@dataclass
class Fp32Island:
    """One node kept in FP32, and why."""

    node: str
    op_type: str
    kind: str                   # normalization | time-embedding | range | attention | op-type | user | dtype-attribute
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op_type": self.op_type, "kind": self.kind, "reason": self.reason}


@dataclass
class AuditReport:
    """What the FP16 range audit found, and the nodes it keeps in FP32."""

    model: str
    threshold: float
    calibration_shapes: list[Shape]
    tensors: list[TensorStat]            # every float tensor, largest first
    attention: list[AttentionStat]
    fp32_nodes: list[Fp32Island]
    seconds: float = 0.0
    runs: int = 0

    @property
    def flagged(self) -> list[TensorStat]:
        """Tensors above the threshold (a margin below 65504, or over it)."""
        return [t for t in self.tensors if not t.absmax <= self.threshold]

    @property
    def overflowing(self) -> list[TensorStat]:
        return [t for t in self.tensors if t.overflows]

    @property
    def max_activation(self) -> TensorStat | None:
        return self.tensors[0] if self.tensors else None

    @property
    def max_attention_logit(self) -> AttentionStat | None:
        return max(self.attention, key=lambda a: a.logits_absmax, default=None)

    def fp32_node_names(self) -> list[str]:
        return [i.node for i in self.fp32_nodes]

    def island(self, node: str) -> Fp32Island | None:
        return next((i for i in self.fp32_nodes if i.node == node), None)

    def to_dict(self, top: int = 20) -> dict[str, Any]:
        ma, ml = self.max_activation, self.max_attention_logit
        kinds: dict[str, int] = {}
        for i in self.fp32_nodes:
            kinds[i.kind] = kinds.get(i.kind, 0) + 1
        return {
            "model": self.model,
            "threshold": self.threshold,
            "fp16_max": FP16_MAX,
            "calibration_shapes": [format_shape(s) for s in self.calibration_shapes],
            "max_activation": ma.to_dict() if ma else None,
            "max_attention_logit": ml.to_dict() if ml else None,
            "flagged": [t.to_dict() for t in self.flagged],
            "overflowing": [t.name for t in self.overflowing],
            "largest": [t.to_dict() for t in self.tensors[:top]],
            "attention": [a.to_dict() for a in self.attention],
            "fp32_nodes": [i.to_dict() for i in self.fp32_nodes],
            "fp32_nodes_by_kind": kinds,
            "tensors_measured": len(self.tensors),
            "runs": self.runs,
            "seconds": round(self.seconds, 3),
        }


def _num(v: float) -> float | str:
    """JSON-safe number: inf/nan as strings."""
    return float(v) if np.isfinite(v) else str(float(v))


# ---------------------------------------------------------------------------------------------------------------------
# default calibration shapes
# ---------------------------------------------------------------------------------------------------------------------
def default_calibration_shapes(spec: ModelSpec) -> list[Shape]:
    """Several batch sizes and resolutions from the model's H/W multiple and its preset's typical size.

    small square at batch 1, typical size at batch 2, typical x 1.5 typical
    (non-square), and a large square (2x typical, capped per preset so the
    audit stays affordable on a CPU: tiny/ddpm-cifar10 64 px, ddpm-256 128 px).
    """
    m = spec.hw_multiple
    typical = typical_size(spec)
    large = round_up(min(2 * typical, LARGE_CAP.get(preset_of(spec) or "", DEFAULT_LARGE_CAP)), m)
    mid = round_up(min(typical, large // 2), m)
    small = round_up(max(8, m), m)
    return fit_shapes(spec, [(1, small, small), (2, mid, mid), (1, mid, round_up(mid * 1.5, m)), (1, large, large)])


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every typed tensor (inputs, outputs, value_info, initializers), inferring where missing."""
    types: dict[str, int] = {}
    g = model.graph
    if not g.value_info:
        model = onnx.shape_inference.infer_shapes(model)
        g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    return types


def expose(model: onnx.ModelProto, names: Iterable[str], types: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` with the named tensors added as graph outputs (shape left open)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    for n in names:
        if n not in existing:
            out.graph.output.append(helper.make_tensor_value_info(n, types[n], None))
            existing.add(n)
    return out


def _session(model: onnx.ModelProto, weights_folder: Path | None = None):  # noqa: ANN202 - onnxruntime.InferenceSession
    """A CPU session over ``model``; external initializers are read from ``weights_folder``.

    The graph goes to ONNX Runtime as bytes (no copy of the weights); ONNX
    Runtime reads the data files itself, from the folder given in the
    session option for models loaded from memory.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if has_external(model):
        if weights_folder is None:
            raise UsageError("the model keeps its weights in a data file; give the folder it is in")
        read_external_data_from(opts, weights_folder)
    # No graph rewrites: every tensor must keep its name and its place in the graph.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _model_and_folder(model_or_path: onnx.ModelProto | str | Path,
                      weights_folder: Path | None) -> tuple[onnx.ModelProto, str, Path | None]:
    """The model (a path is read without its external data), a name for messages, and where its data files are."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, "model", weights_folder
    path = Path(model_or_path)
    return load_onnx(path, load_external_data=False), str(path), weights_folder or path.parent


def element_counts(model: onnx.ModelProto, spec: ModelSpec, shapes: Sequence[Shape],
                   sizes: "SizeModel | None" = None) -> dict[str, int]:
    """Per tensor of ``model``, an element count at least its count at each of ``shapes`` (-1 where unknown).

    ``sizes``: a :class:`SizeModel` of this model, or of the FP32 model this
    one was converted from: the conversion keeps tensor names, and a tensor
    it adds (a Cast, say) has the size of the tensor it is made from.
    """
    from ..graph.memory import SizeModel

    counts = dict((sizes or SizeModel(model, spec)).element_counts(shapes))
    for node in model.graph.node:
        if node.op_type in _SAME_SIZE and node.input and node.input[0] in counts:
            for o in node.output:
                if o and counts.get(o, -1) < 0:
                    counts[o] = counts[node.input[0]]
    return counts


# Ops whose output has the element count of their first input (shape inference loses the reshapes of diffusers'
# attention, and the FP16 conversion adds casts).
_SAME_SIZE = frozenset({"Cast", "Identity", "Relu", "Sigmoid", "Tanh", "Erf", "Neg", "Exp", "Sqrt", "Clip", "Softmax",
                        "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})


def _groups_of_units(units: list[list[str]], sizes: dict[str, int], budget: int,
                     types: dict[str, int]) -> list[list[str]]:
    """Split ``units`` (names that must come back together) into groups under ``budget`` bytes."""
    known = [s for s in sizes.values() if s > 0]
    fallback = max(known) if known else 0
    groups: list[list[str]] = [[]]
    used = 0
    seen: set[str] = set()
    for unit in units:
        unit = [n for n in unit if n not in seen]
        if not unit:
            continue
        seen.update(unit)
        nbytes = sum(_ITEMSIZE.get(types.get(n, 0), 4) * (sizes.get(n, -1) if sizes.get(n, -1) > 0 else fallback)
                     for n in unit)
        if groups[-1] and used + nbytes > budget:
            groups.append([])
            used = 0
        groups[-1].extend(unit)
        used += nbytes
    return [g for g in groups if g]


def _units(sites: Sequence["_Site"], names: Sequence[str]) -> list[list[str]]:
    """Grouping units: Q and K of each attention site together (they must come back in one run), then each name."""
    paired = {n for s in sites for n in (s.q, s.k)}
    return [[s.q, s.k] for s in sites] + [[n] for n in names if n not in paired]


def _run_in_groups(model: onnx.ModelProto, spec: ModelSpec, types: dict[str, int], units: list[list[str]],
                   shapes: Sequence[Shape], seed: int, budget: int, weights_folder: Path | None,
                   record: Callable[[dict[str, np.ndarray], int], None],
                   progress: Callable[[int, int, int], None] | None = None,
                   sizes: "SizeModel | None" = None) -> int:
    """Run ``model`` at every shape with each group of ``units`` exposed; ``record(values, shape_index)`` per run.

    One session per group: ONNX Runtime keeps every graph output of a run
    alive until the run ends, so exposing all tensors at once would hold the
    whole model's activations, whatever is fetched. The arrays of a run share
    their buffers, so they go straight to ``record`` and are never bound
    here: one array left in a variable would keep its whole group alive into
    the next group's session. Returns the number of runs.
    """
    feeds = [spec.make_inputs(*shape, seed=seed + i) for i, shape in enumerate(shapes)]
    groups = _groups_of_units(units, element_counts(model, spec, shapes, sizes), budget, types)
    runs = 0
    for gi, group in enumerate(groups):
        sess = _session(expose(model, group, types), weights_folder)
        for i in range(len(shapes)):
            if progress:
                progress(i, gi, len(groups))
            record(dict(zip(group, sess.run(group, feeds[i]))), i)
            runs += 1
        del sess
        heap.release()  # the session's arena and weights, before the next group's session is built
    return runs


def finite_absmax(a: np.ndarray) -> float:
    """max |a| over the finite values: an inf the FP32 model computes (a mask's -inf) is one in FP16 too, not an
    overflow the conversion causes."""
    a = np.asarray(a)
    finite = np.isfinite(a)
    if not finite.all():
        a = a[finite]
    return float(np.max(np.abs(a))) if a.size else 0.0


def _to_heads(a: np.ndarray, heads: int | None) -> np.ndarray:
    """Q/K as (B, heads, S, D) from the 4-D or 3-D (B, S, heads*D) Attention layouts."""
    if a.ndim == 4:
        return a
    if a.ndim == 3:
        n = int(heads or 1)
        b, s, hid = a.shape
        return a.reshape(b, s, n, hid // n).transpose(0, 2, 1, 3)
    return a.reshape((1,) * (4 - a.ndim) + a.shape) if a.ndim < 4 else a


def qk_absmax(q: np.ndarray, k: np.ndarray, *, q_heads: int | None = None, kv_heads: int | None = None,
              chunk: int = 1024) -> float:
    """max |q·kᵀ| over batch, heads, queries and keys, in row chunks so S x S never has to fit at once."""
    qh, kh = _to_heads(q, q_heads).astype(np.float32), _to_heads(k, kv_heads).astype(np.float32)
    group = max(1, qh.shape[1] // max(1, kh.shape[1]))  # GQA: q heads per kv head
    best = 0.0
    for b in range(qh.shape[0]):
        for h in range(qh.shape[1]):
            kt = kh[b, h // group].T
            for s0 in range(0, qh.shape[2], chunk):
                best = max(best, finite_absmax(qh[b, h, s0:s0 + chunk] @ kt))
    return best


@dataclass
class _Site:
    name: str
    form: str
    q: str
    k: str
    scale: float | None
    nodes: list[str]
    q_heads: int | None = None
    kv_heads: int | None = None
    q_perm: list[int] | None = None
    k_perm: list[int] | None = None
    mask: str | None = None

    def qk(self, values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Q and K in the [..., S, d] layout from the exposed tensors."""
        q, k = values[self.q], values[self.k]
        return (q if self.q_perm is None else q.transpose(self.q_perm),
                k if self.k_perm is None else k.transpose(self.k_perm))


def attention_sites(model: onnx.ModelProto, weights_folder: Path | None = None,
                    found: Sequence[AttentionSite] | None = None) -> list[_Site]:
    """The sites of the one attention analysis that have Q and K, with their layouts and total scale.

    ``found``: that analysis of ``model``, when the caller has it already.
    """
    by_name = {n.name: n for n in model.graph.node}
    sites = []
    for s in found if found is not None else find_attention(model, probe=False, weights_folder=weights_folder):
        if s.q is None or s.k is None:
            continue
        q_heads: int | None = None
        kv_heads: int | None = None
        if s.form == "op" and s.anchor in by_name:
            # INT attributes of the ONNX Attention op: node_attr gives them as int (None where absent).
            q_heads = cast("int | None", node_attr(by_name[s.anchor], "q_num_heads"))
            kv_heads = cast("int | None", node_attr(by_name[s.anchor], "kv_num_heads"))
        sites.append(_Site(s.name, s.form, s.q.tensor, s.k.tensor, s.scale, s.nodes, q_heads, kv_heads,
                           s.q.perm, s.k.perm, s.mask.tensor if s.mask is not None else None))
    return sites


def mask_region(model: onnx.ModelProto, sites: Sequence[_Site]) -> set[str]:
    """Tensors where -inf is by design: each site's mask, what it is computed from, and the site's masked logits."""
    index = GraphIndex(model.graph)
    region: set[str] = set()
    for s in sites:
        if s.mask:
            region |= index.behind(s.mask, through_shape=False)
    by_name = {n.name: n for n in model.graph.node}
    for s in sites:
        if s.mask:
            region.update(o for name in s.nodes if name in by_name for o in by_name[name].output)
    return region


# ---------------------------------------------------------------------------------------------------------------------
# FP32 islands by structure
# ---------------------------------------------------------------------------------------------------------------------
def structural_islands(model: onnx.ModelProto, types: dict[str, int], extra_fp32_ops: Iterable[str] = ()) -> list[Fp32Island]:
    """Nodes kept FP32 whatever their range: normalization, the time embedding, user op types."""
    extra = set(extra_fp32_ops)
    g = GraphIndex(model.graph)
    islands: dict[str, Fp32Island] = {}
    for node in model.graph.node:
        if node.op_type in NORM_OPS:
            islands[node.name] = Fp32Island(node.name, node.op_type, "normalization",
                                            "normalization: mean/variance over many elements lose precision or overflow in FP16")
        elif node.op_type in extra:
            islands[node.name] = Fp32Island(node.name, node.op_type, "op-type", f"op type {node.op_type} requested in FP32")
    # Sin/Cos and the float-valued ops that feed them, back to a graph input (the timestep path).
    trig = [n for n in model.graph.node if n.op_type in TRIG_OPS]
    stack = list(trig)
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.name not in islands:
            why = ("time embedding: Sin/Cos arguments reach ~1000 rad, where FP16 spacing is 0.5"
                   if node.op_type in TRIG_OPS else f"time embedding: feeds {', '.join(sorted({t.op_type for t in trig}))} "
                   "(timestep x frequency needs FP32 resolution)")
            islands[node.name] = Fp32Island(node.name, node.op_type, "time-embedding", why)
        for inp in node.input:
            prod = g.producer.get(inp)
            if prod is not None and types.get(inp) in _FLOATS and any(types.get(o) in _FLOATS for o in prod.output):
                stack.append(prod)
            elif prod is not None and prod.op_type == "Cast":
                stack.append(prod)  # int timestep -> float: keep the cast in the island too
    return list(islands.values())


def _is_compute(node: onnx.NodeProto, types: dict[str, int]) -> bool:
    """True for nodes that produce a float tensor (Shape, Size and the like only read metadata)."""
    return any(types.get(o) in _FLOATS for o in node.output if o)


def _record_audit_run(values: dict[str, np.ndarray], shape: Shape, per_shape: dict[str, dict[str, float]],
                      best: dict[str, tuple[float, Shape]], sites: list[_Site], att_best: dict[str, dict[str, Any]],
                      masked: set[str]) -> None:
    """Fold one run's tensors into the audit's per-tensor and per-attention-site maxima.

    In the mask region only positive values count: a mask's large negative
    values mask the same in FP16 (down to -inf), so they need no FP32 island.
    """
    key = format_shape(shape)
    for n, v in values.items():
        if n not in per_shape:
            continue
        a = finite_absmax(np.maximum(v, 0)) if n in masked else finite_absmax(v)
        per_shape[n][key] = a
        if n not in best or not a <= best[n][0]:
            best[n] = (a, shape)
    for s in sites:
        if s.q in values and s.k in values:
            q, k = s.qk(values)
            head = _to_heads(q, s.q_heads).shape[-1]
            scale = s.scale if s.scale is not None else 1.0 / float(np.sqrt(head))
            raw = qk_absmax(q, k, q_heads=s.q_heads, kv_heads=s.kv_heads)
            root = float(np.sqrt(abs(scale)))
            entry = dict(raw=raw, logits=raw * abs(scale), q=finite_absmax(q) * root, k=finite_absmax(k) * root,
                         shape=shape, keys=int(_to_heads(k, s.kv_heads).shape[2]), scale=scale)
            prev = att_best.get(s.name)
            if prev is None or not entry["logits"] <= prev["logits"]:
                att_best[s.name] = entry


# ---------------------------------------------------------------------------------------------------------------------
# the audit
# ---------------------------------------------------------------------------------------------------------------------
def audit_fp16(
    model_or_path: onnx.ModelProto | str | Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    calibration_shapes: Sequence[Shape] | None = None,
    extra_fp32_ops: Iterable[str] = (),
    spec: ModelSpec | None = None,
    seed: int = 0,
    memory_budget: int | None = None,
    progress: ProgressFn | None = None,
    weights_folder: Path | None = None,
    sizes: "SizeModel | None" = None,
    analysis: Sequence[AttentionSite] | None = None,
) -> AuditReport:
    """Measure every float tensor and attention logit of an FP32 model; decide the FP32 islands.

    ``calibration_shapes``: (batch, H, W) triples; default
    :func:`default_calibration_shapes`. ``threshold``: absmax above which a
    tensor's producer and consumers stay FP32 (must be <= 65504).
    ``weights_folder``: where a model's external data files are (a path's
    own folder by default); ONNX Runtime reads them, the graph stays light.
    ``memory_budget``: bytes of tensors read back per run (default
    :func:`memory_budget_for`).
    """
    t_start = time.perf_counter()
    model, origin, weights_folder = _model_and_folder(model_or_path, weights_folder)
    budget = memory_budget if memory_budget is not None else memory_budget_for(model)
    spec = spec or spec_of(model, origin=origin, foreign=False)
    if not 0 < threshold <= FP16_MAX:
        raise UsageError(f"threshold must be in (0, {FP16_MAX:g}] (got {threshold:g})")
    # (batch, H, W) triples as ints: each is unpacked into spec.check_shape(b, h, w) below.
    shapes = [cast(Shape, tuple(int(v) for v in s)) for s in (calibration_shapes or default_calibration_shapes(spec))]
    if not shapes:
        raise UsageError("no calibration shape")
    for shape in shapes:
        spec.check_shape(*shape)
    types = value_types(model)
    if any(t == TensorProto.FLOAT16 for t in types.values()):
        raise UsageError(f"{origin} already holds FP16 tensors; audit the FP32 export")

    producers = {o: n for n in model.graph.node for o in n.output}
    float_names = [vi.name for vi in model.graph.input if types.get(vi.name) in _FLOATS]
    float_names += [o for n in model.graph.node for o in n.output if o and types.get(o) in _FLOATS]
    sites = attention_sites(model, weights_folder, analysis)
    masked = mask_region(model, sites)

    best: dict[str, tuple[float, Shape]] = {}
    per_shape: dict[str, dict[str, float]] = {n: {} for n in float_names}
    att_best: dict[str, dict[str, Any]] = {}

    def show(i: int, gi: int, groups: int) -> None:
        if progress:
            progress(f"audit: running at {format_shape(shapes[i])} ({i + 1}/{len(shapes)}, tensor group {gi + 1}/{groups})")

    runs = _run_in_groups(model, spec, types, _units(sites, float_names), shapes, seed, budget, weights_folder,
                          lambda values, i: _record_audit_run(values, shapes[i], per_shape, best, sites, att_best, masked),
                          show, sizes)

    tensors = []
    for n in float_names:
        if n not in best:
            continue
        node = producers.get(n)
        tensors.append(TensorStat(n, node.name if node is not None else None, node.op_type if node is not None else "input",
                                  best[n][0], best[n][1], per_shape[n]))
    tensors.sort(key=lambda t: (-t.absmax if np.isfinite(t.absmax) else -np.inf, t.name))
    attention = [AttentionStat(s.name, s.form, s.nodes, att_best[s.name]["scale"], att_best[s.name]["logits"],
                               att_best[s.name]["raw"], att_best[s.name]["q"], att_best[s.name]["k"],
                               att_best[s.name]["shape"], att_best[s.name]["keys"]) for s in sites if s.name in att_best]

    islands = {i.node: i for i in structural_islands(model, types, extra_fp32_ops)}
    node_by_name = {n.name: n for n in model.graph.node}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for inp in n.input:
            consumers.setdefault(inp, []).append(n)
    for t in tensors:
        if t.absmax <= threshold:
            continue
        what = "overflows FP16" if t.overflows else f"> threshold {threshold:g}"
        touched = ([node_by_name[t.producer]] if t.producer else []) + consumers.get(t.name, [])
        for node in touched:
            if node.name in islands or not _is_compute(node, types):
                continue
            role = "output" if node.name == t.producer else "input"
            islands[node.name] = Fp32Island(node.name, node.op_type, "range",
                                            f"activation absmax {t.absmax:.3g} {what} at {format_shape(t.shape)} ({role} {t.name})")
    for att in attention:
        if att.logits_absmax <= threshold:
            continue
        what = "overflow FP16" if not att.logits_absmax <= FP16_MAX else f"> threshold {threshold:g}"
        for name in att.nodes:
            node = node_by_name.get(name)
            if node is not None and name not in islands and _is_compute(node, types):
                islands[name] = Fp32Island(name, node.op_type, "attention",
                                           f"attention logits absmax {att.logits_absmax:.3g} {what} at {format_shape(att.shape)}")
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    fp32 = sorted(islands.values(), key=lambda i: order.get(i.node, 0))
    return AuditReport(origin, float(threshold), list(shapes), tensors, attention, fp32,
                       seconds=time.perf_counter() - t_start, runs=runs)


# ---------------------------------------------------------------------------------------------------------------------
# FP16 emulation check of a converted model
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class NonFinite:
    """An FP16 tensor (or FP16 attention's logits) that is inf/NaN when rounded to FP16."""

    tensor: str
    node: str | None
    op_type: str
    shape: Shape
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "node": self.node, "op_type": self.op_type, "shape": format_shape(self.shape),
                "detail": self.detail}


@dataclass
class EmulationReport:
    """Result of :func:`emulate_fp16`: ``ok`` when no FP16 intermediate overflowed."""

    shapes: list[Shape]
    fp16_tensors: int
    non_finite: list[NonFinite]
    max_fp16_absmax: float
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.non_finite

    def first(self) -> NonFinite | None:
        return self.non_finite[0] if self.non_finite else None

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "shapes": [format_shape(s) for s in self.shapes], "fp16_tensors": self.fp16_tensors,
                "max_fp16_absmax": _num(self.max_fp16_absmax), "non_finite": [n.to_dict() for n in self.non_finite],
                "seconds": round(self.seconds, 3)}


def _record_emulation_run(values: dict[str, np.ndarray], shape: Shape, fp16_names: set[str],
                          producers: dict[str, onnx.NodeProto], sites: list[_Site], found: dict[str, "NonFinite"],
                          masked: set[str]) -> float:
    """Add one run's non-finite FP16 tensors and overflowing attention logits to ``found``; return the finite absmax."""
    top = 0.0
    for n, v in values.items():
        if n not in fp16_names:
            continue
        finite = np.isfinite(v)
        if not finite.all() and n in masked and not np.isnan(v).any() and not np.isposinf(v).any():
            finite = np.ones_like(finite)  # a mask's -inf: what it is written for
            v = v[np.isfinite(v)]
        if not finite.all():
            if n not in found:
                node = producers.get(n)
                found[n] = NonFinite(n, node.name if node else None, node.op_type if node else "input", shape,
                                     f"{int((~finite).sum())} non-finite of {v.size}")
        elif v.size:
            top = max(top, float(np.abs(v).max()))
    for s in sites:
        if s.q in values and s.k in values and s.name not in found:
            q, k = s.qk(values)
            if not (np.isfinite(q).all() and np.isfinite(k).all()):
                continue
            head = _to_heads(q, s.q_heads).shape[-1]
            scale = s.scale if s.scale is not None else 1.0 / float(np.sqrt(head))
            root = float(np.sqrt(abs(scale)))
            # TensorRT's fused kernel multiplies Q and K by sqrt(scale) in FP16 and keeps BMM1 in FP16 precision.
            logits = qk_absmax((q.astype(np.float32) * root).astype(np.float16),
                               (k.astype(np.float32) * root).astype(np.float16), q_heads=s.q_heads, kv_heads=s.kv_heads)
            if not logits <= FP16_MAX:
                found[s.name] = NonFinite(s.name, s.nodes[-1], "attention-logits", shape,
                                          f"attention logits absmax {logits:.3g} > 65504")
    return top


def emulate_fp16(
    model_or_path: onnx.ModelProto | str | Path,
    shapes: Sequence[Shape],
    *,
    spec: ModelSpec | None = None,
    seed: int = 0,
    memory_budget: int | None = None,
    weights_folder: Path | None = None,
    analysis: Sequence[AttentionSite] | None = None,
    sizes: "SizeModel | None" = None,
) -> EmulationReport:
    """Expose every FP16 intermediate as an output and report the non-finite ones.

    ``analysis``: the attention analysis of the model, when the caller has it already.

    ORT CPU computes most FP16 ops in FP32, but an FP16 graph output is
    rounded to FP16, so an activation beyond 65504 comes back as inf. FP16
    attention logits are computed from the exposed FP16 Q and K and checked
    against 65504 too. NaN/inf in the FP32 inputs are not reported, nor -inf
    in an attention mask and the logits it masks (:func:`mask_region`).
    """
    t0 = time.perf_counter()
    model, origin, weights_folder = _model_and_folder(model_or_path, weights_folder)
    budget = memory_budget if memory_budget is not None else memory_budget_for(model)
    spec = spec or spec_of(model, origin=origin, foreign=False)
    types = value_types(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    names = [o for n in model.graph.node for o in n.output if o and types.get(o) == TensorProto.FLOAT16]
    sites = [s for s in attention_sites(model, weights_folder, analysis) if types.get(s.q) == TensorProto.FLOAT16]
    for shape in shapes:
        spec.check_shape(*shape)
    found: dict[str, NonFinite] = {}
    tops: list[float] = [0.0]
    fp16_names = set(names)
    masked = mask_region(model, sites)
    _run_in_groups(model, spec, types, _units(sites, names), shapes, seed, budget, weights_folder,
                   lambda values, i: tops.append(_record_emulation_run(values, shapes[i], fp16_names, producers,
                                                                       sites, found, masked)), None, sizes)
    top = max(tops)
    order = {o: i for i, n in enumerate(model.graph.node) for o in list(n.output) + [n.name]}
    non_finite = sorted(found.values(), key=lambda f: order.get(f.tensor, order.get(f.node or "", 0)))
    return EmulationReport([(b, h, w) for b, h, w in shapes], len(names), non_finite, top, seconds=time.perf_counter() - t0)
