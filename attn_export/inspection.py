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
from typing import Any, cast

import onnx
from onnx import helper

from .errors import UsageError
from .graph import TypedIndex, find_attention
from .graph.probe import DEFAULT_P, probe_index
from .graph.spatial import flatten_spatial_attention
from .spec import METADATA_KEY, ModelSpec


@dataclass
class AttentionReport:
    """One attention site as ``inspect`` reports it (from the one attention analysis)."""

    name: str
    form: str                     # "op" | "decomposed" | "einsum"
    form_description: str         # "ONNX Attention op" | "MatMul/Softmax/MatMul" | "Einsum/Softmax/Einsum"
    scale_before_product: bool
    scale: float | None
    scale_placement: str          # "q", "k", "q+k", "logits", "attribute", "default", "none"
    scale_source: str             # "constant" | "shape" | "dynamic"
    level: int | None             # resolution level: the sequence is (H/2^level)*(W/2^level)
    seq_len: int | str | None     # symbolic, e.g. "(height/2)*(width/2)"
    kind: str                     # "self" | "cross" (K/V from other inputs than the image)
    kv_len: int | str | None      # the key/value sequence length
    heads: int | None
    head_size: int | None
    dtype: str | None
    canonical: bool               # already the canonical decomposed chain
    problem: str | None           # why it cannot be rewritten
    trt_fusion: str               # "fusable" | "fusable once FP16" | "not fusable: <reason>"
    nodes: list[str] = field(default_factory=list)
    mask: str | None = None       # the mask or bias on the logits, described (None: none)


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


def _external_files(model: onnx.ModelProto, p: Path) -> list[Path]:
    from .exporter.metadata import external_data_locations

    return sorted({p.parent / loc for loc in external_data_locations(model, p)})


def _spec_of(model: onnx.ModelProto, origin: Path) -> tuple[ModelSpec | None, dict[str, str]]:
    """The embedded description (checked: a corrupt or hostile one is a UsageError) and the other metadata."""
    from .exporter.metadata import find_spec

    return find_spec(model, origin), {p.key: p.value for p in model.metadata_props if p.key != METADATA_KEY}


def _placement(site: Any) -> str:
    """Where the scale sits; factors on Q and K before a reshape are named as such."""
    if site.upstream_scale == 1.0:
        return str(site.scale_placement)
    upstream = "q+k before a reshape"
    return upstream if site.scale_placement == "none" else f"{site.scale_placement}, {upstream}"


def _attention(model: onnx.ModelProto, spec: ModelSpec | None, typed: TypedIndex, probed: TypedIndex | None,
               p: int) -> list[AttentionReport]:
    from .engines.readiness import model_is_fp16, site_verdict

    fp16 = model_is_fp16(model, spec)
    out = []
    for site in find_attention(model, index=typed, probed=probed, p=p):
        out.append(AttentionReport(
            name=site.name, form=site.form, form_description=site.form_description,
            scale_before_product=site.scale_before_product, scale=site.total_scale,
            scale_placement=_placement(site),
            scale_source=site.scale_source, level=site.level, seq_len=site.seq_len, kind=site.kind,
            kv_len=site.kv_len, heads=site.heads,
            head_size=site.head_size, dtype=site.dtype, canonical=site.canonical, problem=site.problem,
            trt_fusion=site_verdict(site, model_fp16=fp16), nodes=list(site.nodes),
            mask=site.mask.description if site.mask is not None else None,
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


def _precision(model: onnx.ModelProto, typed: TypedIndex, probed: TypedIndex | None,
               probe: tuple[int, int, int]) -> dict[str, Any]:
    inits: dict[str, list[int]] = {}
    for init in model.graph.initializer:
        entry = inits.setdefault(_np_name(init.data_type), [0, 0])
        entry[0] += 1
        entry[1] += math.prod(init.dims) if init.dims else 1
    acts: dict[str, list[int]] = {}
    init_names = {i.name for i in model.graph.initializer}
    shapes = probed.shapes if probed is not None else {}
    for name, elem in typed.types.items():
        if name in init_names or not elem:
            continue
        entry = acts.setdefault(_np_name(elem), [0, 0])
        entry[0] += 1
        dims = shapes.get(name)
        # All dims are ints where the product is taken (checked in the condition); mypy cannot narrow the list.
        entry[1] += math.prod(cast("list[int]", dims)) if dims and all(isinstance(d, int) for d in dims) else 0
    return {
        "initializers": _share(inits),
        # Element counts of activations depend on the shape: counted at batch 1 and the probe H x W.
        "activations": _share(acts),
        "activation_shape": list(probe),
    }


def inspect_onnx(path: str | Path) -> InspectReport:
    """Inspect an ONNX file (weights are not loaded)."""
    from .exporter.metadata import load_onnx
    from .exporter.serving import SERVING_KEY, serving_description

    p = Path(path)
    model = load_onnx(p, load_external_data=False)
    externals = _external_files(model, p)
    size = p.stat().st_size + sum(f.stat().st_size for f in externals if f.is_file())
    spec, other_meta = _spec_of(model, p)
    opset = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    hist = Counter((n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}") for n in model.graph.node)
    # Sites are reported as `optimize` will read them: NCSN++'s 5-D spatial attention in its flattened form.
    flatten_spatial_attention(model)
    # One symbolic and one concrete-shape inference, shared by the attention analysis and the precision share.
    m = spec.hw_multiple if spec else 1
    side = max(DEFAULT_P, 2 * m) // m * m
    typed = TypedIndex(model)
    probed = probe_index(model, p=side)
    probe = (1, 2 * side, side)
    attention = _attention(model, spec, typed, probed, side)
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
        "metadata": {k: v for k, v in other_meta.items() if k != SERVING_KEY},
        "serving_form": serving_description(model),
        "num_nodes": len(model.graph.node),
        "num_parameters": sum(math.prod(i.dims) if i.dims else 1 for i in model.graph.initializer),
        "op_histogram": dict(hist.most_common()),
        "attention": [asdict(a) for a in attention],
        "attention_summary": _attention_summary(attention),
        "precision": _precision(model, typed, probed, probe),
    }
    return InspectReport(path=str(p), kind="onnx", file_size=size, data=data)


def _attention_summary(sites: list[AttentionReport]) -> dict[str, Any]:
    forms = Counter(s.form for s in sites)
    return {"count": len(sites), "forms": dict(forms), "rewritable": sum(s.problem is None for s in sites),
            "fusion": dict(Counter(s.trt_fusion for s in sites))}


def inspect_engine(path: str | Path) -> InspectReport:
    """Inspect a TensorRT or TensorRT-RTX engine through its sidecar (neither runtime is needed)."""
    from .engines.sidecar import read_sidecar, sidecar_path

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"engine file not found: {p}")
    side = read_sidecar(p)
    data = {
        "sidecar": str(sidecar_path(p)),
        "runtime": side.get("runtime") or "tensorrt",
        "tensorrt_version": side.get("tensorrt_version"),
        "gpu": side.get("gpu"),
        "compute_capabilities": side.get("compute_capabilities"),
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
    from .engines.sidecar import is_engine_path

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"artifact not found: {p}")
    return inspect_engine(p) if is_engine_path(p) else inspect_onnx(p)


def trt_readiness(path: str | Path, target: str = "10.14", runtime: str = "tensorrt") -> Any:
    """``inspect --trt``: the readiness report of an ONNX file for TensorRT ``target`` or for TensorRT-RTX.

    For TensorRT-RTX the file is checked under the profile ``attn-export trt``
    builds by default (its rules depend on the batch range), where the file
    carries a description to derive it from.
    """
    from .engines.profiles import default_profile
    from .engines.readiness import check_target, check_trt_readiness
    from .engines.runtime import RTX, get_runtime
    from .exporter.metadata import find_spec, load_onnx

    rt = get_runtime(runtime)
    if rt is not RTX:
        check_target(target)
        return check_trt_readiness(path, target)
    model = load_onnx(path, load_external_data=False)
    spec = find_spec(model, path)
    return check_trt_readiness(model, target, [default_profile(spec)] if spec is not None else None, runtime=rt.name)
