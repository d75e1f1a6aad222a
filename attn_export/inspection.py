"""What is inside an artifact: ``attn-export inspect``.

Named ``inspection`` (not ``inspect``) so it never shadows the standard
library module.

For an ONNX file: inputs/outputs with their dims, opset, file size (external
data included), the embedded model description, an op-type histogram, the
attention sites (form, scale placement, sequence length as a symbolic
expression, head size, whether TensorRT can fuse them) and the share of
FP16/FP32 tensors. For an engine: its sidecar (profiles, precision, TensorRT
version, GPU, I/O) and the fused-attention report recorded at build time.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from .errors import UsageError
from .spec import METADATA_KEY, ModelSpec

HEAD_SIZE_MIN, HEAD_SIZE_MAX, HEAD_SIZE_ALIGN = 16, 256, 8
HALF = ("float16", "bfloat16")
# H/W used for the concrete shape inference that finds each attention site's level and head size.
_PROBE_HW = (64, 64)


@dataclass
class AttentionReport:
    """One attention site as ``inspect`` reports it."""

    name: str
    form: str                     # "op" | "decomposed"
    form_description: str         # "ONNX Attention op" | "MatMul/Softmax/MatMul"
    scale_before_product: bool
    scale: float | None
    level: int | None             # resolution level: the sequence is (H/2^level)*(W/2^level)
    seq_len: str | None           # symbolic, e.g. "height*width/4"
    head_size: int | None
    dtype: str | None
    trt_fusion: str               # "fusable" | "fusable once FP16" | "not fusable: <reason>" | "unknown: <reason>"
    nodes: list[str] = field(default_factory=list)


@dataclass
class InspectReport:
    """The result of :func:`inspect_artifact`; ``to_dict()`` is what ``inspect --json`` prints."""

    path: str
    kind: str                                 # "onnx" | "engine"
    file_size: int
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "file_size": self.file_size, **self.data}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)


# ---------------------------------------------------------------------------------------------------------------------
def _np_name(elem_type: int) -> str:
    try:
        return helper.tensor_dtype_to_np_dtype(elem_type).name
    except Exception:  # noqa: BLE001 - bfloat16 and friends have no exact numpy type
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _io(vis: Any) -> list[dict[str, Any]]:
    from .exporter.passes import dims_of

    return [{"name": vi.name, "dtype": _np_name(vi.type.tensor_type.elem_type), "dims": dims_of(vi)} for vi in vis]


def _external_files(model: onnx.ModelProto, folder: Path) -> list[Path]:
    files: set[Path] = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for kv in init.external_data:
                if kv.key == "location":
                    files.add(folder / kv.value)
    return sorted(files)


def _spec_of(model: onnx.ModelProto) -> tuple[ModelSpec | None, dict[str, str]]:
    spec = None
    other: dict[str, str] = {}
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            try:
                spec = ModelSpec.from_json(p.value)
            except Exception:  # noqa: BLE001 - an unreadable description is reported, not fatal
                other[p.key] = p.value
        else:
            other[p.key] = p.value
    return spec, other


def _concrete_shapes(model: onnx.ModelProto, spec: ModelSpec | None) -> tuple[dict[str, list[int]], tuple[int, int, int]]:
    """Shapes of every tensor with the dynamic dims pinned to (batch 1, 64x64 or a valid multiple).

    Symbolic inference leaves the attention sequence dim as an anonymous
    'unk__N'; pinning H and W makes it a number, and the number gives the level.
    """
    m = spec.hw_multiple if spec else 1
    # At least two positions per side at the deepest level, so every level's size is a clean power of 4 apart.
    h = max(_PROBE_HW[0], 2 * m) // m * m
    w = max(_PROBE_HW[1], 2 * m) // m * m
    sizes = {"batch": 1, "height": h, "width": w}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    for vi in probe.graph.input:
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_param"):
                name = d.dim_param
                # Unknown symbolic names: the image layout (B, C, H, W) tells which axis it is.
                value = sizes.get(name) or {0: 1, 2: h, 3: w}.get(k, 1)
                d.Clear()
                d.dim_value = value
    shapes: dict[str, list[int]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort: figures that need it are reported as unknown
        return shapes, (1, h, w)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[vi.name] = [int(d.dim_value) for d in tt.shape.dim]
    return shapes, (1, h, w)


def _seq_expr(level: int) -> str:
    return "height*width" if level == 0 else f"height*width/{4 ** level}"


def _fusion_verdict(head: int | None, scale_before: bool, dtype: str | None) -> str:
    try:  # the readiness checker owns the window; fall back to the documented numbers
        from .engines.readiness import head_size_fusable

        fits = head_size_fusable(head)
    except ImportError:
        fits = None if head is None else (HEAD_SIZE_MIN <= head <= HEAD_SIZE_MAX and head % HEAD_SIZE_ALIGN == 0)
    if not scale_before:
        return "not fusable: the scale is applied after Q·Kᵀ (TensorRT needs it on Q/K)"
    if fits is False:
        return f"not fusable: head size {head} is outside {HEAD_SIZE_MIN}..{HEAD_SIZE_MAX} (multiple of {HEAD_SIZE_ALIGN})"
    if fits is None:
        return "unknown: head size could not be inferred"
    if dtype in HALF:
        return "fusable"
    return "fusable once FP16"


def _typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """Symbolic shape/type inference, best effort (the input model when it fails)."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - types stay partly unknown
        return model


def _attention(model: onnx.ModelProto, typed: onnx.ModelProto, shapes: dict[str, list[int]],
               probe: tuple[int, int, int]) -> list[AttentionReport]:
    from .exporter.passes import find_attention

    _, ph, pw = probe
    by_name = {n.name: n for n in model.graph.node}
    types: dict[str, int] = {}
    for vi in list(typed.graph.value_info) + list(model.graph.input):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    out = []
    for site in find_attention(model):
        nodes = [by_name[n] for n in site.nodes if n in by_name]
        if site.form == "op":
            q = nodes[0].input[0] if nodes else None
        else:
            # The first MatMul of the chain takes the (scaled) Q.
            mm = next((n for n in nodes if n.op_type == "MatMul"), None)
            q = mm.input[0] if mm is not None else None
        qshape = shapes.get(q) if q else None
        head = qshape[-1] if qshape else None
        level = None
        if qshape and len(qshape) >= 2 and qshape[-2] > 0:
            ratio = (ph * pw) / qshape[-2]
            lvl = round(math.log(ratio, 4)) if ratio >= 1 else None
            if lvl is not None and 4 ** lvl == ratio:
                level = lvl
        dtype = _np_name(types[q]) if q in types and types[q] else None
        out.append(AttentionReport(
            name=site.name, form=site.form,
            form_description="ONNX Attention op" if site.form == "op" else "MatMul/Softmax/MatMul",
            scale_before_product=site.scale_before_product, scale=site.scale, level=level,
            seq_len=_seq_expr(level) if level is not None else None, head_size=head, dtype=dtype,
            trt_fusion=_fusion_verdict(head, site.scale_before_product, dtype), nodes=list(site.nodes),
        ))
    return out


def _share(counts: dict[str, list[int]]) -> dict[str, Any]:
    """{dtype: [tensors, elements]} -> counts and fractions of both."""
    n_t = sum(v[0] for v in counts.values()) or 1
    n_e = sum(v[1] for v in counts.values()) or 1
    return {
        dtype: {"tensors": v[0], "elements": v[1], "tensor_share": v[0] / n_t, "element_share": v[1] / n_e}
        for dtype, v in sorted(counts.items())
    }


def _precision(model: onnx.ModelProto, typed: onnx.ModelProto, shapes: dict[str, list[int]],
               probe: tuple[int, int, int]) -> dict[str, Any]:
    inits: dict[str, list[int]] = {}
    for init in model.graph.initializer:
        entry = inits.setdefault(_np_name(init.data_type), [0, 0])
        entry[0] += 1
        entry[1] += math.prod(init.dims) if init.dims else 1
    acts: dict[str, list[int]] = {}
    init_names = {i.name for i in model.graph.initializer}
    for vi in list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output):
        if vi.name in init_names or not vi.type.tensor_type.elem_type:
            continue
        entry = acts.setdefault(_np_name(vi.type.tensor_type.elem_type), [0, 0])
        entry[0] += 1
        entry[1] += math.prod(shapes[vi.name]) if vi.name in shapes else 0
    return {
        "initializers": _share(inits),
        # Element counts of activations depend on the shape: counted at batch 1 and the probe H x W.
        "activations": _share(acts),
        "activation_shape": list(probe),
    }


def inspect_onnx(path: str | Path) -> InspectReport:
    """Inspect an ONNX file (weights are not loaded)."""
    from .exporter.metadata import load_onnx

    p = Path(path)
    model = load_onnx(p, load_external_data=False)
    externals = _external_files(model, p.parent)
    size = p.stat().st_size + sum(f.stat().st_size for f in externals if f.is_file())
    spec, other_meta = _spec_of(model)
    opset = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    hist = Counter((n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}") for n in model.graph.node)
    shapes, probe = _concrete_shapes(model, spec)
    typed = _typed(model)
    attention = _attention(model, typed, shapes, probe)
    init_names = {i.name for i in model.graph.initializer}
    data = {
        "opset": opset.get("ai.onnx"),
        "opsets": opset,
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "external_data": [str(f) for f in externals],
        "inputs": _io([i for i in model.graph.input if i.name not in init_names]),
        "outputs": _io(model.graph.output),
        "spec": spec.to_dict() if spec else None,
        "metadata": other_meta,
        "num_nodes": len(model.graph.node),
        "num_parameters": sum(math.prod(i.dims) if i.dims else 1 for i in model.graph.initializer),
        "op_histogram": dict(hist.most_common()),
        "attention": [asdict(a) for a in attention],
        "attention_summary": _attention_summary(attention),
        "precision": _precision(model, typed, shapes, probe),
    }
    return InspectReport(path=str(p), kind="onnx", file_size=size, data=data)


def _attention_summary(sites: list[AttentionReport]) -> dict[str, Any]:
    forms = Counter(s.form for s in sites)
    return {"count": len(sites), "forms": dict(forms),
            "fusion": dict(Counter(s.trt_fusion for s in sites))}


def inspect_engine(path: str | Path) -> InspectReport:
    """Inspect a TensorRT engine through its sidecar (TensorRT is not needed)."""
    from .engines.sidecar import read_sidecar, sidecar_path

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"engine file not found: {p}")
    side = read_sidecar(p)
    data = {
        "sidecar": str(sidecar_path(p)),
        "tensorrt_version": side.get("tensorrt_version"),
        "gpu": side.get("gpu"),
        "hardware_compatibility": side.get("hardware_compatibility"),
        "precision": side.get("precision"),
        "profiles": side.get("profiles"),
        "io": side.get("io"),
        "onnx": side.get("onnx"),
        "spec": side.get("model"),
        "fusion": side.get("fusion") or {},
        "build": side.get("build") or {},
    }
    return InspectReport(path=str(p), kind="engine", file_size=p.stat().st_size, data=data)


def inspect_artifact(path: str | Path) -> InspectReport:
    """Inspect an ONNX file or a TensorRT engine (``.plan``/``.engine`` with its sidecar)."""
    from .verify import artifact_kind

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"artifact not found: {p}")
    return inspect_engine(p) if artifact_kind(p) == "engine" else inspect_onnx(p)
