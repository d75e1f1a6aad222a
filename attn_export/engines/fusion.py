"""Did TensorRT fuse each attention block? Read from the builder's own layer information.

Two sources, one report:

* the engine inspector's JSON
  (``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``),
  where a GPU can deserialize the engine;
* the builder's DETAILED layer log (:func:`parse_build_log`): with
  ``ProfilingVerbosity.DETAILED`` and a VERBOSE logger the builder logs one
  line per engine layer, ``Name: ..., LayerType: ..., Inputs: [...], ...,
  TacticName: ..., StreamId: ..., Metadata: [ONNX Layer: a][ONNX Layer: b]``.
  This is how a TensorRT-RTX engine built on a CPU is read.

Each site is mapped to its engine layers through the ONNX node names in the
layers' metadata (``[ONNX Layer: /mid/attention/Softmax]``): a site's nodes
are the ones the attention analysis walked (Q·Kᵀ, scale, Softmax, ·V, or the
Attention node). Engines whose layers carry no ONNX names fall back to the
site's module-path prefix in layer and tensor names. Verdict per site:
``fused`` (a fused attention layer holds its nodes), ``separate kernels``
(its nodes run in other layers) or ``unknown``. A build that fails makes no
report: the command stops with the builder's message (and with attention
layers decomposable, no attention site alone can make it fail).

The inspector JSON comes in either documented layout:

* 10.x: top-level ``"Bindings"`` (a list of tensor names) and ``"Layers"``;
  tensors carry a combined ``"Format/Datatype"`` field.
* 11.x: top-level ``"I/O Tensors"`` (objects with Name, IOMode, DataType,
  Dimensions, Location, ProfileInfo) and ``"Layers"``; DataType and Format
  are separate fields.

With ``LAYER_NAMES_ONLY`` verbosity the layers are plain strings.

Evidence of fusion (layer naming is not a stable API, so the raw layer list
is always returned too): a layer whose name, tactic or type mentions
``mha`` (``_gemm_mha_v2``, ``mha_v2``, ``fmha``, Myelin ``__myl_`` regions),
or an attention layer type (IAttention). Evidence against: separate GEMM
layers around a softmax.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ..errors import UsageError
from ..graph import AttentionSite
from .readiness import HALF_TYPES, head_size_fusable

_MHA = re.compile(r"mha|flash_?attn", re.IGNORECASE)
_PROFILE = re.compile(r"_myl(\d+)_\d+$|\[profile (\d+)\]")
_GEMM = re.compile(r"gemm|matmul|matrixmultiply|cublas", re.IGNORECASE)
_SOFTMAX = re.compile(r"softmax|\bsoft\b", re.IGNORECASE)


@dataclass
class LayerInfo:
    """One engine layer, normalized across inspector layouts."""

    name: str
    type: str | None = None
    tactic: str | None = None
    metadata: str | None = None
    tensors: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    onnx_nodes: list[str] = field(default_factory=list)  # from the metadata's "[ONNX Layer: NAME]" entries

    @property
    def profile(self) -> int | None:
        """The optimization profile this layer was built for, where its name says (None: shared or not said).

        Observed with TensorRT-RTX 1.7: each profile is its own Myelin graph and
        its layers end in ``_myl<profile>_<n>``; TensorRT's inspector marks
        later profiles with `` [profile N]``.
        """
        m = _PROFILE.search(self.name)
        if m is None:
            return None
        return int(m.group(1) or m.group(2))

    def text(self) -> str:
        """Everything that may name the ONNX nodes this layer came from."""
        return " ".join(x for x in (self.name, self.metadata or "", *self.tensors) if x)

    def is_mha(self) -> bool:
        if self.type and "attention" in self.type.lower():
            return True
        return bool(_MHA.search(self.name) or (self.tactic and _MHA.search(self.tactic))
                    or (self.type and _MHA.search(self.type)))

    def is_gemm(self) -> bool:
        return bool((self.type and _GEMM.search(self.type)) or (self.tactic and _GEMM.search(self.tactic))
                    or re.search(r"/MatMul(_\d+)?\b", self.name))

    def is_softmax(self) -> bool:
        return bool((self.type and _SOFTMAX.search(self.type)) or re.search(r"/Softmax\b", self.name))


@dataclass
class BlockFusion:
    """The verdict for one attention block."""

    name: str
    form: str | None
    head_size: int | None
    dtype: str | None
    fused: bool | None          # None: the layer information cannot tell
    layers: list[str] = field(default_factory=list)
    tactics: list[str] = field(default_factory=list)
    reason: str | None = None   # why not fused, or why unknown
    verdict: str = "unknown"    # "fused" | "separate kernels" | "partly fused" (in some profiles) | "unknown"
    profiles: dict[str, str] = field(default_factory=dict)  # profile index -> "fused" | "separate kernels"


@dataclass
class FusionReport:
    """Per-block verdicts plus the raw layer list."""

    schema: str                 # "10.x" | "11.x" | "build-log" | "unknown"
    verbosity: str              # "detailed" | "layer_names_only" | "none"
    blocks: list[BlockFusion]
    layers: list[LayerInfo]
    io_tensors: list[dict[str, Any]] = field(default_factory=list)
    source: str = "inspector"   # "inspector" | "build log"

    @property
    def unfused(self) -> list[BlockFusion]:
        """Sites the builder did not fuse, in every profile or in some (run as separate kernels there)."""
        return [b for b in self.blocks if b.verdict in ("separate kernels", "partly fused")]

    @property
    def fused_layer_count(self) -> int:
        """Distinct fused-attention layers in the engine, attributed or not."""
        return len({layer.name for layer in self.layers if layer.is_mha()})

    @property
    def all_fused(self) -> bool:
        return bool(self.blocks) and all(b.fused is True for b in self.blocks)

    def summary(self) -> str:
        """'2/3 attention blocks fused; /mid/attention: not fused (head size 512 ...)'."""
        n = sum(1 for b in self.blocks if b.fused)
        parts = [f"{n}/{len(self.blocks)} attention blocks fused"]
        for b in self.blocks:
            if b.fused is not True:
                state = {"partly fused": "partly fused", "unknown": "unknown"}.get(b.verdict, "not fused")
                parts.append(f"{b.name}: {state} ({b.reason})")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "source": self.source,
            "verbosity": self.verbosity,
            "all_fused": self.all_fused,
            "summary": self.summary(),
            "blocks": [asdict(b) for b in self.blocks],
            "layers": [asdict(layer) for layer in self.layers],
            "io_tensors": self.io_tensors,
        }


# --------------------------------------------------------------------------- parsing
def _dtype_of(t: Mapping[str, Any]) -> str | None:
    if "DataType" in t:  # 11.x
        return str(t["DataType"])
    fmt = t.get("Format/Datatype") or t.get("Format/DataType")  # 10.x, e.g. "Row major linear FP16 format"
    if fmt:
        m = re.search(r"\b(FP32|FP16|BF16|Half|Float|INT64|INT32|INT8|FP8|Bool)\b", str(fmt), re.IGNORECASE)
        return m.group(1) if m else str(fmt)
    return None


def _layer(raw: Any) -> LayerInfo:
    if isinstance(raw, str):
        return LayerInfo(name=raw)
    if not isinstance(raw, Mapping):
        return LayerInfo(name=str(raw))
    tensors, dtypes = [], []
    for key in ("Inputs", "Outputs"):
        for t in raw.get(key) or []:
            if isinstance(t, Mapping):
                if t.get("Name"):
                    tensors.append(str(t["Name"]))
                dt = _dtype_of(t)
                if dt:
                    dtypes.append(dt)
            elif isinstance(t, str):
                tensors.append(t)
    meta = raw.get("Metadata")
    return LayerInfo(
        name=str(raw.get("Name", "")),
        type=raw.get("LayerType") or raw.get("ParameterType"),
        tactic=raw.get("TacticName") or (str(raw["TacticValue"]) if raw.get("TacticValue") else None),
        metadata=str(meta) if meta else None,
        tensors=tensors,
        dtypes=dtypes,
        onnx_nodes=onnx_nodes(str(meta)) if meta else [],
    )


_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]*)\]")
# One layer line of the DETAILED build log (TensorRT and TensorRT-RTX print the same fields in this order).
_LOG_LAYER = re.compile(r"^Name: (?P<name>.*?), LayerType: (?P<type>[^,]*), Inputs: (?P<io>.*?), "
                        r"TacticName: (?P<tactic>[^,]*), StreamId: [^,]*, Metadata: (?P<meta>.*)$")
_LOG_TENSOR = re.compile(r"\{ Name: ([^,]+), .*?Datatype: (\w+)")


def onnx_nodes(metadata: str) -> list[str]:
    """The ONNX node names of a layer's metadata ("[ONNX Layer: a][ONNX Layer: b]" -> ["a", "b"])."""
    return [n for n in _ONNX_LAYER.findall(metadata) if n]


def parse_build_log(text: str) -> list[LayerInfo]:
    """The engine layers of the builder's DETAILED log (the lines after "Layers:"), in order, each once.

    With several optimization profiles the builder may list a layer once per
    profile; a layer is kept once by name.
    """
    out: dict[str, LayerInfo] = {}
    for line in text.splitlines():
        m = _LOG_LAYER.match(line.strip())
        if not m or m.group("name") in out:
            continue
        tensors = [t.strip() for t, _ in _LOG_TENSOR.findall(m.group("io"))]
        dtypes = [d for _, d in _LOG_TENSOR.findall(m.group("io"))]
        meta = m.group("meta").strip()
        out[m.group("name")] = LayerInfo(name=m.group("name"), type=m.group("type").strip() or None,
                                         tactic=m.group("tactic").strip() or None, metadata=meta or None,
                                         tensors=tensors, dtypes=dtypes, onnx_nodes=onnx_nodes(meta))
    return list(out.values())


def parse_inspector(info: str | bytes | Mapping[str, Any]) -> tuple[str, str, list[LayerInfo], list[dict[str, Any]]]:
    """Normalize inspector JSON into (schema, verbosity, layers, io_tensors)."""
    if isinstance(info, (str, bytes)):
        try:
            data = json.loads(info)
        except json.JSONDecodeError as exc:
            raise UsageError(f"engine layer information is not valid JSON ({exc})") from None
    else:
        data = info
    if not isinstance(data, Mapping):
        raise UsageError("engine layer information is not a JSON object")
    if "I/O Tensors" in data:
        schema = "11.x"
        io = [dict(t) for t in data.get("I/O Tensors") or [] if isinstance(t, Mapping)]
    elif "Bindings" in data:
        schema = "10.x"
        io = [{"Name": str(n)} for n in data.get("Bindings") or []]
    else:
        schema = "unknown"
        io = []
    raw_layers = data.get("Layers") or []
    layers = [_layer(r) for r in raw_layers]
    if not layers:
        verbosity = "none"
    elif all(isinstance(r, str) for r in raw_layers):
        verbosity = "layer_names_only"
    elif any(isinstance(r, Mapping) and ("TacticName" in r or "TacticValue" in r) for r in raw_layers):
        verbosity = "detailed"
    else:
        verbosity = "layer_names_only"
    return schema, verbosity, layers, io


def _mentions(layer: LayerInfo, prefix: str) -> bool:
    # "/downs.1/attention" must not match "/downs.1/attention_2": require a separator after it.
    text = layer.text()
    return bool(re.search(re.escape(prefix) + r"(?=[/\]\s,+\x1e]|$)", text))


def _is_half(dtype: str | None) -> bool:
    return dtype is not None and dtype.lower() in HALF_TYPES + ("fp16", "bf16", "half")


def _not_fused_reason(block: AttentionSite, related: list[LayerInfo]) -> str:
    fits = head_size_fusable(block.head_size)
    if fits is False:
        return (f"head size {block.head_size} is outside TensorRT's fused window "
                f"(16..256, multiple of 8)")
    if block.dtype is not None and not _is_half(block.dtype):
        return f"attention runs in {block.dtype}; fused kernels need FP16/BF16 Q/K/V"
    if block.problem:
        return block.problem
    if block.form != "op" and not block.scale_before_product:
        return "the scale is applied after Q·Kᵀ; TensorRT needs it on Q/K before the first MatMul"
    gemms = [layer for layer in related if layer.is_gemm()]
    if gemms and any(layer.is_softmax() for layer in related):
        return f"separate GEMM layers around a softmax ({', '.join(g.name for g in gemms[:3])})"
    return "TensorRT chose not to fuse it (performance or other constraints)"


def _related(layers: list[LayerInfo], b: AttentionSite) -> list[LayerInfo]:
    """The engine layers that hold site ``b``: by the ONNX node names in their metadata, or by the site's prefix."""
    mine = set(b.nodes) | {b.anchor}
    mine.discard("")
    return [layer for layer in layers if mine.intersection(layer.onnx_nodes) or (b.name and _mentions(layer, b.name))]


def _per_profile(related: list[LayerInfo]) -> dict[str, str]:
    """Profile index -> "fused" / "separate kernels", for layers whose names say their profile ({} if none do)."""
    marked = sorted({layer.profile for layer in related if layer.profile is not None})
    return {str(i): "fused" if any(layer.is_mha() for layer in related if layer.profile in (i, None)) else "separate kernels"
            for i in marked}


def report_from_layers(layers: list[LayerInfo], blocks: Sequence[AttentionSite], *, schema: str, verbosity: str,
                       io: list[dict[str, Any]] | None = None, source: str = "inspector",
                       expected: Mapping[str, str] | None = None) -> FusionReport:
    """Per-site verdicts from engine layers (see the module docstring for how sites map to layers).

    ``expected``: site name -> why the readiness rules said it would not fuse;
    that is the reason given when it did not.
    """
    out: list[BlockFusion] = []
    for b in blocks:
        related = _related(layers, b)
        mha = [layer for layer in related if layer.is_mha()]
        verdict = BlockFusion(name=b.name, form=b.form, head_size=b.head_size, dtype=b.dtype, fused=None,
                              layers=[layer.name for layer in related],
                              tactics=[layer.tactic for layer in related if layer.tactic])
        if verbosity == "none":
            verdict.reason = "the engine has no layer information (built with profiling verbosity NONE)"
        elif mha:
            verdict.profiles = _per_profile(related)
            verdict.layers = [layer.name for layer in mha]
            verdict.tactics = [layer.tactic for layer in mha if layer.tactic]
            separate = sorted(k for k, v in verdict.profiles.items() if v != "fused")
            if separate:
                verdict.fused, verdict.verdict = False, "partly fused"
                why = (expected or {}).get(b.name) or _not_fused_reason(b, related)
                verdict.reason = f"separate kernels in profile {', '.join(separate)} ({why}); fused in the others"
            else:
                verdict.fused, verdict.verdict = True, "fused"
        elif not related:
            verdict.reason = "no engine layer could be attributed to this block"
            if verbosity != "detailed":
                verdict.reason += "; rebuild with DETAILED profiling verbosity to tell"
        elif verbosity != "detailed":
            verdict.reason = "verbosity too low to tell (layer names only); rebuild with DETAILED profiling verbosity"
        else:
            verdict.fused, verdict.verdict = False, "separate kernels"
            verdict.reason = (expected or {}).get(b.name) or _not_fused_reason(b, related)
        out.append(verdict)
    return FusionReport(schema=schema, verbosity=verbosity, blocks=out, layers=layers, io_tensors=io or [], source=source)


def fusion_report(info: str | bytes | Mapping[str, Any], blocks: Sequence[AttentionSite],
                  expected: Mapping[str, str] | None = None) -> FusionReport:
    """Per-block fusion verdicts from inspector JSON and the ONNX attention blocks.

    ``blocks`` comes from :func:`attn_export.graph.find_attention` on the engine's ONNX.
    A block is fused when a layer attributed to it (by ONNX node names in the
    layer metadata, else by name or tensor names containing the block's
    module path) is an MHA / attention layer; separate kernels when its layers
    are present but none is; unknown when nothing can be attributed, or only
    layer names are available and none of them says "mha".
    """
    schema, verbosity, layers, io = parse_inspector(info)
    return report_from_layers(layers, blocks, schema=schema, verbosity=verbosity, io=io, expected=expected)


def build_log_report(log: str, blocks: Sequence[AttentionSite], expected: Mapping[str, str] | None = None) -> FusionReport:
    """Per-site verdicts from the builder's DETAILED layer log (an engine that cannot be deserialized here)."""
    layers = parse_build_log(log)
    return report_from_layers(layers, blocks, schema="build-log", verbosity="detailed" if layers else "none",
                              source="build log", expected=expected)


def mha_layers(layers: Iterable[LayerInfo]) -> list[LayerInfo]:
    """All layers that look like fused attention, attributed or not."""
    return [layer for layer in layers if layer.is_mha()]
