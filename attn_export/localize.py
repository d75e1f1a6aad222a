"""Debugging a mismatch: the first node where a candidate stops computing what its reference computes.

``verify`` says *that* an artifact disagrees with its reference; :func:`localize`
says *where* it starts (Polygraphy's ``--mark all`` followed by ``debug reduce``,
in one run). The candidate and its reference run on the same inputs with their
intermediate tensors exposed, every matched pair is compared under the rule of
:mod:`attn_export.compare`, and the report names the first node, in
topological order, whose output fails while its inputs still agree.

Two references:

* an ONNX file (``reference=``, e.g. the FP32 file an FP16 file was made
  from): every intermediate float tensor of both graphs is exposed as an
  output (in memory, on a copy) and both run in ONNX Runtime on the CPU,
  exactly as written (no graph optimizations: tensors keep their names and
  places). Tensors are matched by name; the FP16 conversion keeps the
  original names and adds Casts (``T__to_fp16``, a graph output's producer
  renamed ``out__fp16``), which the matching looks through.
* the PyTorch model the candidate's description rebuilds (the default for
  attn-export files): forward hooks record every module call's inputs and
  output, each matched to the ONNX tensor made by the last node of that
  module's scope with the same shape (the TorchScript exporter names nodes
  ``/downs.0/conv_2/conv_2.1/Conv`` after the module path; repeated calls of
  one module get ``_1``, ``_2``). Modules are compared in the order their
  calls finish, children before their parent, and the first module whose
  output diverges while its inputs agree is reported, with the ONNX node
  where the divergence shows first.

The FP16 file records no path to its FP32 source (a path inside an artifact
would be data anyway): pass the FP32 file as ``reference``, or let an
attn-export FP16 file be compared with PyTorch module by module.

* for a TensorRT or TensorRT-RTX engine, the ONNX file it was built from
  (``reference=``, checked against the SHA-256 its sidecar records): an
  engine holds no intermediate tensors, so that file is built again with
  the engine's settings and every float tensor marked as an output
  (:mod:`attn_export.engines.marked`, Polygraphy's ``--trt-outputs mark
  all``), run once on the GPU, and compared with the file in ONNX Runtime on
  the CPU. Marking forces TensorRT to write each tensor, so the marked
  engine fuses less than the shipped one; the report says so. Tensors the
  network does not have (folded constants, shape arithmetic) are unmatched.

Inputs: seeded ones from the model's description at each shape (shape i uses
``seed + i``, as verify's sweep does), or the caller's (:func:`load_inputs`
reads an ``.npz`` that :func:`save_inputs` wrote, or any with the right
names, dtypes and shapes). Shapes are tried in order; the first one where
something diverges is reported.

Memory: the exposed tensors of a run are held together, so they are fetched
in groups under the FP16 audit's budget (:func:`attn_export.exporter.audit.memory_budget_for`),
one session per group; the PyTorch pass holds the inputs and output of every
module call it could match.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, cast

import numpy as np
import onnx
from onnx import TensorProto

from . import heap
from .compare import OutputComparison, Tolerances, compare_arrays, json_number, resolve_tolerances
from .errors import AttnExportError, ShapeError, UsageError
from .exporter.audit import finite_absmax
from .progress import ProgressFn
from .shapes import Shape
from .inputs import check_inputs, describe_inputs, first_line as _first_line, load_inputs, save_inputs
from .spec import ReferenceOptions, format_shape, parse_shapes

if TYPE_CHECKING:
    import torch

FP16_MAX = 65504.0
# From here up FP16's spacing is 1 or more: a range that large is a reason to keep a node FP32 by threshold.
LARGE_FP16_VALUE = 1024.0
# Entries of the compared path kept in the report (the ones nearest the divergence).
DEFAULT_MAX_PATH = 50
# Nodes named in one fix (a module's FP16 nodes can be many).
MAX_FIX_NODES = 20
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
_ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class TensorError:
    """One compared tensor: the error between candidate and reference there."""

    tensor: str                    # the reference graph's name (file vs file) or the candidate's (vs PyTorch)
    node: str | None               # the ONNX node that makes it (None for an initializer)
    op_type: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float
    stat_abs: float                # the tolerance statistic of the absolute error (elemwise: its maximum)
    stat_rel: float
    reference_absmax: float        # max |reference| over its finite values: the tensor's range
    nonfinite: int                 # values non-finite on one side only
    passed: bool
    reason: str = ""
    module: str | None = None      # the PyTorch module call it stands for (vs PyTorch)
    candidate_dtype: str | None = None

    @classmethod
    def of(cls, c: OutputComparison, reference: np.ndarray, *, node: str | None, op_type: str,
           module: str | None = None, candidate_dtype: str | None = None) -> "TensorError":
        return cls(tensor=c.name, node=node, op_type=op_type, shape=list(c.shape), max_abs=c.max_abs,
                   mean_abs=c.mean_abs, max_rel=c.max_rel, stat_abs=c.stat_abs, stat_rel=c.stat_rel,
                   reference_absmax=finite_absmax(reference), nonfinite=c.nonfinite_mismatch, passed=c.passed,
                   reason=c.reason, module=module, candidate_dtype=candidate_dtype)

    def to_dict(self) -> dict[str, Any]:
        return {k: json_number(v) for k, v in self.__dict__.items()}


@dataclass
class InputError:
    """One input of the divergent node (or module): what it is and the error there."""

    name: str
    kind: str                      # "tensor" | "graph input" | "initializer" | "module input"
    producer: str | None = None    # the node that makes it
    error: TensorError | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "producer": self.producer,
                "error": self.error.to_dict() if self.error else None, "note": self.note}


@dataclass
class Divergence:
    """The first node whose output diverges while its inputs agree."""

    node: str                      # ONNX node: the reference graph's (file vs file) or the candidate's (vs PyTorch)
    op_type: str
    error: TensorError             # at its output (vs PyTorch: at the module's output)
    inputs: list[InputError]
    # Largest max abs error over the compared tensors upstream of it, all within tolerance: how clean its inputs are.
    upstream_max_abs: float
    module: str | None = None      # vs PyTorch: the module call whose output diverges first
    candidate_node: str | None = None  # file vs file: the candidate's node, where its name differs
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op_type": self.op_type, "module": self.module, "candidate_node": self.candidate_node,
                "error": self.error.to_dict(), "inputs": [i.to_dict() for i in self.inputs],
                "upstream_max_abs": json_number(self.upstream_max_abs), "note": self.note}


@dataclass
class Fix:
    """What to try: ``text`` in words, ``python`` and ``cli`` as calls and options where one exists."""

    kind: str                      # fp16-overflow | fp16-precision | fp16-inputs | weights | graph | export
    text: str
    nodes: list[str] = field(default_factory=list)
    python: str | None = None
    cli: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text, "nodes": list(self.nodes), "python": self.python, "cli": list(self.cli)}


@dataclass
class LocalizeReport:
    """Where a candidate first diverges from its reference; ``first`` is None when nothing does."""

    candidate: str
    reference: str                 # the reference ONNX file, or "pytorch (cpu)"
    mode: str                      # "onnx" (file vs file, node by node) | "pytorch" (module by module) | "engine"
    precision: str
    tolerances: Tolerances
    shape: Shape                   # the shape reported on (the first where something diverged, else the last tried)
    shapes_tried: list[Shape]
    input_source: str              # "seeded" | "given"
    seed: int | None
    inputs: dict[str, dict[str, Any]]  # per input: shape, dtype, min, max
    first: Divergence | None
    path: list[TensorError]        # the compared tensors leading to the divergence (or to the output), nearest last
    path_left_out: int             # earlier entries of that path not listed
    compared: int
    diverging: int                 # compared tensors that fail (the first and everything it spoils)
    unmatched: int                 # reference tensors (or module calls) with no counterpart
    outputs: list[TensorError]
    fix: Fix | None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # The arrays that ran (for save_inputs); not part of the JSON.
    feeds: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def diverged(self) -> bool:
        return self.first is not None

    def summary(self) -> str:
        """One line: where it diverges first, or that nothing does."""
        if self.first is None:
            return f"no compared tensor diverges at {format_shape(self.shape)} ({self.compared} compared, {self.tolerances.describe()})"
        f = self.first
        where = f"{f.node} ({f.op_type})" + (f" in module {f.module}" if f.module else "")
        return (f"first divergence at {format_shape(self.shape)}: {where}: max abs error {f.error.max_abs:.3g}, "
                f"{f.error.reason or 'fails'}; upstream max abs error {f.upstream_max_abs:.3g}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate, "reference": self.reference, "mode": self.mode, "precision": self.precision,
            "tolerances": self.tolerances.to_dict(), "shape": format_shape(self.shape),
            "shapes_tried": [format_shape(s) for s in self.shapes_tried], "input_source": self.input_source,
            "seed": self.seed, "inputs": self.inputs, "diverged": self.diverged, "summary": self.summary(),
            "first": self.first.to_dict() if self.first else None, "path": [e.to_dict() for e in self.path],
            "path_left_out": self.path_left_out, "compared": self.compared, "diverging": self.diverging,
            "unmatched": self.unmatched, "outputs": [e.to_dict() for e in self.outputs],
            "fix": self.fix.to_dict() if self.fix else None, "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


@dataclass
class _Outcome:
    """One shape's comparison, before it becomes the report."""

    first: Divergence | None
    path: list[TensorError]
    path_left_out: int
    compared: int
    diverging: int
    unmatched: int
    outputs: list[TensorError]
    fix: Fix | None
    notes: list[str] = field(default_factory=list)


def _typed(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, int], dict[str, tuple[int, ...]]]:
    """Element type of every tensor, and the static shape of those shape inference can tell with the inputs'
    dims pinned to ``feeds``' (best effort: a file from elsewhere may defeat it)."""
    from .graph.index import TypedIndex, weightless_copy

    light = weightless_copy(model)
    for vi in light.graph.input:
        if vi.name in feeds:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in np.shape(feeds[vi.name]):
                dims.add().dim_value = int(d)
    del light.graph.value_info[:]
    try:
        index = TypedIndex(onnx.shape_inference.infer_shapes(light, data_prop=True), infer=False)
    except Exception:  # noqa: BLE001 - inference is best effort; shapes stay unknown and types come unpinned
        index = TypedIndex(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for n, dims in index.shapes.items():
        known = [d for d in dims or [] if isinstance(d, int)]
        if dims is not None and len(known) == len(dims):
            shapes[n] = tuple(known)
    return dict(index.types), shapes


def _nbytes(name: str, types: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Bytes of one tensor; -1 when its shape is unknown."""
    shape = shapes.get(name)
    if shape is None:
        return -1
    item = 2 if types.get(name) in (TensorProto.FLOAT16, TensorProto.BFLOAT16) else 8 if types.get(name) == TensorProto.DOUBLE else 4
    return int(np.prod(shape, dtype=np.int64)) * item


def _groups(names: Sequence[str], sizes: Mapping[str, int], budget: int) -> list[list[str]]:
    """Consecutive groups of ``names`` under ``budget`` bytes each (an unknown size counts as the largest known)."""
    known = [s for s in sizes.values() if s > 0]
    fallback = max(known) if known else 0
    groups: list[list[str]] = [[]]
    used = 0
    for n in names:
        size = sizes.get(n, -1)
        size = size if size > 0 else fallback
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += size
    return [g for g in groups if g]


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _model_feeds(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], origin: str) -> dict[str, np.ndarray]:
    """``feeds`` in the dtypes this graph declares (an FP16 file written without FP32 inputs takes float16)."""
    from onnx import helper

    out = {}
    for vi in _graph_inputs(model):
        if vi.name not in feeds:
            raise UsageError(f"{origin} takes input {vi.name}, which the candidate does not")
        out[vi.name] = np.ascontiguousarray(feeds[vi.name], dtype=helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    return out


def _run_exposed(model: onnx.ModelProto, folder: Path, types: Mapping[str, int], names: Sequence[str],
                 feeds: Mapping[str, np.ndarray], origin: str) -> dict[str, np.ndarray]:
    """The named tensors of one CPU run of ``model`` as written (graph inputs come from the feeds)."""
    import onnxruntime as ort

    from .exporter.audit import expose
    from .exporter.weights import has_external
    from .graph.probe import read_external_data_from

    model_feeds = _model_feeds(model, feeds, origin)
    wanted = [n for n in dict.fromkeys(names) if n not in model_feeds]
    values: dict[str, np.ndarray] = {n: model_feeds[n] for n in names if n in model_feeds}
    if not wanted:
        return values
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # No rewrites: every exposed tensor keeps its name and the node that makes it (as the FP16 audit runs).
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if has_external(model):
        read_external_data_from(opts, folder)
    try:
        sess = ort.InferenceSession(expose(model, wanted, dict(types)).SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        values.update(zip(wanted, sess.run(wanted, model_feeds)))
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types; one line says which file
        raise UsageError(f"ONNX Runtime cannot run {origin} with its intermediate tensors exposed: {_first_line(exc)}") from None
    del sess
    return values


def _is_engine(path: Path) -> bool:
    from .engines.sidecar import is_engine_path

    return path.suffix.lower() in _ENGINE_SUFFIXES or is_engine_path(path)


def engine_source(engine: Path, reference: Path | None) -> dict[str, Any]:
    """The sidecar of an engine to localize, once ``reference`` is known to be the ONNX file it was built from
    (UsageError otherwise, naming what to pass)."""
    from .engines.sidecar import read_sidecar
    from .files import file_sha256

    if reference is None:
        raise UsageError("--localize of an engine compares it with the ONNX file it was built from: pass --reference "
                         "with that file (for `attn-export trt --fp16`, its FP16 file)")
    sidecar = read_sidecar(engine)
    recorded = (sidecar.get("onnx") or {}).get("sha256")
    if recorded and file_sha256(reference) != recorded:
        raise UsageError(f"{engine.name} was not built from {reference}: its sidecar records another file "
                         f"(SHA-256 {str(recorded)[:12]}...); pass the ONNX file `attn-export trt` built it from")
    return sidecar


def _marked_engine_values(engine: Path, onnx_path: Path, sidecar: Mapping[str, Any], names: Sequence[str],
                          feeds: Mapping[str, np.ndarray], say: Callable[[str], None]) -> dict[str, np.ndarray]:
    """The named tensors of one GPU run of ``onnx_path`` built as ``engine`` was, with them marked as outputs."""
    import hashlib
    import tempfile

    from .engines.marked import build_marked
    from .engines.sidecar import sidecar_path, write_sidecar
    from .runners.trt_runner import TrtRunner

    say(f"building {onnx_path.name} as {engine.name} was, {len(names)} tensors marked as outputs")
    plan, marked = build_marked(onnx_path, sidecar, names)
    with tempfile.TemporaryDirectory(prefix="attn-export-marked-") as tmp:
        built = Path(tmp) / "marked.plan"
        built.write_bytes(plan)
        write_sidecar(sidecar_path(built), {**sidecar, "engine_file": built.name,
                                            "engine_sha256": hashlib.sha256(plan).hexdigest()})
        say("running the marked engine")
        with TrtRunner(built) as runner:
            out = runner.infer(feeds)
    return {n: np.asarray(out[n]) for n in marked if n in out}


def _fix_for_fp16(node: str, op_type: str, error: TensorError, shape: Shape, *, in_fp16: bool,
                  producers: Sequence[tuple[str, str]] = (), extra_nodes: Sequence[str] = ()) -> Fix:
    """The FP16 fix for a node that diverges: keep it (or, when it runs in FP32 already, what feeds it) in FP32."""
    overflow = error.nonfinite > 0 or error.reference_absmax > FP16_MAX
    if not in_fp16:
        keep = list(dict.fromkeys(name for name, _ in producers))[:MAX_FIX_NODES]
        return Fix(
            kind="fp16-inputs",
            text=(f"{node} ({op_type}) already runs in FP32, and its inputs agree within tolerance: it amplifies their "
                  "FP16 rounding. Keep the nodes that feed it in FP32 too"
                  + (f" ({', '.join(keep[:3])}{', ...' if len(keep) > 3 else ''})" if keep else "")
                  + ", or compare with a looser --atol/--rtol if the final output passes."),
            nodes=keep, python=f"convert_fp16(..., extra_fp32_nodes={keep!r})" if keep else None,
            cli=[" ".join(f"--fp32-node {n}" for n in keep)] * bool(keep) + sorted({f"--fp32-op {op}" for _, op in producers}))
    keep = list(dict.fromkeys([node, *extra_nodes]))[:MAX_FIX_NODES]
    cli = [" ".join(f"--fp32-node {n}" for n in keep), f"--fp32-op {op_type}"]
    if overflow:
        # Any threshold flags a value beyond 65504, so the audit cannot have seen this one: it needs this shape.
        what = (f"overflows FP16 (its FP32 values reach {error.reference_absmax:.3g}, beyond 65504)"
                if error.reference_absmax > FP16_MAX else
                f"turns non-finite in FP16 although its FP32 values stay within {error.reference_absmax:.3g}: a value "
                "inside the op overflows")
        cli.append(f"--calibration-shapes {format_shape(shape)}")
        text = (f"{node} ({op_type}) {what}. Keep it in FP32: --fp32-node {node} (extra_fp32_nodes in Python); "
                f"--fp32-op {op_type} keeps every {op_type} in FP32, and --calibration-shapes {format_shape(shape)} lets "
                "the range audit see the activation at this shape (it keeps every node above --threshold in FP32). "
                "If it was forced to FP16 (force_fp16_nodes), drop it from that list.")
        return Fix("fp16-overflow", text, keep, f"convert_fp16(..., extra_fp32_nodes={keep!r})", cli)
    # A lower threshold helps only where values are large (FP16's spacing is 1 from 1024 up); for small values it
    # would send most of the model to FP32, so it is not offered.
    large = error.reference_absmax >= LARGE_FP16_VALUE
    threshold = 2.0 ** np.floor(np.log2(error.reference_absmax * 0.999)) if large else 0.0
    if large:
        cli.append(f"--threshold {threshold:g}")
    text = (f"{node} ({op_type}) loses precision in FP16 (values up to {error.reference_absmax:.3g}). Keep it in FP32: "
            f"--fp32-node {node} (extra_fp32_nodes in Python); --fp32-op {op_type} keeps every {op_type} in FP32"
            + (f", or --threshold {threshold:g} (below its range) makes the range audit keep it" if large else "")
            + ".")
    return Fix("fp16-precision", text, keep, f"convert_fp16(..., extra_fp32_nodes={keep!r})", cli)


def _bounded(entries: list[TensorError], limit: int) -> tuple[list[TensorError], int]:
    limit = max(1, int(limit))
    return (entries[-limit:], max(0, len(entries) - limit))


# ---------------------------------------------------------------------------------------------------------------------
# file vs file (node by node)
# ---------------------------------------------------------------------------------------------------------------------
_CAST_SUFFIXES = ("__fp16", "__fp32", "__to_fp16", "__to_fp32")


def _counterpart(name: str, made: Mapping[str, onnx.NodeProto]) -> str | None:
    """The candidate tensor holding the reference's ``name``: the same name, or the FP16 converter's renamed producer
    of a graph output."""
    if name in made:
        return name
    return next((name + s for s in _CAST_SUFFIXES if name + s in made), None)


def _through_casts(name: str, made: Mapping[str, onnx.NodeProto]) -> str:
    """The tensor behind a chain of Casts (the FP16 converter feeds an FP32 island through ``T__to_fp32``)."""
    seen = set()
    while name in made and made[name].op_type == "Cast" and made[name].input and name not in seen:
        seen.add(name)
        name = made[name].input[0]
    return name


def _constant(model: onnx.ModelProto, name: str, made: Mapping[str, onnx.NodeProto], folder: Path) -> np.ndarray | None:
    """The value of an initializer or Constant node output, else None."""
    from onnx import numpy_helper

    from .exporter.weights import read_array

    init = next((i for i in model.graph.initializer if i.name == name), None)
    if init is not None:
        try:
            return read_array(init, folder)
        except Exception:  # noqa: BLE001 - an unreadable weight is reported as not compared
            return None
    node = made.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                return numpy_helper.to_array(a.t)
    return None


def _upstream_tensors(start: Sequence[str], made: Mapping[str, onnx.NodeProto]) -> set[str]:
    """Every tensor that ``start`` (node inputs) depends on, the starts included."""
    seen: set[str] = set()
    stack = [s for s in start if s]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        node = made.get(t)
        if node is not None:
            stack.extend(i for i in node.input if i)
    return seen


def _compare_files(cand: onnx.ModelProto, cand_path: Path, ref: onnx.ModelProto, ref_path: Path,
                   feeds: Mapping[str, np.ndarray], shape: Shape, tol: Tolerances, budget: int, max_path: int,
                   precision: str, say: Callable[[str], None],
                   candidate_values: Callable[[Sequence[str]], Mapping[str, np.ndarray]] | None = None) -> _Outcome:
    """Node by node, ``cand`` against ``ref``, both run in ONNX Runtime on the CPU; ``candidate_values``: where the
    candidate's tensors come from instead (an engine's marked outputs; names it lacks count as unmatched)."""
    c_types, c_shapes = _typed(cand, feeds)
    r_types, r_shapes = _typed(ref, feeds)
    c_made = {o: n for n in cand.graph.node for o in n.output if o}
    r_made = {o: n for n in ref.graph.node for o in n.output if o}

    # The reference's float tensors in its (topological) node order, each with its candidate counterpart.
    pairs: dict[str, str] = {}
    unmatched = 0
    for node in ref.graph.node:
        if node.op_type == "Constant":
            continue
        for o in node.output:
            if not o or r_types.get(o) not in _FLOATS:
                continue
            c = _counterpart(o, c_made)
            if c is None or c_types.get(c) not in _FLOATS:
                unmatched += 1
                continue
            pairs[o] = c
    if not pairs:
        raise UsageError(f"no intermediate tensor of {cand_path} has a counterpart of the same name in {ref_path}; "
                         "localize compares files made from one another (an export and its FP16 conversion)")

    got: Mapping[str, np.ndarray] | None = None
    if candidate_values is not None:
        got = candidate_values(list(pairs.values()))  # one run gives them all
        unmatched += sum(1 for c in pairs.values() if c not in got)
        pairs = {o: c for o, c in pairs.items() if c in got}
        if not pairs:
            raise UsageError(f"no intermediate tensor of {ref_path} could be read back from {cand_path.name}")
    sizes = {o: max(_nbytes(o, r_types, r_shapes), 0) + max(_nbytes(c, c_types, c_shapes), 0) for o, c in pairs.items()}
    errors: dict[str, TensorError] = {}
    groups = _groups(list(pairs), sizes, budget)
    for gi, group in enumerate(groups):
        say(f"running {'the reference' if got is not None else 'both files'}, tensor group {gi + 1}/{len(groups)}")
        rv = _run_exposed(ref, ref_path.parent, r_types, group, feeds, str(ref_path))
        cv = ({pairs[o]: got[pairs[o]] for o in group} if got is not None else
              _run_exposed(cand, cand_path.parent, c_types, [pairs[o] for o in group], feeds, str(cand_path)))
        for o in group:
            node = r_made[o]
            cvalue = cv[pairs[o]]
            errors[o] = TensorError.of(compare_arrays(o, rv[o], cvalue, tol), rv[o], node=node.name, op_type=node.op_type,
                                       candidate_dtype=str(cvalue.dtype))
        del rv, cv
        heap.release()

    order = list(pairs)
    position = {o: i for i, o in enumerate(order)}
    failing = [o for o in order if not errors[o].passed]
    outputs = [errors[o.name] for o in ref.graph.output if o.name in errors]
    graph_inputs = {vi.name for vi in _graph_inputs(ref)}
    if not failing:
        out_name = next((o.name for o in ref.graph.output if o.name in errors), order[-1])
        node = r_made[out_name]
        ups = sorted((t for t in _upstream_tensors(node.input, r_made) if t in errors), key=position.__getitem__)
        path, left = _bounded([errors[t] for t in ups] + [errors[out_name]], max_path)
        return _Outcome(None, path, left, len(errors), 0, unmatched, outputs, None)

    o = failing[0]
    node = r_made[o]
    # The candidate's node behind the counterpart: an FP32 graph output of an FP16 file comes out of an io Cast.
    c_src = _through_casts(pairs[o], c_made)
    c_node = c_made.get(c_src)
    same_node = c_node is not None and c_node.name == node.name
    # Every output of the node: the first failing one is reported, the others only counted.
    ups = sorted((t for t in _upstream_tensors(node.input, r_made) if t in errors), key=position.__getitem__)
    upstream_max = max((errors[t].max_abs for t in ups), default=0.0)

    inputs: list[InputError] = []
    weights_differ: list[str] = []
    rewired: list[str] = []
    for j, name in enumerate(node.input):
        if not name:
            continue
        cname = _through_casts(c_node.input[j], c_made) if same_node and c_node is not None and j < len(c_node.input) else name
        if name in graph_inputs:
            inputs.append(InputError(name, "graph input", note="the same data on both sides"))
            continue
        rconst = _constant(ref, name, r_made, ref_path.parent)
        if rconst is not None:
            cconst = _constant(cand, cname, c_made, cand_path.parent)
            if cconst is None:
                inputs.append(InputError(name, "initializer", note=f"the candidate reads {cname}, not a constant"))
                continue
            comp = compare_arrays(name, rconst, cconst, tol)
            werr = TensorError.of(comp, rconst, node=None, op_type="initializer", candidate_dtype=str(cconst.dtype))
            if not werr.passed:
                weights_differ.append(name)
            inputs.append(InputError(name, "initializer", error=werr,
                                     note="" if werr.passed else "differs between the files"))
            continue
        producer = r_made.get(name)
        err = errors.get(name)
        note = "" if err is not None else "not compared (no counterpart in the candidate)"
        if cname not in (name, pairs.get(name)):
            rewired.append(f"{cname} where the reference reads {name}")
            note = f"the candidate's node reads {cname} here instead"
        inputs.append(InputError(name, "tensor", producer=producer.name if producer is not None else None, error=err,
                                 note=note))

    in_fp16 = c_types.get(c_src) in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    notes: list[str] = []
    fix: Fix
    if weights_differ:
        fix = Fix("weights", f"{node.name} ({node.op_type}) reads {', '.join(weights_differ)}, which differ between the files "
                  "(see its inputs): the candidate was not made from this reference, or a pass changed its weights. "
                  "Re-export or re-convert from the reference.", [node.name])
    elif precision != "fp32" or in_fp16:
        producers = [(r_made[i.name].name, r_made[i.name].op_type) for i in inputs if i.kind == "tensor" and i.name in r_made]
        fix = _fix_for_fp16(node.name, node.op_type, errors[o], shape, in_fp16=in_fp16, producers=producers)
    elif rewired:
        fix = Fix("graph", f"{node.name} ({node.op_type}) is wired differently in the candidate: it reads {'; '.join(rewired)}. "
                  "A graph pass inserted or replaced what feeds it; compare the nodes between them in both files.", [node.name])
    else:
        fix = Fix("graph", f"{node.name} ({node.op_type}) computes something else in the two files while its inputs agree: "
                  "compare the node's attributes, its op version and the constants it reads in both files (a graph "
                  "pass that rewrote it?).", [node.name])
    if not same_node and c_node is not None:
        notes.append(f"the candidate makes {pairs[o]} in node {c_node.name} ({c_node.op_type})")
    path, left = _bounded([errors[t] for t in ups] + [errors[o]], max_path)
    first = Divergence(node=node.name, op_type=node.op_type, error=errors[o], inputs=inputs, upstream_max_abs=upstream_max,
                       candidate_node=None if same_node or c_node is None else c_node.name)
    return _Outcome(first, path, left, len(errors), len(failing), unmatched, outputs, fix, notes)


# ---------------------------------------------------------------------------------------------------------------------
# ONNX vs PyTorch (module by module)
# ---------------------------------------------------------------------------------------------------------------------
def module_path(components: Sequence[str]) -> str:
    """The module path a node-name scope stands for: ``["downs.0", "conv_2", "conv_2.1"]`` -> ``downs.0.conv_2.1``.

    The TorchScript exporter names a container's item after the container
    (``conv_2.1`` inside ``conv_2``); the dynamo exporter's names, as
    :func:`attn_export.exporter.passes.name_nodes_by_module` writes them, add
    the item alone (``1``). Both come out the same.
    """
    parts: list[str] = []
    for c in components:
        if parts and c.startswith(parts[-1] + "."):
            parts[-1] = c
        else:
            parts.append(c)
    return ".".join(parts)


def node_scope(node: onnx.NodeProto) -> str:
    """The module path of a node named by scope (``/downs.0/attention/Attention_y`` -> ``downs.0.attention``), from
    its name or else its first output's (``/downs.0/Unsqueeze_1_output_0``); "" for the top module or no scope."""
    for name in (node.name, node.output[0] if node.output else ""):
        if name.startswith("/"):
            return module_path([c for c in name[1:].split("/")[:-1] if c])
    return ""


def _within(scope: str, module: str) -> bool:
    return module == "" or scope == module or scope.startswith(module + ".")


@dataclass
class _Call:
    """One module call seen by the hooks, with its ONNX counterparts."""

    module: str                    # module path, with "(call k)" for repeated calls
    scope: str                     # the scope its nodes carry
    start: int
    end: int = -1
    output: str | None = None      # the ONNX tensor matched to its output
    output_node: int = -1
    output_value: np.ndarray | None = None
    inputs: list[tuple[str, np.ndarray | None]] = field(default_factory=list)
    output_error: TensorError | None = None
    input_errors: list[TensorError | None] = field(default_factory=list)


class _Scopes:
    """The candidate graph seen by module scope: members, entry tensors, shape-matched outputs and call variants."""

    def __init__(self, model: onnx.ModelProto, types: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]],
                 module_names: set[str]) -> None:
        self.nodes = list(model.graph.node)
        self.types, self.shapes = types, shapes
        self.scope = [node_scope(n) for n in self.nodes]
        self.made = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.inits = {i.name for i in model.graph.initializer}
        self.module_names = module_names
        self._members: dict[str, list[int]] = {}
        # Every scope a node sits in, its enclosing ones included ("downs.0.conv_2.1" -> "downs", "downs.0", ...).
        self.present: set[str] = {""}
        for sc in set(self.scope):
            parts = sc.split(".") if sc else []
            self.present.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))

    def members(self, scope: str) -> list[int]:
        if scope not in self._members:
            self._members[scope] = [i for i, s in enumerate(self.scope) if _within(s, scope)]
        return self._members[scope]

    def variants(self, module: str) -> list[str]:
        """The scopes the calls of ``module`` left in the graph, in call order: ``m``, ``m_1``, ``m_2`` ...

        The exporter numbers only the calls whose nodes survive its common-subexpression pass (every ResBlock's
        SiLU of the same time embedding is one node), so the k-th call is not always ``m_k``; a real module
        named like a variant (``conv`` and ``conv_1``) is not one.
        """
        if not module:
            return [""]
        found = []
        for sc in self.present:
            if sc == module:
                found.append((0, sc))
            elif sc.startswith(module + "_") and sc[len(module) + 1:].isdigit() and sc not in self.module_names:
                found.append((int(sc[len(module) + 1:]), sc))
        return [sc for _, sc in sorted(found)]

    def output_for(self, scope: str, shape: tuple[int, ...]) -> tuple[str, int] | None:
        """The output of the last node of ``scope`` with a float tensor of ``shape``."""
        for i in reversed(self.members(scope)):
            for o in self.nodes[i].output:
                if o and self.types.get(o) in _FLOATS and self.shapes.get(o) == shape:
                    return o, i
        return None

    def entries(self, scope: str) -> list[str]:
        """Tensors the scope reads from outside it (graph inputs included; constants not), in order of first use."""
        inside = set(self.members(scope))
        out: dict[str, None] = {}
        for i in self.members(scope):
            for t in self.nodes[i].input:
                if not t or t in self.inits or t in out:
                    continue
                j = self.made.get(t)
                if j is None or (j not in inside and self.nodes[j].op_type != "Constant"):
                    out[t] = None
        return list(out)

    def match_inputs(self, scope: str, args: Sequence[tuple[bool, tuple[int, ...], np.ndarray]]) -> list[tuple[str, np.ndarray | None]] | None:
        """Each tensor argument paired with an entry tensor of ``scope`` of its shape and kind; None if one has none."""
        unused = self.entries(scope)
        out: list[tuple[str, np.ndarray | None]] = []
        for is_float, shape, value in args:
            match = next((e for e in unused if self.shapes.get(e) == shape and (self.types.get(e) in _FLOATS) == is_float), None)
            if match is None:
                return None
            unused.remove(match)
            out.append((match, value))
        return out


def _to_numpy(t: "torch.Tensor") -> np.ndarray:
    # A copy: a later in-place op of the forward must not change what was recorded.
    a = t.detach().cpu()
    return np.array(a.float().numpy() if a.is_floating_point() else a.numpy(), copy=True)


def _torch_calls(module: Any, feeds: Mapping[str, np.ndarray], input_names: Sequence[str],
                 scopes: _Scopes) -> tuple[list[_Call], int]:
    """Run the PyTorch model once with hooks on every module; each call matched to ONNX tensors by scope and shape.

    A call takes the first of its module's remaining scope variants whose last node makes a tensor of the
    call's output shape and whose entry tensors take its arguments' shapes (the output alone where no variant
    takes them). Returns the matched calls in the order they finished, and how many calls with a float tensor
    output found no match.
    """
    import torch

    calls: list[_Call] = []
    missed = [0]
    open_calls: dict[int, list[tuple[_Call, list[tuple[bool, tuple[int, ...], np.ndarray]]]]] = {}
    counts: dict[str, int] = {}
    next_variant: dict[str, int] = {}
    clock = [0]

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(mod: Any, args: tuple[Any, ...]) -> None:
            k = counts.get(name, 0)
            counts[name] = k + 1
            clock[0] += 1
            call = _Call(module=name if k == 0 else f"{name} (call {k + 1})", scope="", start=clock[0])
            # Copied now: the module's own forward may change its inputs in place.
            recorded = [(a.is_floating_point(), tuple(a.shape), _to_numpy(a)) for a in args if isinstance(a, torch.Tensor)] \
                if scopes.variants(name) else []
            open_calls.setdefault(id(mod), []).append((call, recorded))
        return hook

    def post_hook(name: str) -> Callable[..., None]:
        def hook(mod: Any, args: tuple[Any, ...], output: Any) -> None:
            call, recorded = open_calls[id(mod)].pop()
            clock[0] += 1
            call.end = clock[0]
            if not (isinstance(output, torch.Tensor) and output.is_floating_point()):
                return
            variants = scopes.variants(name)[next_variant.get(name, 0):]
            shape = tuple(output.shape)
            chosen: tuple[int, str, tuple[str, int], list[tuple[str, np.ndarray | None]]] | None = None
            for strict in (True, False):
                for i, v in enumerate(variants):
                    found = scopes.output_for(v, shape)
                    inputs = scopes.match_inputs(v, recorded) if found is not None else None
                    if found is not None and (inputs is not None or not strict):
                        chosen = (i, v, found, inputs or [])
                        break
                if chosen is not None:
                    break
            if chosen is None:
                missed[0] += 1
                return
            i, call.scope, (call.output, call.output_node), call.inputs = chosen
            next_variant[name] = next_variant.get(name, 0) + i + 1
            call.output_value = _to_numpy(output)
            calls.append(call)
        return hook

    handles = []
    for name, m in module.named_modules():
        handles.append(m.register_forward_pre_hook(pre_hook(name)))
        handles.append(m.register_forward_hook(post_hook(name)))
    try:
        args = [torch.as_tensor(np.asarray(feeds[n])) for n in input_names]
        with torch.no_grad():
            module(*args)
    except AttnExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own error, in one line
        from .models.loader import model_raised

        raise model_raised(exc, ", ".join(f"{n}{list(np.shape(feeds[n]))}" for n in input_names)) from None
    finally:
        for h in handles:
            h.remove()
    return calls, missed[0]


def _compare_torch(cand: onnx.ModelProto, cand_path: Path, loaded: Any, feeds: Mapping[str, np.ndarray], shape: Shape,
                   tol: Tolerances, budget: int, max_path: int, precision: str, say: Callable[[str], None]) -> _Outcome:
    from .exporter.weights import read_array

    types, shapes = _typed(cand, feeds)
    scopes = _Scopes(cand, types, shapes, {n for n, _ in loaded.module.named_modules()})
    say("running PyTorch with hooks on every module")
    torch_feeds = {t.name: np.asarray(feeds[t.name]).astype(t.dtype) for t in loaded.spec.inputs}
    calls, unmatched = _torch_calls(loaded.module, torch_feeds, [t.name for t in loaded.spec.inputs], scopes)
    if not calls:
        raise UsageError(f"no module of the PyTorch model matches a node scope of {cand_path} (node names such as "
                         "/down.1/attn/MatMul); compare with the FP32 file instead (--reference)")

    needed: dict[str, None] = {}
    for c in calls:
        needed.update({n: None for n, _ in c.inputs})
        if c.output is not None:
            needed[c.output] = None
    sizes = {n: _nbytes(n, types, shapes) for n in needed}
    groups = _groups(list(needed), sizes, budget)
    for gi, group in enumerate(groups):
        say(f"running {cand_path.name}, tensor group {gi + 1}/{len(groups)}")
        values = _run_exposed(cand, cand_path.parent, types, group, feeds, str(cand_path))
        for c in calls:
            node = scopes.nodes[c.output_node]
            if c.output in values and c.output_value is not None:
                v = values[c.output]
                c.output_error = TensorError.of(compare_arrays(c.output, c.output_value, v, tol), c.output_value,
                                                node=node.name, op_type=node.op_type, module=c.module,
                                                candidate_dtype=str(v.dtype))
                c.output_value = None
            if not c.input_errors:
                c.input_errors = [None] * len(c.inputs)
            for j, (name, ref) in enumerate(c.inputs):
                if name in values and ref is not None:
                    k = scopes.made.get(name)
                    v = values[name]
                    c.input_errors[j] = TensorError.of(compare_arrays(name, ref, v, tol), ref,
                                                       node=scopes.nodes[k].name if k is not None else None,
                                                       op_type=scopes.nodes[k].op_type if k is not None else "input",
                                                       module=c.module, candidate_dtype=str(v.dtype))
                    c.inputs[j] = (name, None)
        del values
        heap.release()

    done = [c for c in calls if c.output_error is not None]
    failing = [c for c in done if c.output_error is not None and not c.output_error.passed]
    top = next((c for c in done if c.module == ""), None)
    outputs = [top.output_error] if top is not None and top.output_error is not None else []
    chosen = next((c for c in failing if all(e is None or e.passed for e in c.input_errors)), None)
    if chosen is None:
        path, left = _bounded([c.output_error for c in done if c.output_error is not None], max_path)
        notes = ([f"{len(failing)} module output(s) diverge, but each with a diverging input: the divergence starts in "
                  "code no hooked module covers"] if failing else [])
        return _Outcome(None, path, left, len(done), len(failing), unmatched, outputs, None, notes)

    assert chosen.output_error is not None
    # Inside the chosen call, the earliest descendant whose input diverges shows where its own code goes wrong;
    # without one, the divergence is in its code after its last submodule.
    origin = chosen.output_node
    note = ""
    inner = sorted((c for c in done if chosen.start < c.start and c.end < chosen.end
                    and any(e is not None and not e.passed for e in c.input_errors)), key=lambda c: c.start)
    if inner:
        bad = next(e for e in inner[0].input_errors if e is not None and not e.passed)
        k = scopes.made.get(bad.tensor)
        if k is not None:
            origin = k
            note = (f"the divergence is in {chosen.module or 'the top module'}'s own code, outside its submodules: "
                    f"the input of {inner[0].module} made by {scopes.nodes[k].name} already diverges")
    elif any(c for c in done if chosen.start < c.start and c.end < chosen.end):
        note = f"its submodules agree: the divergence is in {chosen.module or 'the top module'}'s own code after them"
    node = scopes.nodes[origin]

    inputs = [InputError(name, "module input", producer=e.node if e is not None else None, error=e,
                         note="" if e is not None else "not compared")
              for (name, _), e in zip(chosen.inputs, chosen.input_errors)]
    # Weights are compared with the module's own parameters where the exporter kept their names.
    params = loaded.module.state_dict()
    differ: list[str] = []
    for name in node.input:
        if name in scopes.inits and name in params:
            ref = _to_numpy(params[name])
            init = next(i for i in cand.graph.initializer if i.name == name)
            value = read_array(init, cand_path.parent)
            err = TensorError.of(compare_arrays(name, ref, value, tol), ref, node=None, op_type="initializer",
                                 candidate_dtype=str(value.dtype))
            if not err.passed:
                differ.append(name)
            inputs.append(InputError(name, "initializer", error=err,
                                     note="" if err.passed else "differs from the PyTorch parameter"))
    upstream = max((e.max_abs for e in chosen.input_errors if e is not None), default=0.0)
    scope_nodes = [scopes.nodes[i] for i in scopes.members(chosen.scope)] if chosen.scope else [node]
    in_fp16 = any(types.get(o) in (TensorProto.FLOAT16, TensorProto.BFLOAT16) for o in node.output)
    fix: Fix
    if differ:
        fix = Fix("weights", f"{node.name} reads {', '.join(differ)}, which differ from the PyTorch model's parameters: "
                  "the file was exported from other weights (check --checkpoint) or a pass changed them.", [node.name])
    elif precision != "fp32" or in_fp16:
        fp16_nodes = [n.name for n in scope_nodes
                      if any(types.get(o) in (TensorProto.FLOAT16, TensorProto.BFLOAT16) for o in n.output)]
        fix = _fix_for_fp16(node.name, node.op_type, chosen.output_error, shape, in_fp16=in_fp16 or bool(fp16_nodes),
                            extra_nodes=[n for n in fp16_nodes if n != node.name],
                            producers=[(e.node, e.op_type) for e in chosen.input_errors if e is not None and e.node])
    else:
        where = node.name.rsplit("/", 1)[0] + "/" if node.name.startswith("/") else "the top level"
        fix = Fix("export", f"module {chosen.module or '(top)'} computes something else in ONNX than in PyTorch while its "
                  f"inputs agree: check the nodes in scope {where} (from {node.name}): a constant or a graph pass that "
                  "rewrote them; re-export with the same attn-export version to rule the file out.",
                  [n.name for n in scope_nodes][:MAX_FIX_NODES])
    path, left = _bounded([c.output_error for c in done if c.output_error is not None and c.end <= chosen.end], max_path)
    first = Divergence(node=node.name, op_type=node.op_type, error=chosen.output_error, inputs=inputs,
                       upstream_max_abs=upstream, module=chosen.module, note=note)
    return _Outcome(first, path, left, len(done), len(failing), unmatched, outputs, fix)


# ---------------------------------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------------------------------
def _shape_list(shapes: str | Sequence[str] | Sequence[Shape] | None) -> list[Shape] | None:
    if shapes is None or (isinstance(shapes, str) and not shapes.strip()):
        return None
    if isinstance(shapes, str) or (shapes and isinstance(next(iter(shapes)), str)):
        return parse_shapes(cast("str | Sequence[str]", shapes))
    return [cast(Shape, tuple(int(v) for v in s)) for s in shapes]


def localize(
    candidate: str | Path,
    *,
    reference: str | Path | None = None,
    reference_model: ReferenceOptions | None = None,
    shapes: str | Sequence[str] | Sequence[Shape] | None = None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    stat: str | None = None,
    quantile: float = 0.99,
    inputs: dict[str, np.ndarray] | None = None,
    input_shapes: str | Sequence[str] | None = None,
    input_ranges: dict[str, tuple[float, float]] | None = None,
    max_memory: int | None = None,
    max_path: int = DEFAULT_MAX_PATH,
    progress: ProgressFn | None = None,
) -> LocalizeReport:
    """Find the first node where the ONNX file ``candidate`` diverges from its reference, and what to try.

    ``reference``: an ONNX file to compare with node by node (the FP32 file an
    FP16 file was made from; required for files this tool did not export);
    without it the PyTorch model the candidate describes is rebuilt
    (``reference_model``: the user's choices about it, as for verify) and
    compared module by module. ``atol``/``rtol``/``stat``/``quantile``:
    verify's rule, defaults by the candidate's precision
    (:func:`attn_export.compare.resolve_tolerances`), applied to every
    intermediate tensor.

    Inputs: ``inputs`` (name -> array, e.g. from :func:`load_inputs`), or
    seeded ones at each of ``shapes`` (BxHxW; shape i uses ``seed + i``;
    default: FP16 check's two quick shapes) or ``input_shapes`` (Polygraphy
    style, files from elsewhere); ``input_ranges`` per input name. Shapes are
    tried in order until one diverges. ``max_memory``: bytes a shape may need
    (None: this machine's memory, 0: no limit).

    Returns a :class:`LocalizeReport`; ``report.first`` is None when nothing
    diverges. Raises UsageError (exit 2) for bad input, an engine among them
    (its intermediate tensors are not there to compare), CheckpointError as
    verify does.
    """
    t_start = time.perf_counter()
    path = Path(candidate)
    if not path.is_file():
        raise UsageError(f"artifact not found: {path}")
    ref_path = Path(reference) if reference is not None else None
    if ref_path is not None:
        if not ref_path.is_file():
            raise UsageError(f"reference ONNX file not found: {ref_path}")
        if _is_engine(ref_path):
            raise UsageError(f"--reference must be an ONNX file; {ref_path.name} is an engine")
    options = reference_model or ReferenceOptions()
    if ref_path is not None and options.names_model:
        raise UsageError("--reference replaces the PyTorch model; drop --preset/--config/--model/--checkpoint")

    from .exporter.foreign import is_foreign, resolve_shapes, spec_of
    from .exporter.fp16 import default_check_shapes
    from .exporter.metadata import load_onnx

    sidecar: dict[str, Any] | None = None
    if _is_engine(path):
        from .engines.sidecar import sidecar_profiles, sidecar_spec

        sidecar = engine_source(path, ref_path)
        assert ref_path is not None
        # The engine's graph is the file it was built from: the candidate's tensors are that file's, read back.
        cand = load_onnx(ref_path, load_external_data=False)
        spec = sidecar_spec(sidecar)
        precision = str(sidecar.get("precision") or spec.precision)
    else:
        cand = load_onnx(path, load_external_data=False)
        spec = spec_of(cand, origin=str(path), input_ranges=input_ranges)
        precision = spec.precision
    if ref_path is None and is_foreign(spec):
        raise UsageError(f"{path} has no attn-export description, so there is no PyTorch model to compare it with; "
                         "pass --reference model.onnx (for example the FP32 file it was made from)")
    tol = resolve_tolerances(precision, atol=atol, rtol=rtol, stat=stat, quantile=quantile)

    runs: list[tuple[Shape, dict[str, np.ndarray]]]
    if inputs is not None:
        if shapes is not None or input_shapes:
            raise UsageError("give the inputs or the shapes to make them at, not both")
        runs = [check_inputs(inputs, spec, "inputs")]
        input_source, used_seed = "given", None
    else:
        sweep = resolve_shapes(spec, _shape_list(shapes), input_shapes, what="localize", option="--shapes")
        sweep = sweep or default_check_shapes(spec)
        if not sweep:
            raise UsageError("no shape to run at; pass --shapes")
        if sidecar is not None and not shapes and not input_shapes:
            from .engines.profiles import find_profile

            inside = [s for s in sweep if find_profile(sidecar_profiles(sidecar), *s) is not None]
            sweep = inside or [cast(Shape, tuple(p.opt)) for p in sidecar_profiles(sidecar)][:1]
        for s in sweep:
            try:
                spec.check_shape(*s)
            except ShapeError as exc:
                raise ShapeError(f"shape {format_shape(s)} cannot be served: {exc}") from None
        runs = [(s, spec.make_inputs(*s, seed=seed + i)) for i, s in enumerate(sweep)]
        input_source, used_seed = "seeded", seed
    from .graph.memory import check_shapes_fit

    check_shapes_fit(cand, spec, [s for s, _ in runs], max_memory)

    from .exporter.audit import memory_budget_for

    budget = memory_budget_for(cand)
    total = len(runs) + 1
    step = 0

    def say(text: str) -> None:
        if progress:
            progress(f"localize: {text}", step, total)

    outcome: _Outcome | None = None
    loaded: Any = None
    ref_model: onnx.ModelProto | None = None
    if sidecar is not None:
        ref_desc = f"{ref_path} (ONNX Runtime, CPU)"
    elif ref_path is not None:
        say(f"loading {ref_path.name}")
        ref_model = load_onnx(ref_path, load_external_data=False)
        ref_desc = str(ref_path)
    else:
        from .models.loader import check_reference_fits, load_model, source_from_spec

        say("building the PyTorch reference")
        loaded = load_model(source_from_spec(spec, options), attention_impl="reference")
        check_reference_fits(spec, loaded.spec)
        ref_desc = "pytorch (cpu)"
    tried: list[Shape] = []
    shape: Shape = runs[0][0]
    feeds: dict[str, np.ndarray] = runs[0][1]
    for i, (shape, feeds) in enumerate(runs):
        step = i + 1
        tried.append(shape)
        say(f"comparing at {format_shape(shape)}")
        if sidecar is not None and ref_path is not None:
            def marked(names: Sequence[str], engine_sidecar: dict[str, Any] = sidecar,
                       run_feeds: dict[str, np.ndarray] = feeds) -> dict[str, np.ndarray]:
                assert ref_path is not None
                return _marked_engine_values(path, ref_path, engine_sidecar, names, run_feeds, say)

            outcome = _compare_files(cand, path, cand, ref_path, feeds, shape, tol, budget, max_path, precision, say,
                                     marked)
            outcome.notes.append(f"{path.name} was built again from {ref_path.name} with its intermediate tensors "
                                 "marked as outputs: that engine fuses less than the shipped one (a fused attention "
                                 "site runs as separate layers there)")
        elif ref_model is not None and ref_path is not None:
            outcome = _compare_files(cand, path, ref_model, ref_path, feeds, shape, tol, budget, max_path,
                                     spec.precision, say)
        else:
            outcome = _compare_torch(cand, path, loaded, feeds, shape, tol, budget, max_path, spec.precision, say)
        if outcome.first is not None:
            break
    assert outcome is not None
    del loaded
    heap.release()
    if progress:
        progress("localize: done", total, total)
    return LocalizeReport(
        candidate=str(path), reference=ref_desc,
        mode="engine" if sidecar is not None else "onnx" if ref_path is not None else "pytorch", precision=precision,
        tolerances=tol, shape=shape, shapes_tried=tried, input_source=input_source,
        seed=used_seed + len(tried) - 1 if used_seed is not None else None, inputs=describe_inputs(feeds),
        first=outcome.first, path=outcome.path, path_left_out=outcome.path_left_out, compared=outcome.compared,
        diverging=outcome.diverging, unmatched=outcome.unmatched, outputs=outcome.outputs, fix=outcome.fix,
        notes=outcome.notes, seconds=time.perf_counter() - t_start, feeds=dict(feeds),
    )


__all__ = [
    "TensorError", "InputError", "Divergence", "Fix", "LocalizeReport", "localize", "save_inputs", "load_inputs",
    "check_inputs", "describe_inputs", "module_path", "node_scope",
]
