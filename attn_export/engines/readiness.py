"""Will this ONNX build into a TensorRT engine with fused attention? Checked without TensorRT.

:func:`check_trt_readiness` reads the graph and reports findings at three
levels: ``error`` (the parser or builder will refuse it), ``warning`` (it
builds, but attention will not fuse or FP16 may misbehave) and ``ok``.
:func:`attention_blocks` lists the attention blocks of a model; the fusion
report and ``attn-export inspect`` use it too.

The operator table is the ONNX-TensorRT parser's: ``docs/operators.md`` at
tag ``release/10.1-GA`` (operators marked "Y"), plus the additions listed in
the parser's CHANGELOG up to 10.15 (window functions 10.4, STFT 10.5,
Attention 10.14, RotaryEmbedding / RMSNormalization / TensorScatter 10.15).
It is a static table: a newer parser may accept more.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import onnx
from onnx import helper

from ..errors import UsageError
from ..exporter.passes import GraphIndex, node_attr
from ..spec import METADATA_KEY, ModelSpec
from .profiles import FP16_MAX_KEYS, Profile, attention_levels, validate_profiles

# onnx-tensorrt docs/operators.md @ release/10.1-GA, rows marked "Y".
_OPS_10_1 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# (version, ops added) from onnx-tensorrt CHANGELOG.md.
_OPS_ADDED: list[tuple[tuple[int, int], frozenset[str]]] = [
    ((10, 4), frozenset({"BlackmanWindow", "HammingWindow", "HannWindow"})),
    ((10, 5), frozenset({"STFT"})),
    ((10, 14), frozenset({"Attention"})),
    ((10, 15), frozenset({"RotaryEmbedding", "RMSNormalization", "TensorScatter"})),
]

MIN_TARGET = (10, 12)  # the oldest TensorRT attn-export builds for (strong typing, progress monitor)
ATTENTION_OP_SINCE = (10, 14)
HEAD_SIZE_MIN, HEAD_SIZE_MAX, HEAD_SIZE_ALIGN = 16, 256, 8
NORM_OPS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "BatchNormalization",
            "RMSNormalization")
HALF_TYPES = ("float16", "bfloat16")


def parse_target(target: str | Sequence[int]) -> tuple[int, int]:
    """'10.14' / '10.14.1' / '11' -> (major, minor); UsageError for anything else."""
    if not isinstance(target, str):
        parts = list(target)
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    m = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?(?:\.\d+)*\s*", target)
    if not m:
        raise UsageError(f"bad TensorRT version {target!r}: expected MAJOR.MINOR such as 10.14 or 11.0")
    return int(m.group(1)), int(m.group(2) or 0)


def supported_ops(target: str | Sequence[int]) -> frozenset[str]:
    """ONNX operators (default domain) the TensorRT ONNX parser of ``target`` imports."""
    version = parse_target(target)
    ops = set(_OPS_10_1)
    for since, added in _OPS_ADDED:
        if version >= since:
            ops |= added
    return frozenset(ops)


def op_since(op: str) -> tuple[int, int] | None:
    """The first TensorRT version (after 10.1) whose parser imports ``op``, if it was added later."""
    for since, added in _OPS_ADDED:
        if op in added:
            return since
    return None


# --------------------------------------------------------------------------- findings
@dataclass
class Finding:
    """One readiness result."""

    level: str          # "error" | "warning" | "ok"
    code: str           # stable short id, e.g. "unsupported-op", "head-size"
    message: str
    node: str | None = None

    def __str__(self) -> str:
        where = f" [{self.node}]" if self.node else ""
        return f"{self.level}: {self.code}{where}: {self.message}"


@dataclass
class AttentionInfo:
    """One attention block as found in the ONNX graph.

    ``name`` is the module-path prefix ("/downs.1/attention"); ``form`` is
    "op" (one ONNX Attention node) or "decomposed" (MatMul/Softmax/MatMul);
    ``head_size`` the last dim of Q (= C, single head) or None if unknown;
    ``seq_len`` the query/key count of Q: an int for static inputs, else an
    expression in the input dims such as "(height/2)*(width/2)" (or None);
    ``level`` the matching resolution level; ``dtype`` the numpy name of Q's element
    type; ``scale_before_product`` False when a Mul/Div sits between the
    first MatMul and the Softmax (TensorRT will not fuse that);
    ``nodes`` the node names that make up the block.
    """

    name: str
    form: str
    head_size: int | None
    seq_len: int | str | None
    dtype: str | None
    scale_before_product: bool = True
    nodes: list[str] = field(default_factory=list)
    q: str | None = None
    level: int | None = None  # resolution level: seq_len = (H/2**level)*(W/2**level)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReadinessReport:
    """The result of :func:`check_trt_readiness`."""

    target: str
    findings: list[Finding]
    attention: list[AttentionInfo]
    spec: ModelSpec | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        """True when nothing would stop the build (warnings allowed)."""
        return not self.errors

    def codes(self, level: str | None = None) -> list[str]:
        return [f.code for f in self.findings if level is None or f.level == level]

    def raise_for_errors(self) -> None:
        """UsageError with the first error (and how many more) if the build would fail."""
        errs = self.errors
        if errs:
            more = f" (and {len(errs) - 1} more problem(s); run `attn-export inspect --trt` for all)" if len(errs) > 1 else ""
            raise UsageError(f"not ready for TensorRT {self.target}: {errs[0].message}{more}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "ok": self.ok,
            "findings": [asdict(f) for f in self.findings],
            "attention": [a.to_dict() for a in self.attention],
        }


# --------------------------------------------------------------------------- graph helpers
def _load(model_or_path: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    from ..exporter.metadata import load_onnx

    # Weights are not needed for any check here; skip external data.
    return load_onnx(model_or_path, load_external_data=False)


def _spec_of(model: onnx.ModelProto) -> ModelSpec | None:
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            try:
                return ModelSpec.from_json(p.value)
            except (ValueError, TypeError, KeyError):
                return None
    return None


class _Index(GraphIndex):
    """Producers, consumers, tensor types and shapes of a (shape-inferred) graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        try:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001 - inference is best effort; types stay partly unknown
            pass
        super().__init__(model.graph)
        g = model.graph
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list[int | str | None]] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
                ]
        for name, init in self.inits.items():
            self.types[name] = init.data_type
            self.shapes[name] = list(init.dims)

    def dtype(self, name: str) -> str | None:
        t = self.types.get(name)
        if not t:
            return None
        try:
            return helper.tensor_dtype_to_np_dtype(t).name
        except Exception:  # noqa: BLE001 - e.g. bfloat16 without an exact numpy type
            return onnx.TensorProto.DataType.Name(t).lower()

    def through_casts(self, name: str) -> str:
        """Walk back over Cast/Identity nodes, which do not change the pattern."""
        seen = 0
        while seen < 8:
            node = self.producer.get(name)
            if node is None or node.op_type not in ("Cast", "Identity"):
                return name
            name = node.input[0]
            seen += 1
        return name


_attr = node_attr


def _prefix(node_name: str) -> str:
    return node_name.rsplit("/", 1)[0] if "/" in node_name else node_name


def _seq_len(shape: list[int | str | None] | None) -> int | str | None:
    if not shape or len(shape) < 2:
        return None
    return shape[-2]


def _head_size(shape: list[int | str | None] | None) -> int | None:
    if not shape:
        return None
    last = shape[-1]
    return int(last) if isinstance(last, int) and last > 0 else None


def attention_blocks(model: onnx.ModelProto | str | Path) -> list[AttentionInfo]:
    """The attention blocks of an ONNX model, in graph order.

    Finds ONNX ``Attention`` nodes (form "op") and ``MatMul -> [Mul|Div] ->
    Softmax(-1) -> MatMul`` chains (form "decomposed"; Cast nodes in between
    are skipped). Head size and dtype come from ONNX shape inference on Q;
    seq_len is Q's second-to-last dim as inferred (a number, a symbolic
    expression, or None when inference could not tell). Public: used by the
    fusion report and by ``attn-export inspect``.
    """
    m = _load(model)
    idx = _Index(m)
    blocks: list[AttentionInfo] = []
    for node in idx.graph.node:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            q = node.input[0]
            blocks.append(AttentionInfo(
                name=_prefix(node.name), form="op", head_size=_head_size(idx.shapes.get(q)),
                seq_len=_seq_len(idx.shapes.get(q)), dtype=idx.dtype(q), scale_before_product=True,
                nodes=[node.name], q=q,
            ))
        elif node.op_type == "Softmax" and _attr(node, "axis", -1) in (-1, 3):
            info = _match_chain(idx, node)
            if info is not None:
                blocks.append(info)
    if any(not isinstance(b.seq_len, int) for b in blocks):
        _probe_seq_lens(m, blocks)
    return blocks


def _probe_seq_lens(model: onnx.ModelProto, blocks: list[AttentionInfo]) -> None:
    """Express each block's sequence length in height/width.

    Symbolic inference loses the expression (it names the dim 'unk__N'), so
    infer once more on a weightless copy with concrete inputs (batch 1,
    H = 2P, W = P) and solve seq = H*W / 4**level.
    """
    spec = _spec_of(model)
    p = max(64, 4 * (spec.hw_multiple if spec else 1))
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for init in light.graph.initializer:
        # Float weights are not needed for shapes; dropping them keeps the copy small.
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) \
                and (len(init.raw_data) > 64 or len(init.float_data) > 16):
            init.ClearField("raw_data")
            init.ClearField("float_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            entry = init.external_data.add()
            entry.key, entry.value = "location", "weights-not-loaded"
    sizes = {"batch": 1, "height": 2 * p, "width": p}
    for vi in light.graph.input:
        dims = vi.type.tensor_type.shape.dim
        for k, d in enumerate(dims):
            if d.dim_param in sizes:
                d.dim_value = sizes[d.dim_param]
            elif not d.HasField("dim_value") and len(dims) == 4:
                d.dim_value = (1, 0, 2 * p, p)[k] or 1
    del light.graph.value_info[:]
    try:
        idx = _Index(light)
    except Exception:  # noqa: BLE001 - best effort: keep the symbolic names
        return
    for b in blocks:
        seq = _seq_len(idx.shapes.get(b.q or ""))
        if not isinstance(seq, int) or seq <= 0 or (2 * p * p) % seq:
            continue
        factor = (2 * p * p) // seq
        level = (factor.bit_length() - 1) // 2
        if 4 ** level == factor:
            b.level = level
            b.seq_len = "height*width" if level == 0 else f"(height/{2 ** level})*(width/{2 ** level})"
        else:
            b.seq_len = f"height*width/{factor}"


def _match_chain(idx: _Index, softmax: onnx.NodeProto) -> AttentionInfo | None:
    """Match MatMul(q, kT) -> [Mul/Div by a scalar] -> Softmax -> MatMul(., v)."""
    nodes = [softmax]
    logits = idx.through_casts(softmax.input[0])
    post = idx.producer.get(logits)
    scale_before = True
    if post is not None and post.op_type in ("Mul", "Div"):
        # A scale applied to the product: TensorRT's MHA matcher wants it on Q/K instead.
        other = [i for i in post.input if idx.scalar(i) is not None]
        if other:
            scale_before = False
            nodes.append(post)
            rest = [i for i in post.input if i not in other]
            logits = idx.through_casts(rest[0]) if rest else logits
    mm1 = idx.producer.get(logits)
    if mm1 is None or mm1.op_type != "MatMul":
        return None
    users = [u for u in idx.consumers.get(softmax.output[0], [])]
    mm2 = None
    for u in users:
        if u.op_type == "Cast":
            users.extend(idx.consumers.get(u.output[0], []))
        elif u.op_type == "MatMul":
            mm2 = u
    if mm2 is None:
        return None
    q = mm1.input[0]
    nodes = [mm1] + nodes[::-1] + [mm2]
    return AttentionInfo(
        name=_prefix(mm1.name), form="decomposed", head_size=_head_size(idx.shapes.get(q)),
        seq_len=_seq_len(idx.shapes.get(q)), dtype=idx.dtype(q), scale_before_product=scale_before,
        nodes=[n.name for n in nodes], q=q,
    )


# --------------------------------------------------------------------------- the check
def head_size_fusable(head_size: int | None) -> bool | None:
    """FP16/BF16 fused MHA window: 16 <= H <= 256 and H % 8 == 0 (None if unknown)."""
    if head_size is None:
        return None
    return HEAD_SIZE_MIN <= head_size <= HEAD_SIZE_MAX and head_size % HEAD_SIZE_ALIGN == 0


def check_trt_readiness(
    onnx_path_or_model: onnx.ModelProto | str | Path,
    target: str = "10.14",
    profiles: Sequence[Profile] | None = None,
    *,
    fp16: bool | None = None,
) -> ReadinessReport:
    """Check an ONNX model against the TensorRT ``target`` version without TensorRT.

    ``profiles`` (optional) are validated against the model's ModelSpec
    (read from the ONNX metadata). ``fp16=True`` says an FP16 engine is
    wanted: a pure-FP32 model then gets a warning (strongly typed builds
    keep the ONNX's types). Returns a :class:`ReadinessReport`; call
    ``report.raise_for_errors()`` to turn errors into a UsageError.
    """
    model = _load(onnx_path_or_model)
    version = parse_target(target)
    target_s = f"{version[0]}.{version[1]}"
    findings: list[Finding] = []
    add = lambda level, code, msg, node=None: findings.append(Finding(level, code, msg, node))  # noqa: E731
    spec = _spec_of(model)

    if version < MIN_TARGET:
        add("error", "target", f"TensorRT {target_s} is older than {MIN_TARGET[0]}.{MIN_TARGET[1]}, the oldest attn-export builds for")

    # 1. operators
    ops = supported_ops(version)
    n_bad = 0
    for node in model.graph.node:
        name = node.name or f"<{node.op_type} #{list(model.graph.node).index(node)}>"
        if node.domain not in ("", "ai.onnx"):
            n_bad += 1
            add("error", "custom-op", f"{node.domain}::{node.op_type} is not a standard ONNX op; TensorRT needs a plugin for it", name)
        elif node.op_type not in ops:
            n_bad += 1
            since = op_since(node.op_type)
            hint = f" (supported from TensorRT {since[0]}.{since[1]})" if since else ""
            add("error", "unsupported-op", f"{node.op_type} is not supported by the TensorRT {target_s} ONNX parser{hint}", name)
    if not n_bad:
        add("ok", "ops", f"all {len(model.graph.node)} nodes use operators the TensorRT {target_s} parser imports")

    # 2. attention blocks
    blocks = attention_blocks(model)
    if not blocks:
        add("warning", "no-attention", "no attention block found (neither an Attention node nor a MatMul/Softmax/MatMul chain)")
    model_fp16 = (spec is not None and spec.precision in ("fp16", "mixed")) or any(
        i.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) for i in model.graph.initializer
    )
    for b in blocks:
        problems = 0
        if b.form == "op" and version < ATTENTION_OP_SINCE:
            # Already an unsupported-op error; this line says what to do about it.
            problems += 1
            add("error", "attention-op-version",
                f"the ONNX Attention op needs TensorRT 10.14 or later (target {target_s}); "
                "export with --attention decomposed or target a newer TensorRT", b.name)
        if b.form == "decomposed" and not b.scale_before_product:
            problems += 1
            add("warning", "attention-scale",
                "will not fuse: the softmax scale is applied after Q·Kᵀ; TensorRT needs it on Q (or √scale on Q and K) "
                "before the first MatMul", b.name)
        fits = head_size_fusable(b.head_size)
        if fits is False:
            problems += 1
            add("warning", "head-size",
                f"will not fuse: head size {b.head_size} is outside TensorRT's fused-attention window "
                f"({HEAD_SIZE_MIN}..{HEAD_SIZE_MAX}, multiple of {HEAD_SIZE_ALIGN}); attention runs as separate GEMMs", b.name)
        elif fits is None:
            add("warning", "head-size-unknown", "head size could not be inferred; fusion cannot be predicted", b.name)
        if model_fp16 and b.dtype is not None and b.dtype not in HALF_TYPES:
            problems += 1
            add("warning", "attention-dtype",
                f"will not fuse: attention inputs are {b.dtype} in an FP16 model; fused kernels need FP16/BF16 Q/K/V", b.name)
        elif not model_fp16 and b.dtype == "float32":
            problems += 1
            add("warning", "attention-fp32",
                "will not fuse: attention runs in FP32 (strongly typed builds keep ONNX types); export the FP16 variant", b.name)
        if not problems:
            add("ok", "attention", f"{b.form} attention, head size {b.head_size}, {b.dtype}: in a fusable form", b.name)

    # 3. dynamic dims on batch/height/width
    inputs = [i for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    image = next((i for i in inputs if len(i.type.tensor_type.shape.dim) == 4), None)
    if image is None:
        add("error", "inputs", "no 4-D (B, C, H, W) input found")
    else:
        dims = image.type.tensor_type.shape.dim
        for axis, k in (("batch", 0), ("height", 2), ("width", 3)):
            d = dims[k]
            if d.HasField("dim_value"):
                add("warning", "static-dim",
                    f"input {image.name} has a fixed {axis} of {d.dim_value}; the engine will serve only that size", image.name)
            elif not d.dim_param:
                add("warning", "unnamed-dim", f"input {image.name} has an unnamed dynamic {axis} dim", image.name)

    # 4. profiles
    if profiles:
        if spec is None:
            add("warning", "no-spec", "the ONNX carries no attn-export description; profiles checked only loosely")
        else:
            try:
                for w in validate_profiles(profiles, spec):
                    add("warning", "fp16-key-count", w)
                if attention_levels(spec) is None:
                    # No UNet config in the spec: use the levels read off the graph instead.
                    for i, p in enumerate(profiles):
                        for b in blocks:
                            if b.level is not None:
                                keys = (p.max[1] >> b.level) * (p.max[2] >> b.level)
                                if keys > FP16_MAX_KEYS:
                                    add("warning", "fp16-key-count",
                                        f"profile {i} max: {p.max[1]}x{p.max[2]} gives {keys} attention keys "
                                        f"(over {FP16_MAX_KEYS}; fused FP16 attention has produced NaN there)", b.name)
                add("ok", "profiles", f"{len(profiles)} profile(s) fit this model")
            except UsageError as exc:
                add("error", "profile", str(exc))

    # 5. FP16 placement
    if fp16 and not model_fp16:
        add("warning", "fp32-model",
            "an FP16 engine was asked for but the model is pure FP32; strongly typed TensorRT keeps FP32 "
            "(export the FP16 variant)")
    if model_fp16:
        idx = _Index(model)
        for node in model.graph.node:
            if node.op_type in NORM_OPS and node.input:
                dt = idx.dtype(node.input[0])
                if dt in HALF_TYPES:
                    add("warning", "norm-fp16",
                        f"{node.op_type} runs in {dt}; keep normalization in FP32 (FP16 GroupNorm has overflowed in UNets)",
                        node.name)

    return ReadinessReport(target=target_s, findings=findings, attention=blocks, spec=spec)


def iter_messages(report: ReadinessReport, levels: Iterable[str] = ("error", "warning")) -> list[str]:
    """Findings of the given levels as one-line strings."""
    wanted = set(levels)
    return [str(f) for f in report.findings if f.level in wanted]
