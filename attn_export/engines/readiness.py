"""Will this ONNX build into a TensorRT engine with fused attention? Checked without TensorRT.

:func:`check_trt_readiness` reads the graph and reports findings at three
levels: ``error`` (the parser or builder will refuse it), ``warning`` (it
builds, but attention will not fuse or FP16 may misbehave) and ``ok``.
Attention sites come from :func:`attn_export.graph.find_attention`, the
analysis that export, FP16, ``inspect`` and the fusion report share, so every
command counts the same sites.

The operator table is the ONNX-TensorRT parser's: ``docs/operators.md`` at
tag ``release/10.1-GA`` (operators marked "Y"), plus the additions listed in
the parser's CHANGELOG up to 10.15 (window functions 10.4, STFT 10.5,
Attention 10.14, RotaryEmbedding / RMSNormalization / TensorScatter 10.15).
It is a static table: a newer parser may accept more.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import onnx

from ..errors import UsageError
from ..graph import AttentionSite, TypedIndex, find_attention
from ..graph.attention import HEAD_SIZE_ALIGN, HEAD_SIZE_MAX, HEAD_SIZE_MIN, head_size_fusable
from ..spec import ModelSpec
from .profiles import FP16_MAX_KEYS, Profile, attention_levels, validate_profiles

# Findings that mean an attention site will not be fused.
WILL_NOT_FUSE = frozenset({"attention-form", "attention-scale", "head-size", "head-size-unknown", "attention-dtype",
                           "attention-fp32", "batch-one", "attention-mask"})
# TensorRT-RTX is checked as the newest TensorRT whose ONNX parser this table covers (its parser imports Attention).
RTX_TARGET = "rtx"

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
MAX_TARGET = (11, 4)   # the newest TensorRT whose Python API the conformance check (tests/trt_api) covers
# Every TensorRT release from MIN_TARGET to MAX_TARGET: the supported range, and `--target`'s choices.
SUPPORTED_TARGETS = tuple(f"10.{m}" for m in range(12, 17)) + tuple(f"11.{m}" for m in range(0, MAX_TARGET[1] + 1))
ATTENTION_OP_SINCE = (10, 14)
NORM_OPS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "BatchNormalization",
            "RMSNormalization")
HALF_TYPES = ("float16", "bfloat16")


def parse_target(target: str | Sequence[int]) -> tuple[int, int]:
    """'10.14' / '10.14.1' / '11' -> (major, minor); "rtx" -> the newest TensorRT covered; UsageError otherwise."""
    if isinstance(target, str) and target.strip().lower() == RTX_TARGET:
        return MAX_TARGET
    if not isinstance(target, str):
        parts = list(target)
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    m = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?(?:\.\d+)*\s*", target)
    if not m:
        raise UsageError(f"bad TensorRT version {target!r}: expected MAJOR.MINOR such as 10.14 or 11.0")
    return int(m.group(1)), int(m.group(2) or 0)


def supported_range() -> str:
    """'10.12-10.16, 11.0-11.4': the supported TensorRT releases, for messages and help texts."""
    tens = [t for t in SUPPORTED_TARGETS if t.startswith("10.")]
    elevens = [t for t in SUPPORTED_TARGETS if t.startswith("11.")]
    return f"{tens[0]}-{tens[-1]}, {elevens[0]}-{elevens[-1]}"


def check_target(target: str) -> tuple[int, int]:
    """parse_target, then UsageError unless the release is one of SUPPORTED_TARGETS (`--target`'s choices) or "rtx"."""
    version = parse_target(target)
    if target.strip().lower() == RTX_TARGET:
        return version
    if f"{version[0]}.{version[1]}" not in SUPPORTED_TARGETS:
        raise UsageError(f"TensorRT {version[0]}.{version[1]} is not a supported target; use one of {supported_range()}")
    return version


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
class ReadinessReport:
    """The result of :func:`check_trt_readiness`."""

    target: str
    findings: list[Finding]
    attention: list[AttentionSite]
    spec: ModelSpec | None = None

    @property
    def target_label(self) -> str:
        """'TensorRT 10.14' or 'TensorRT-RTX'."""
        return self.target if self.target == "TensorRT-RTX" else f"TensorRT {self.target}"

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

    @property
    def unfused(self) -> list[Finding]:
        """Warnings that some attention site will not be fused."""
        return [f for f in self.findings if f.level == "warning" and f.code in WILL_NOT_FUSE]

    @property
    def verdict(self) -> str:
        """One line: "ready" only when nothing stops the build and every attention site will fuse."""
        if self.errors:
            return f"not ready: {len(self.errors)} error(s)"
        unfused = {f.node for f in self.unfused}
        if not self.attention:
            return "builds, but no attention site was found (nothing to fuse)"
        if unfused:
            if all(f.code == "attention-fp32" for f in self.unfused):
                return (f"builds, but attention will not fuse until FP16: all {len(self.attention)} site(s) run in FP32 "
                        "(convert with `attn-export fp16`, or build with `attn-export trt --fp16`)")
            return f"builds, but {len(unfused)} of {len(self.attention)} attention site(s) will not fuse"
        return "ready"

    def codes(self, level: str | None = None) -> list[str]:
        return [f.code for f in self.findings if level is None or f.level == level]

    def raise_for_errors(self) -> None:
        """UsageError with the first error (and how many more) if the build would fail."""
        errs = self.errors
        if errs:
            more = f" (and {len(errs) - 1} more problem(s); run `attn-export inspect --trt` for all)" if len(errs) > 1 else ""
            where = f" (node {errs[0].node})" if errs[0].node else ""
            raise UsageError(f"not ready for {self.target_label}: {errs[0].message}{where}{more}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "ok": self.ok,
            "findings": [asdict(f) for f in self.findings],
            "attention": [a.to_dict() for a in self.attention],
            "verdict": self.verdict,
        }


# --------------------------------------------------------------------------- graph helpers
def _load(model_or_path: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    from ..exporter.metadata import load_onnx

    # Weights are not needed for any check here; skip external data.
    return load_onnx(model_or_path, load_external_data=False)


def attention_blocks(model: onnx.ModelProto | str | Path) -> list[AttentionSite]:
    """The attention sites of an ONNX model or file, from the one attention analysis."""
    return find_attention(_load(model))


# --------------------------------------------------------------------------- the check
def model_is_fp16(model: onnx.ModelProto, spec: ModelSpec | None = None) -> bool:
    """True for FP16/mixed models (by their description, or FP16/BF16 weights)."""
    return (spec is not None and spec.precision in ("fp16", "mixed")) or any(
        i.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) for i in model.graph.initializer
    )


def site_findings(b: AttentionSite, *, model_fp16: bool, version: tuple[int, int] | None = None,
                  batch_one: list[str] | None = None, rtx: bool = False) -> list[tuple[str, str, str]]:
    """(level, code, message) for one attention site: will TensorRT fuse it, and if not, why.

    ``batch_one``: the profiles (their indices, or ["*"] for all) whose max
    batch is 1; TensorRT-RTX 1.7 fuses no single-head site in those.
    ``rtx``: the target is TensorRT-RTX (masked sites fuse in either form).
    """
    out: list[tuple[str, str, str]] = []
    if b.mask is not None and b.problem is None and not (b.form == "op" and version is not None
                                                         and version < ATTENTION_OP_SINCE):
        out.append(_mask_finding(b, version, rtx))
    if b.form == "op" and version is not None and version < ATTENTION_OP_SINCE:
        # Already an unsupported-op error; this line says what to do about it.
        out.append(("error", "attention-op-version",
                    f"the ONNX Attention op needs TensorRT 10.14 or later (target {version[0]}.{version[1]}); "
                    "export with --attention decomposed or target a newer TensorRT"))
    if b.problem is not None:
        out.append(("warning", "attention-form", f"will not fuse: {b.problem}"))
    elif b.form != "op" and not b.scale_before_product:
        out.append(("warning", "attention-scale",
                    "will not fuse: the softmax scale is applied after Q·Kᵀ; TensorRT needs it on Q (or √scale on Q and K) "
                    "before the first MatMul; rewrite it with `attn-export optimize` (or export again with `attn-export onnx`)"))
    elif b.form != "op" and not b.canonical:
        layout = ", with layout changes" if (b.q and b.q.perm) or b.out_perm else ""
        out.append(("warning", "attention-form",
                    f"will not fuse reliably: {b.form_description} with the scale on {b.scale_placement}{layout}; "
                    "TensorRT fuses the Attention op or Mul(q, scale) → MatMul → Softmax → MatMul; rewrite it with "
                    "`attn-export optimize` (or export again with `attn-export onnx`)"))
    fits = head_size_fusable(b.head_size)
    if fits is False:
        out.append(("warning", "head-size",
                    f"will not fuse: head size {b.head_size} is outside TensorRT's fused-attention window "
                    f"({HEAD_SIZE_MIN}..{HEAD_SIZE_MAX}, multiple of {HEAD_SIZE_ALIGN}); attention runs as separate GEMMs"))
    elif fits is None and b.problem is None:
        out.append(("warning", "head-size-unknown", "head size could not be inferred; fusion cannot be predicted"))
    if model_fp16 and b.dtype is not None and b.dtype not in HALF_TYPES:
        out.append(("warning", "attention-dtype",
                    f"will not fuse: attention inputs are {b.dtype} in an FP16 model; fused kernels need FP16/BF16 Q/K/V"))
    elif not model_fp16 and b.dtype == "float32":
        out.append(("warning", "attention-fp32",
                    "will not fuse: attention runs in FP32 (strongly typed builds keep ONNX types) and no fused kernel takes FP32; "
                    "convert it with `attn-export fp16` or build with `attn-export trt --fp16`"))
    if batch_one and (b.heads or 1) == 1 and not any(code in WILL_NOT_FUSE for _, code, _ in out):
        which = "" if batch_one == ["*"] else f" in profile {', '.join(batch_one)}"
        out.append(("warning", "batch-one",
                    f"will not fuse{which}: one attention head at batch 1 (a profile whose max batch is 1) has no fused kernel; "
                    "TensorRT-RTX 1.7 builds it as separate kernels; allow batch 2 or more in the profile to fuse it"))
    if b.form == "op" and any(code in WILL_NOT_FUSE for _, code, _ in out):
        out.append(("ok", "attention-decomposable",
                    "no fused kernel for this Attention node: `attn-export trt` marks it decomposable so the build runs it "
                    "as separate kernels (a builder that does not, such as trtexec, stops with 'Attention operation was not "
                    "supported by a dedicated kernel')"))
    if not out:
        out.append(("ok", "attention", f"{b.form} attention, head size {b.head_size}, {b.dtype}: in a fusable form"))
    return out


def _mask_finding(b: AttentionSite, version: tuple[int, int] | None, rtx: bool) -> tuple[str, str, str]:
    """Whether a masked site fuses on the target: measured with TensorRT-RTX's builder, documented for TensorRT."""
    assert b.mask is not None
    what = f"masked attention ({b.mask.description})"
    if rtx:
        return ("ok", "attention-masked", f"{what}: TensorRT-RTX fuses it with its mask, as the Attention op or as "
                                        "MatMul → Add → Softmax → MatMul (measured with its builder)")
    if b.form == "op":
        return ("ok", "attention-masked", f"{what}: the parser gives the mask to the IAttention layer, which takes "
                                        "boolean and additive masks (not yet measured on a GPU)")
    pattern_only = version is not None and version < ATTENTION_OP_SINCE
    return ("warning", "attention-mask",
            f"will not fuse: {what} as MatMul/Softmax/MatMul; a mask between the products breaks TensorRT's MHA pattern "
            "fusion (NVIDIA/TensorRT#4537, #4410)" + ("" if pattern_only else
                                                      "; export the Attention op form (`--attention op`), whose mask "
                                                      "IAttention takes"))


def site_verdict(b: AttentionSite, *, model_fp16: bool) -> str:
    """"fusable", "fusable once FP16" or "not fusable: <reason>" (the same rule as the readiness check)."""
    found = [f for f in site_findings(b, model_fp16=model_fp16) if f[1] in WILL_NOT_FUSE]
    if not found:
        return "fusable"
    if all(f[1] == "attention-fp32" for f in found):
        return "fusable once FP16"
    first = next(f for f in found if f[1] != "attention-fp32")
    return "not fusable: " + first[2].removeprefix("will not fuse reliably: ").removeprefix("will not fuse: ")


def check_trt_readiness(
    onnx_path_or_model: onnx.ModelProto | str | Path,
    target: str = "10.14",
    profiles: Sequence[Profile] | None = None,
    *,
    fp16: bool | None = None,
    runtime: str = "tensorrt",
    graph: onnx.ModelProto | None = None,
    analysis: Sequence[AttentionSite] | None = None,
) -> ReadinessReport:
    """Check an ONNX model against the TensorRT ``target`` version without TensorRT.

    ``profiles`` (optional) are validated against the model's ModelSpec
    (read from the ONNX metadata). ``fp16=True`` says an FP16 engine is
    wanted: a pure-FP32 model then gets a warning (strongly typed builds
    keep the ONNX's types). ``runtime="rtx"`` checks for TensorRT-RTX (its
    parser is taken as the newest TensorRT's; ``target`` is then ignored) and
    applies the rules measured with its builder (one head at batch 1 does
    not fuse). Returns a :class:`ReadinessReport`; call
    ``report.raise_for_errors()`` to turn errors into a UsageError.
    ``graph`` / ``analysis``: the file's graph (types and shapes inferred) and
    its attention analysis, when the caller has them (the file is then not
    parsed or analysed again).
    """
    from ..exporter.serving import refuse_serving_form

    model = graph if graph is not None else _load(onnx_path_or_model)
    refuse_serving_form(model, onnx_path_or_model if not isinstance(onnx_path_or_model, onnx.ModelProto) else "the model",
                        "TensorRT")
    rtx = runtime == "rtx"
    version = parse_target(RTX_TARGET if rtx else target)
    target_s = f"{version[0]}.{version[1]}"
    ones = [str(i) for i, p in enumerate(profiles or []) if p.max[0] == 1] if rtx else []
    batch_one = ["*"] if ones and len(ones) == len(profiles or []) else ones
    findings: list[Finding] = []
    add = lambda level, code, msg, node=None: findings.append(Finding(level, code, msg, node))  # noqa: E731
    from ..exporter.metadata import find_spec

    spec = find_spec(model, onnx_path_or_model if isinstance(onnx_path_or_model, (str, Path)) else "model")

    if rtx:
        pass
    elif version < MIN_TARGET:
        add("error", "target", f"TensorRT {target_s} is older than {MIN_TARGET[0]}.{MIN_TARGET[1]}, the oldest attn-export builds for")
    elif target_s not in SUPPORTED_TARGETS:
        # A newer installed TensorRT may well work; its API has not been checked, so say so rather than refuse.
        add("warning", "target", f"TensorRT {target_s} is outside the supported range {supported_range()}; "
                                 "its Python API has not been checked against attn-export's code")

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

    # 2. attention sites
    # One shape inference for the attention analysis and the FP16 placement check (none for an inferred graph).
    idx = TypedIndex(model, infer=graph is None or not model.graph.value_info)
    blocks = list(analysis) if analysis is not None else find_attention(model, index=idx)
    if not blocks:
        add("warning", "no-attention", "no attention site found (no Attention node and no Softmax over a Q·Kᵀ product)")
    model_fp16 = model_is_fp16(model, spec)
    for b in blocks:
        for level, code, message in site_findings(b, model_fp16=model_fp16, version=version, batch_one=batch_one,
                                                  rtx=rtx):
            add(level, code, message, b.name)

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
                            if b.level is not None and b.kind == "self":  # cross-attention keys are the context's
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
            "(convert it with `attn-export fp16`, or build with `attn-export trt --fp16`)")
    if model_fp16:
        for node in model.graph.node:
            if node.op_type in NORM_OPS and node.input:
                dt = idx.dtype(node.input[0])
                if dt in HALF_TYPES:
                    add("warning", "norm-fp16",
                        f"{node.op_type} runs in {dt}; keep normalization in FP32 (FP16 GroupNorm has overflowed in UNets)",
                        node.name)

    return ReadinessReport(target="TensorRT-RTX" if rtx else target_s, findings=findings, attention=blocks, spec=spec)


def predicted_unfused(report: ReadinessReport) -> dict[str, str]:
    """Site name -> why the readiness rules expect it not to fuse (its first will-not-fuse finding)."""
    out: dict[str, str] = {}
    for f in report.unfused:
        if f.node is not None and f.node not in out:
            out[f.node] = re.sub(r"^will not fuse( reliably| in profile [\d, ]+)?: ", "", f.message)
    return out


def predicted_fusable(report: ReadinessReport) -> set[str]:
    """Names of the sites the readiness rules expect the builder to fuse (no will-not-fuse finding)."""
    unfused = predicted_unfused(report)
    return {b.name for b in report.attention if b.name not in unfused}


def iter_messages(report: ReadinessReport, levels: Iterable[str] = ("error", "warning")) -> list[str]:
    """Findings of the given levels as one-line strings."""
    wanted = set(levels)
    return [str(f) for f in report.findings if f.level in wanted]
