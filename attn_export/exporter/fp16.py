"""FP16 conversion of an exported FP32 model, with FP32 islands chosen by an audit.

TensorRT 11 removed the FP16 builder flag: precision must be in the ONNX
graph (TensorRT 11 release notes: "BuilderFlag.FP16 removed; strongly typed networks only"). :func:`convert_fp16` writes
an FP16 ONNX with FP16 weights and compute, FP32 inputs/outputs by default,
and FP32 islands for normalization, the time embedding and every node the
range audit (:mod:`.audit`) flags.

Converter choice: our own pass (this module), not ModelOpt AutoCast and not
``onnxruntime.transformers.float16.convert_float_to_float16``.

* AutoCast does the right thing (it keeps out-of-range nodes FP32, keeps
  Resize scales FP32 and the opset), but on Linux x86_64 its ``[onnx]``
  extra pulls onnxruntime-gpu~=1.24 and cupy; a CPU install needs
  ``pip install --no-deps nvidia-modelopt`` plus onnxslim, polygraphy,
  onnx_graphsurgeon and nvidia-ml-py by hand, which ``pip install
  attn-export`` cannot express. Its range rule also runs its own reference
  pass on random [-1, 1] inputs unless given calibration data.
* ONNX Runtime's converter is installed already, but it wraps *each*
  blocked node in its own Cast pair, so two adjacent FP32 nodes exchange
  their tensor through FP16 (observed: ``Conv -> Cast(fp16) -> Cast(fp32)
  -> Add`` for a blocked Conv/Add pair). A value above 65504 between two
  FP32 nodes becomes inf, exactly what the islands are for; it also
  converts Constant nodes feeding FP32 nodes to FP16 and back, and appends
  its Casts at the end of the graph (needing a re-sort).
* The pass below needs only ``onnx``: it assigns FP16 or FP32 to every
  float node, gives each tensor its producer's type, and adds one Cast per
  (tensor, type) where a consumer needs the other type, placed right after
  the producer. Inputs the schema fixes to ``tensor(float)`` (Resize
  ``scales``) stay FP32; type-free inputs (Shape) are left alone.
  Initializers used only by FP16 nodes become FP16 (finite values clamped to +-65504);
  ones shared with FP32 nodes get an FP16 copy. The opset is unchanged.

ONNX Runtime on CPU hides FP16 overflow, so besides the comparison with
PyTorch the result is checked with :func:`.audit.emulate_fp16`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import heap
from ..atomic import check_output_path, staging_dir
from ..errors import CheckFailed, UsageError
from ..progress import ProgressFn
from ..shapes import Shape, fit_shapes, round_up
from ..spec import ModelSpec, ReferenceOptions, format_shape
from .audit import (DEFAULT_THRESHOLD, FP16_MAX, AuditReport, EmulationReport, Fp32Island, audit_fp16,
                    default_calibration_shapes, emulate_fp16, memory_budget_for, value_types)
from .foreign import is_foreign, resolve_shapes, spec_of
from . import weights
from ..host import host_info
from ..version import __version__
from ..graph import find_attention
from ..graph.attention import AttentionSite
from ..graph.index import TypedIndex
from .metadata import embed_spec, load_onnx, read_record, set_record
from .serving import refuse_serving_form
from .weights import DataWriter, read_array


class CompareFn(Protocol):
    """Compares a written FP16 file with its reference; returns the check record of :class:`Fp16Result`.

    ``reference``: the FP32 ONNX file to compare against (files this tool did
    not export), else None for the PyTorch model the file describes. The
    record has ``passed``, ``shapes`` (shape, max_abs_err, mean_abs_err,
    passed), ``max_abs_err``, ``tolerances`` and ``failures``. It lives a
    layer above (:func:`attn_export.pipeline.compare_fp16`): it runs verify.
    """

    def __call__(self, path: Path, shapes: Sequence[Shape], *, reference: Path | None,
                 input_ranges: dict[str, tuple[float, float]] | None,
                 reference_model: ReferenceOptions | None) -> dict[str, Any]: ...
# Plain ints, like every element type this module keeps (onnx types them TensorProto.DataType, a subtype of int).
F32: int = TensorProto.FLOAT
F16: int = TensorProto.FLOAT16
# Ops whose float output type comes from an attribute, not from their inputs: left in FP32.
_DTYPE_ATTR_OPS = frozenset({"ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
                             "RandomUniformLike", "Multinomial", "Bernoulli"})


@dataclass
class Fp16Result:
    """What :func:`convert_fp16` produced."""

    path: Path
    source: Path
    spec: ModelSpec
    audit: AuditReport
    fp32_nodes: list[Fp32Island]
    nodes_fp16: int
    nodes_fp32: int
    nodes_other: int            # nodes with no float output (Shape, int arithmetic, ...)
    casts_added: int
    initializers_fp16: int
    initializers_fp32: int
    clamped_initializers: list[str]
    attention: list[dict[str, Any]]   # per attention node: name and Q/K/V dtypes
    size_bytes: int
    seconds: float
    check: dict[str, Any] | None = None
    emulation: EmulationReport | None = None
    forced_fp16: list[str] = field(default_factory=list)
    decomposed: list[str] = field(default_factory=list)  # Attention sites written as MatMul/Softmax/MatMul (no fused kernel)
    steps: dict[str, float] = field(default_factory=dict)
    external_data: Path | None = None   # NAME.onnx.data, for outputs whose weights reach 2 GB
    notes: list[str] = field(default_factory=list)  # what was decided for the user (default shapes left out)
    # The FP16 graph as written (weights left in their files; types and shapes inferred) and its attention analysis:
    # what a next stage (the engine build's readiness check) reads instead of parsing and analysing the file again.
    graph: onnx.ModelProto | None = field(default=None, repr=False, compare=False)
    analysis: list[AttentionSite] = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "attn-export fp16", "host": host_info(),
            "path": str(self.path), "source": str(self.source), "precision": self.spec.precision,
            "nodes": {"fp16": self.nodes_fp16, "fp32": self.nodes_fp32, "other": self.nodes_other},
            "casts_added": self.casts_added,
            "initializers": {"fp16": self.initializers_fp16, "fp32": self.initializers_fp32,
                             "clamped": self.clamped_initializers},
            "fp32_nodes": [i.to_dict() for i in self.fp32_nodes],
            "notes": list(self.notes),
            "forced_fp16": list(self.forced_fp16),
            "attention": self.attention,
            "audit": self.audit.to_dict(),
            "check": self.check,
            "emulation": self.emulation.to_dict() if self.emulation else None,
            "size_bytes": self.size_bytes, "external_data": str(self.external_data) if self.external_data else None,
            "seconds": round(self.seconds, 3),
            "steps": {k: round(v, 3) for k, v in self.steps.items()},
        }


# ---------------------------------------------------------------------------------------------------------------------
# the conversion pass
# ---------------------------------------------------------------------------------------------------------------------
def _opset(model: onnx.ModelProto, domain: str = "") -> int:
    return next((o.version for o in model.opset_import if o.domain in ((domain, "ai.onnx") if domain == "" else (domain,))), 0)


def _input_rules(node: onnx.NodeProto, opset: int) -> list[str]:
    """Per input: 'tied' (follows the node's precision), 'fixed32' (schema says tensor(float)) or 'free'."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except Exception:  # noqa: BLE001 - unknown/custom op: every float input follows the node
        return ["tied"] * len(node.input)
    formals = list(schema.inputs)
    out_types = {o.type_str for o in schema.outputs}
    rules = []
    for i in range(len(node.input)):
        f = formals[min(i, len(formals) - 1)] if formals else None
        if f is None:
            rules.append("tied")
        elif f.type_str.startswith("tensor("):
            rules.append("fixed32" if f.type_str == "tensor(float)" else "free")
        else:
            shared = f.type_str in out_types or sum(g.type_str == f.type_str for g in formals) > 1
            rules.append("tied" if shared else "free")
    return rules


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Float Constant nodes become initializers, so one rule (per-consumer type) handles all weights."""
    keep = []
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            if t.data_type == F32:
                t.name = n.output[0]
                model.graph.initializer.append(t)
                continue
        keep.append(n)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def _to_fp16_tensor(init: onnx.TensorProto, name: str, weights_folder: Path | None,
                    writer: DataWriter | None) -> tuple[onnx.TensorProto, bool]:
    """FP16 copy of an FP32 initializer, clamped to the FP16 range (a scalar epsilon raised to its smallest
    normal); also returns whether clamping happened."""
    a = read_array(init, weights_folder).astype(np.float32, copy=False)
    # Finite values beyond FP16's range are clamped; an infinity (a mask's -inf) is one in FP16 too.
    over = np.isfinite(a) & (np.abs(a) > FP16_MAX)
    a16 = np.where(over, np.sign(a) * FP16_MAX, a)
    # A lone nonzero scalar below FP16's smallest normal is an epsilon (F.normalize's clamp_min(1e-12), a norm's
    # eps): flushed to 0 it turns x / max(|x|, eps) into 0/0. It becomes the smallest normal instead. Tensors keep
    # their tiny values' ordinary underflow.
    tiny = float(np.finfo(np.float16).tiny)
    under = (a.size == 1) & (a != 0) & (np.abs(a) < tiny)
    a16 = np.where(under, np.sign(a) * tiny, a16).astype(np.float16)
    clamped = bool(over.any() or np.any(under))
    del a
    return (writer.tensor(a16, name) if writer is not None else numpy_helper.from_array(a16, name)), clamped


def convert_graph(
    model: onnx.ModelProto,
    fp32_nodes: Iterable[str],
    *,
    keep_io_types: bool = True,
    weights_folder: Path | None = None,
    writer: DataWriter | None = None,
) -> dict[str, Any]:
    """Convert ``model`` in place: FP16 everywhere except the named nodes; returns counts for the summary.

    External FP32 initializers are read one at a time from ``weights_folder``;
    the FP16 ones are appended to ``writer``'s data file when large (inline
    without a writer).
    """
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute):
        raise UsageError("models with subgraphs (If/Loop/Scan) are not supported by the FP16 conversion")
    _constants_to_initializers(model)
    types = value_types(model)
    if any(t == F16 for t in types.values()):
        raise UsageError("the model already holds FP16 tensors; convert the FP32 export")
    g = model.graph
    opset = _opset(model)
    blocked = set(fp32_nodes)
    inits = {i.name: i for i in g.initializer}

    # 1. node precision: "fp32", "fp16" or None (no float output: left alone).
    precision: dict[int, str | None] = {}
    for idx, n in enumerate(g.node):
        makes_float = any(types.get(o) == F32 for o in n.output if o)
        if not makes_float:
            precision[idx] = None
        elif n.name in blocked or n.op_type in _DTYPE_ATTR_OPS:
            precision[idx] = "fp32"
        else:
            precision[idx] = "fp16"

    # 2. tensor types after conversion: graph inputs, then node outputs.
    dtype: dict[str, int] = {}
    for vi in g.input:
        if types.get(vi.name) == F32 and vi.name not in inits:
            dtype[vi.name] = F32 if keep_io_types else F16
    for idx, n in enumerate(g.node):
        p = precision[idx]
        for o in n.output:
            if o and types.get(o) == F32:
                dtype[o] = F16 if p == "fp16" else F32
        if p == "fp16" and n.op_type == "Cast":
            for a in n.attribute:
                if a.name == "to" and a.i == F32:
                    a.i = F16

    # 3. what each consumer needs; initializers decided from their consumers.
    needs: list[tuple[int, int, int]] = []  # (node index, input index, required type)
    init_needs: dict[str, set[int]] = {}
    for idx, n in enumerate(g.node):
        p = precision[idx]
        rules = _input_rules(n, opset)
        for i, name in enumerate(n.input):
            if not name or (types.get(name) != F32):
                continue
            rule = rules[i] if i < len(rules) else "tied"
            if rule == "free" or p is None:
                continue
            want = F32 if (rule == "fixed32" or p == "fp32") else F16
            if name in inits:
                init_needs.setdefault(name, set()).add(want)
            needs.append((idx, i, want))

    clamped: list[str] = []
    fp16_copy: dict[str, str] = {}
    n_init16 = 0
    for name, wants in init_needs.items():
        if wants == {F16}:
            t, c = _to_fp16_tensor(inits[name], name, weights_folder, writer)
            inits[name].CopyFrom(t)
            dtype[name] = F16
            n_init16 += 1
        elif F16 in wants:
            # Shared with FP32 consumers: keep FP32, add an FP16 copy (no Cast at run time).
            new = f"{name}__fp16"
            t, c = _to_fp16_tensor(inits[name], new, weights_folder, writer)
            g.initializer.append(t)
            fp16_copy[name] = new
            dtype[name] = F32
            n_init16 += 1
        else:
            c = False
            dtype[name] = F32
        if c:
            clamped.append(name)

    # 4. rewire inputs, collecting the Casts to add (one per tensor and target type).
    casts: dict[tuple[str, int], str] = {}
    for idx, i, want in needs:
        n = g.node[idx]
        name = n.input[i]
        have = dtype.get(name, F32)
        if have == want:
            continue
        if name in fp16_copy and want == F16:
            n.input[i] = fp16_copy[name]
            continue
        key = (name, want)
        if key not in casts:
            casts[key] = f"{name}__to_{'fp16' if want == F16 else 'fp32'}"
        n.input[i] = casts[key]

    # 5. graph outputs: FP32 with keep_io_types, FP16 otherwise; the producer's tensor is renamed.
    out_fix: list[tuple[str, str, int]] = []
    for vi in g.output:
        if types.get(vi.name) != F32 or vi.name not in dtype:
            continue
        want = F32 if keep_io_types else F16
        if dtype[vi.name] != want:
            inner = f"{vi.name}__{'fp16' if dtype[vi.name] == F16 else 'fp32'}"
            for n in g.node:
                for j, o in enumerate(n.output):
                    if o == vi.name:
                        n.output[j] = inner
                for j, x in enumerate(n.input):
                    if x == vi.name:
                        n.input[j] = inner
            for k in [k for k in casts if k[0] == vi.name]:
                casts[(inner, k[1])] = casts.pop(k)
            dtype[inner] = dtype[vi.name]
            out_fix.append((inner, vi.name, want))
        vi.type.tensor_type.elem_type = want
    for vi in g.input:
        if vi.name in dtype:
            vi.type.tensor_type.elem_type = dtype[vi.name]

    # 6. rebuild the node list: casts right after their source is available.
    by_source: dict[str, list[onnx.NodeProto]] = {}
    for (src, want), out in casts.items():
        by_source.setdefault(src, []).append(helper.make_node("Cast", [src], [out], name=out + "_Cast", to=want))
    for inner, outer, want in out_fix:
        by_source.setdefault(inner, []).append(helper.make_node("Cast", [inner], [outer], name=outer + "__io_Cast", to=want))
    available = {vi.name for vi in g.input} | set(inits) | {i.name for i in g.initializer}
    nodes: list[onnx.NodeProto] = []
    for src in list(by_source):
        if src in available:
            nodes.extend(by_source.pop(src))
    for n in list(g.node):
        nodes.append(n)
        for o in n.output:
            nodes.extend(by_source.pop(o, []))
    if by_source:
        raise RuntimeError(f"FP16 conversion: no producer for {sorted(by_source)[:3]}")
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]

    counted = [p for p in precision.values()]
    return {
        "nodes_fp16": counted.count("fp16"), "nodes_fp32": counted.count("fp32"), "nodes_other": counted.count(None),
        "casts_added": len(casts) + len(out_fix), "initializers_fp16": n_init16,
        "initializers_fp32": sum(1 for i in g.initializer if i.data_type == F32), "clamped": clamped,
    }


def decompose_unfusable(model: onnx.ModelProto, weights_folder: Path | None = None,
                        analysis: Sequence[AttentionSite] | None = None) -> list[str]:
    """Write each Attention node that no fused kernel takes as the MatMul/Softmax/MatMul chain; the sites rewritten.

    No kernel: Q/K/V left in FP32 by the audit, or a head size outside the
    fused kernels' window (ddpm-256's 512). TensorRT's Attention layer is not
    decomposable by default, so a builder that does not mark it (trtexec)
    would stop on such a node; the chain builds anywhere, as separate
    kernels, and computes the same.
    """
    from ..graph import canonicalize_attention, find_attention
    from ..graph.attention import head_size_fusable

    found = [s for s in (analysis if analysis is not None else find_attention(model, run=False)) if s.form == "op"]
    if any(s.head_size is None for s in found) and weights_folder is not None:
        # Head sizes that shapes do not tell (a 3-D q with heads in an attribute) are read from two small runs.
        found = [s for s in find_attention(model, run=True, weights_folder=weights_folder) if s.form == "op"]
    sites = [s for s in found if head_size_fusable(s.head_size) is False
             or s.dtype is not None and s.dtype not in ("float16", "bfloat16")]
    if not sites:
        return []
    result = canonicalize_attention(model, "decomposed", sites=sites, run=False)
    return list(result.rewritten)


def attention_dtypes(found: Sequence[Any]) -> list[dict[str, Any]]:
    """Per attention site of an analysis: name and the dtypes Q, K and V are computed in."""
    out = []
    for s in found:
        def dt(op: Any) -> str:
            return (op.compute_dtype or op.dtype or "?") if op is not None else "?"
        out.append({"block": s.name, "form": s.form, "q": dt(s.q), "k": dt(s.k), "v": dt(s.v)})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------------------------------
def default_check_shapes(spec: ModelSpec) -> list[Shape]:
    """Two quick shapes for the comparison with PyTorch: a square one and a non-square one at batch 2."""
    m = spec.hw_multiple
    return fit_shapes(spec, [(1, round_up(16, m), round_up(16, m)), (2, round_up(16, m), round_up(24, m))])


FP16_KEY = "attn_export.fp16"


def fp16_settings(source: Path, *, threshold: float, calibration_shapes: Sequence[Shape] | None = None,
                  input_shapes: str | Sequence[str] | None = None, extra_fp32_ops: Iterable[str] = (),
                  keep_io_types: bool = True, extra_fp32_nodes: Iterable[str] = (),
                  force_fp16_nodes: Iterable[str] = (), input_ranges: dict[str, tuple[float, float]] | None = None,
                  checked: bool = True, model: onnx.ModelProto | None = None) -> dict[str, Any]:
    """What an FP16 file is made of: its source's bytes (sha256, data files included), the settings asked for,
    and whether it was checked against its reference (a reused file must have been).

    ``model``: the source's graph, already parsed (its data files are named there), to spare a parse.
    """
    from ..files import file_sha256
    from .metadata import external_data_locations

    digest = hashlib.sha256(file_sha256(source).encode())
    graph = model if model is not None else load_onnx(source, load_external_data=False)
    for loc in sorted(external_data_locations(graph, source)):
        digest.update(file_sha256(source.parent / loc).encode())
    return {"source_sha256": digest.hexdigest(), "threshold": float(threshold),
            "calibration_shapes": [list(map(int, s)) for s in calibration_shapes] if calibration_shapes else None,
            "input_shapes": [input_shapes] if isinstance(input_shapes, str) else list(input_shapes or []),
            "extra_fp32_ops": sorted(extra_fp32_ops), "keep_io_types": bool(keep_io_types),
            "extra_fp32_nodes": sorted(extra_fp32_nodes), "force_fp16_nodes": sorted(force_fp16_nodes),
            "input_ranges": {k: [float(v[0]), float(v[1])] for k, v in sorted((input_ranges or {}).items())},
            "checked": bool(checked), "tool_version": __version__}


def record_fp16_settings(model: onnx.ModelProto, settings: dict[str, Any]) -> None:
    """Store :func:`fp16_settings` in the FP16 model, so a later run can tell whether it may reuse the file."""
    set_record(model, FP16_KEY, settings)


def recorded_fp16_settings(path: Path) -> dict[str, Any] | None:
    """The settings an FP16 file records (None for any other file, or one that cannot be read)."""
    try:
        return read_record(load_onnx(path, load_external_data=False), FP16_KEY)
    except UsageError:
        return None


def convert_fp16(
    onnx_in: str | Path,
    onnx_out: str | Path,
    *,
    keep_io_types: bool = True,
    threshold: float = DEFAULT_THRESHOLD,
    calibration_shapes: Sequence[Shape] | None = None,
    extra_fp32_ops: Iterable[str] = (),
    force: bool = False,
    force_fp16_nodes: Iterable[str] = (),
    extra_fp32_nodes: Iterable[str] = (),
    check: bool = True,
    check_shapes: Sequence[Shape] | None = None,
    progress: ProgressFn | None = None,
    input_shapes: str | Sequence[str] | None = None,
    input_ranges: dict[str, tuple[float, float]] | None = None,
    reference_model: ReferenceOptions | None = None,
    max_memory: int | None = None,
    compare: CompareFn | None = None,
    model: onnx.ModelProto | None = None,
    settings: dict[str, Any] | None = None,
) -> Fp16Result:
    """Convert an attn-export FP32 ONNX file to FP16 with audited FP32 islands; write ``onnx_out`` atomically.

    ``threshold``: activation absmax above which nodes stay FP32 (see
    :mod:`.audit`). ``extra_fp32_ops``: op types kept FP32 as well.
    ``force_fp16_nodes`` / ``extra_fp32_nodes``: per-node overrides (the
    first for experiments: it can reintroduce overflow). With ``check`` the
    result is compared with its reference by ``compare`` (required with
    ``check``; :func:`attn_export.convert_fp16` passes the comparison with
    PyTorch at fp16 tolerances) and run through the FP16 emulation at the
    largest calibration shape before it is put in place; a failure leaves
    nothing behind (CheckFailed, exit 1).

    A file this tool did not export works too: its description is read off
    the graph (:mod:`.foreign`), ``input_shapes`` (Polygraphy style,
    ``x:1x3x64x64,sigma:1``) give the calibration and check shapes when H/W
    are dynamic, and the check compares with the FP32 input file in ONNX
    Runtime instead of PyTorch. ``reference_model``: the user's choice of
    PyTorch reference for the check (passed on to ``compare``).
    ``max_memory``: bytes a calibration shape may need (None: this
    machine's memory, 0: no limit); larger shapes are refused up front.
    ``model``: ``onnx_in``'s graph, parsed without external data by the
    caller (spares a parse; it is converted in place). ``settings``: the
    :func:`fp16_settings` record the caller computed for these arguments
    (spares hashing the source again); recorded in the output.
    """
    t_start = time.perf_counter()
    steps: dict[str, float] = {}
    src = Path(onnx_in)
    out = check_output_path(onnx_out, force=force)
    if src.resolve() == out.resolve():
        raise UsageError("the FP16 output must be a different file from the input")
    if not threshold or not 0 < threshold <= FP16_MAX:
        raise UsageError(f"--threshold must be in (0, {FP16_MAX:g}] (got {threshold})")
    if check and compare is None:
        # This layer cannot run a model against PyTorch; the check is composed above (attn_export.convert_fp16).
        raise TypeError("convert_fp16(check=True) needs compare=...; use attn_export.convert_fp16")

    def step(name: str) -> None:
        if progress:
            progress(name)
        steps[name] = time.perf_counter()

    def done(name: str) -> None:
        steps[name] = time.perf_counter() - steps[name]

    extra_fp32_nodes, force_fp16_nodes, extra_fp32_ops = list(extra_fp32_nodes), list(force_fp16_nodes), tuple(extra_fp32_ops)
    step("load")
    # The graph only: inline weights are parsed with it, and moved to a data file in the staging folder below.
    if model is None:
        model = load_onnx(src, load_external_data=False)
    refuse_serving_form(model, src, "the FP16 conversion")
    if settings is None:
        settings = fp16_settings(src, threshold=threshold, calibration_shapes=calibration_shapes,
                                 input_shapes=input_shapes, extra_fp32_ops=extra_fp32_ops, keep_io_types=keep_io_types,
                                 extra_fp32_nodes=extra_fp32_nodes, force_fp16_nodes=force_fp16_nodes,
                                 input_ranges=input_ranges, checked=check, model=model)
    spec = spec_of(model, origin=str(src), input_ranges=input_ranges)
    foreign = is_foreign(spec)
    calibration_shapes = resolve_shapes(spec, calibration_shapes, input_shapes, what="the FP16 calibration",
                                        option="--calibration-shapes")
    if foreign and not check_shapes and calibration_shapes:
        check_shapes = list(calibration_shapes)[:2]
    if spec.precision != "fp32":
        raise UsageError(f"{src} is already {spec.precision}; convert the FP32 export")
    from ..graph.memory import DEFAULT_SHAPE_ACTIVATIONS, SizeModel, check_shapes_fit, human_bytes, shapes_that_fit

    # One size model for the memory checks, the audit's and the emulation's tensor groups: one shape inference
    # covers them all while everything fits.
    sizes = SizeModel(model, spec)
    calibration_notes: list[str] = []
    # The audit reads every activation of a run at once: all of them count, not the live peak.
    if calibration_shapes:
        check_shapes_fit(model, spec, list(calibration_shapes), max_memory, what="calibration shape", keep_all=True,
                         sizes=sizes)
    else:
        # The default shapes are a choice made here, not the user's: the ones this machine cannot hold are left out.
        calibration_shapes, left_out = shapes_that_fit(model, spec, default_calibration_shapes(spec), max_memory,
                                                       keep_all=True, sizes=sizes)
        if not calibration_shapes:
            raise UsageError(f"no default calibration shape fits in memory (shape {left_out[0]}); "
                             "give --calibration-shapes")
        calibration_notes.extend(f"default calibration shape {reason} (the memory free here; "
                                 "--calibration-shapes or --max-memory choose)" for reason in left_out)
        # Each audit run costs the model's time at that shape: the ones a full-resolution attention site makes
        # minutes long are scaled down (the user's own shapes never are).
        calibration_shapes, changed = sizes.scaled_to_fit(calibration_shapes, DEFAULT_SHAPE_ACTIVATIONS)
        calibration_notes.extend(
            f"default calibration shape {format_shape(asked)} "
            f"{'scaled down to ' + format_shape(used) if used else 'left out'}: it needs about {human_bytes(need)} of "
            f"activations and attention scores (--calibration-shapes {format_shape(asked)} uses it)"
            for asked, used, need in changed)
    if check_shapes:
        check_shapes_fit(model, spec, list(check_shapes), max_memory, what="check shape", sizes=sizes)
    if check and not foreign:
        from ..models.loader import source_from_spec

        source_from_spec(spec, reference_model)  # an unusable reference is refused before the audit, not after it
    node_names = {n.name for n in model.graph.node}
    forced = list(dict.fromkeys(force_fp16_nodes))
    unknown = [n for n in forced + list(extra_fp32_nodes) if n not in node_names]
    if unknown:
        raise UsageError(f"no node named {unknown[0]!r} in {src}")

    data_name = out.name + ".data"
    # Everything is written in a hidden folder next to the output. The weights go there once, tensor by tensor;
    # every pass works on the weightless graph and ONNX Runtime reads the data files itself, so no step holds
    # a copy of all the weights. Only a checked result is moved into place; on failure or interruption the
    # folder goes, and nothing is left behind.
    with staging_dir(out) as tmpdir:
        stage = Path(tmpdir)
        model = weights.stage_weights(model, src.parent, stage / "fp32.data")
        heap.release()
        done("load")

        step("audit")
        # The FP32 model's budget serves the emulation too: the FP16 model's own would be half of it.
        budget = memory_budget_for(model)
        report = audit_fp16(model, threshold=threshold, calibration_shapes=calibration_shapes,
                            extra_fp32_ops=extra_fp32_ops, spec=spec, progress=progress, weights_folder=stage,
                            memory_budget=budget, sizes=sizes)
        done("audit")
        islands = [i for i in report.fp32_nodes if i.node not in set(forced)]
        have = {i.node for i in islands}
        by_name = {n.name: n for n in model.graph.node}
        islands += [Fp32Island(n, by_name[n].op_type, "user", "requested in FP32") for n in extra_fp32_nodes if n not in have]

        step("convert")
        orig_opset = [(o.domain, o.version) for o in model.opset_import]
        with weights.DataWriter(stage / "fp16.data") as writer:
            counts = convert_graph(model, [i.node for i in islands], keep_io_types=keep_io_types,
                                   weights_folder=stage, writer=writer)
        fp16_spec = ModelSpec.from_dict({**spec.to_dict(), "precision": "fp16"})
        if not keep_io_types:
            for t in fp16_spec.inputs + fp16_spec.outputs:
                if t.dtype == "float32":
                    t.dtype = "float16"
        try:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        except Exception as exc:  # noqa: BLE001 - a bug in the pass, reported as one line
            raise CheckFailed(f"the FP16 model failed the ONNX checks: {str(exc).splitlines()[0]}") from None
        if [(o.domain, o.version) for o in model.opset_import] != orig_opset:
            raise CheckFailed("the FP16 conversion changed the opset")
        # The one analysis of the finished graph, on the types and shapes the check just inferred: the report's
        # dtypes, the decomposition, the emulation's logits and the engine build's readiness all read it.
        # Its concrete sizes come from the FP32 model's inference at the calibration shapes' cover: the conversion
        # keeps the tensor names, and a level is read off a length at any known height and width.
        cover = sizes.covering(report.calibration_shapes)
        probed, probed_at = sizes.index(cover), (cover[1], cover[2])
        found = find_attention(model, index=TypedIndex(model, infer=False), weights_folder=stage, probed=probed,
                               probed_at=probed_at)
        decomposed = decompose_unfusable(model, stage, found)
        if decomposed:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
            found = find_attention(model, index=TypedIndex(model, infer=False), weights_folder=stage, probed=probed,
                                   probed_at=probed_at)
        embed_spec(model, fp16_spec)
        record_fp16_settings(model, settings)
        # FP32 weights that every consumer now reads in FP16 are dropped here: only used tensors are kept.
        staged, external = weights.save_staged(model, stage, out.name, data_name, ["fp32.data", "fp16.data"],
                                               weights.EXTERNAL_DATA_THRESHOLD)
        try:
            # The path form of the checker reads the data file's references itself: weights never in memory.
            onnx.checker.check_model(str(staged), full_check=True)
        except Exception as exc:  # noqa: BLE001 - a bug in the pass, reported as one line
            raise CheckFailed(f"the FP16 model failed the ONNX checks: {str(exc).splitlines()[0]}") from None
        attention = attention_dtypes(found)
        done("convert")

        check_result: dict[str, Any] | None = None
        emulation: EmulationReport | None = None
        if check:
            assert compare is not None
            step("check against PyTorch")
            check_result = compare(staged, check_shapes or default_check_shapes(spec),
                                   reference=src if foreign else None, input_ranges=input_ranges,
                                   reference_model=None if foreign else reference_model)
            heap.release()  # the PyTorch model and the sessions of the check
            done("check against PyTorch")
            step("FP16 emulation")
            largest = max(report.calibration_shapes, key=lambda s: s[0] * s[1] * s[2])
            emulation = emulate_fp16(model, [largest], spec=fp16_spec, weights_folder=stage, memory_budget=budget,
                                     analysis=found, sizes=sizes)
            done("FP16 emulation")
            if not check_result["passed"]:
                against = "the FP32 file" if foreign else "PyTorch"
                raise CheckFailed(f"FP16 model disagrees with {against} ({check_result['failures'][0]}); nothing was written")
            if not emulation.ok:
                f = emulation.first()
                assert f is not None
                raise CheckFailed(f"FP16 model overflows: {f.tensor} ({f.op_type}) is non-finite at "
                                      f"{format_shape(f.shape)}; nothing was written")
        step("save")
        data_path = weights.publish_staged(model, stage, staged, out, data_name, external)
        done("save")
    size = out.stat().st_size + (data_path.stat().st_size if data_path is not None else 0)
    return Fp16Result(
        path=out, source=src, spec=fp16_spec, audit=report, fp32_nodes=islands,
        nodes_fp16=counts["nodes_fp16"], nodes_fp32=counts["nodes_fp32"], nodes_other=counts["nodes_other"],
        casts_added=counts["casts_added"], initializers_fp16=counts["initializers_fp16"],
        initializers_fp32=counts["initializers_fp32"], clamped_initializers=counts["clamped"], attention=attention,
        size_bytes=size, seconds=time.perf_counter() - t_start, check=check_result, emulation=emulation,
        forced_fp16=forced, steps=steps, external_data=data_path, decomposed=decomposed, notes=calibration_notes,
        graph=model, analysis=found,
    )
