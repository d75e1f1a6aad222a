"""Triton Inference Server model repositories for an exported ONNX file or a TensorRT engine.

Layout written (Triton's convention)::

    REPO/NAME/config.pbtxt
    REPO/NAME/VERSION/model.onnx   (+ its external data files)   platform "onnxruntime_onnx"
    REPO/NAME/VERSION/model.plan                                 platform "tensorrt_plan"
    REPO/NAME/VERSION/model.xml + model.bin                      backend "openvino" (--backend openvino)

With ``max_batch_size > 0`` the batch dim is left out of ``dims``; a tensor
that is batch-only (the timestep ``t`` of shape [B]) becomes ``dims: [1]``
with ``reshape: { shape: [] }``, because Triton does not accept empty dims.
Dynamic dims are -1. The config is checked by parsing it into tritonclient's
``ModelConfig`` message before anything is put in place.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engines.sidecar import is_engine_path
from .atomic import signals_deferred
from .errors import UsageError

if TYPE_CHECKING:
    import onnx

    from .graph import ServingForm

DEFAULT_ONNX_MAX_BATCH = 8
# "written": the ONNX file as it is; "serving": ONNX Runtime's serving form of it, built for the instances' kind.
TRITON_FORMS = ("written", "serving")
# numpy dtype name -> Triton data type.
TRITON_DTYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
    "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16", "object": "TYPE_STRING", "str": "TYPE_STRING",
}
# ONNX TensorProto element type name -> numpy dtype name (bfloat16 has no numpy type of its own).
ONNX_ELEM_TYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64", "INT8": "int8",
    "INT16": "int16", "INT32": "int32", "INT64": "int64", "FLOAT16": "float16", "FLOAT": "float32",
    "DOUBLE": "float64", "BFLOAT16": "bfloat16", "STRING": "str",
}


@dataclass
class TensorConfig:
    """One input or output as Triton sees it: full dims with the batch first, -1 where dynamic."""

    name: str
    dtype: str  # numpy name
    dims: list[int]


@dataclass
class TritonModel:
    """What was (or would be) written."""

    name: str
    platform: str
    model_dir: Path
    model_file: Path
    config_path: Path
    config_text: str
    max_batch_size: int
    inputs: list[TensorConfig]
    outputs: list[TensorConfig]
    copied: list[Path] = field(default_factory=list)
    validated: bool = False
    attention_rewritten: int = 0  # attention sites served in ONNX Runtime's form (see attention_kind)
    attention_kind: str = ""      # what they became: query-chunked attention and/or MultiHeadAttention
    winograd_rewritten: int = 0   # 3x3 convolutions served as Winograd F(4x4, 3x3) (CPU instances)
    backend: str = ""             # a backend named instead of a platform ("openvino")
    precision: str = ""           # OpenVINO's inference precision set in the config
    f32_islands: str = ""         # what the OpenVINO IR keeps in f32 under bf16


# ---------------------------------------------------------------------------------------------------------------------
# reading the artifact
# ---------------------------------------------------------------------------------------------------------------------
def _onnx_io(path: Path) -> tuple[list[TensorConfig], list[TensorConfig], list[str]]:
    """Inputs, outputs and external data files (relative locations) of an ONNX file, weights not loaded."""
    import onnx

    from .exporter.metadata import external_data_locations, find_spec, load_onnx

    model = load_onnx(path, load_external_data=False)
    find_spec(model, path)  # a description that breaks its schema is refused here as everywhere else

    def tensors(values: Any) -> list[TensorConfig]:
        out = []
        for vi in values:
            tt = vi.type.tensor_type
            elem = onnx.TensorProto.DataType.Name(tt.elem_type)
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            out.append(TensorConfig(vi.name, ONNX_ELEM_TYPES.get(elem, elem.lower()), dims))
        return out

    init_names = {i.name for i in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in init_names]
    return tensors(inputs), tensors(model.graph.output), external_data_locations(model, path)


def _engine_io(path: Path) -> tuple[list[TensorConfig], list[TensorConfig], int, dict[str, Any]]:
    """Inputs, outputs, the largest profile batch and the sidecar of an engine."""
    from .engines.sidecar import read_sidecar  # lazy: the engine side is optional

    data = read_sidecar(path)
    if data.get("runtime") == "rtx":
        raise UsageError(f"{path.name} is a TensorRT-RTX engine; Triton's TensorRT backend loads TensorRT plans only: "
                         "build one with `attn-export trt` (--runtime tensorrt), or serve the ONNX file")
    ins: list[TensorConfig] = []
    outs: list[TensorConfig] = []
    for t in data["io"]:
        cfg = TensorConfig(t["name"], str(t["dtype"]), [int(d) for d in t["shape"]])
        (ins if t.get("mode", "input") == "input" else outs).append(cfg)
    max_batch = max(int(p["max"][0]) for p in data["profiles"]) if data["profiles"] else 0
    return ins, outs, max_batch, data


def _onnxruntime_form(path: Path, kind: str, attention: str) -> tuple[onnx.ModelProto, ServingForm] | None:
    """The file in ONNX Runtime's serving form for ``kind`` instances and what was rewritten (None: nothing to do).

    Weights are not loaded where they are kept outside: the rewrite changes
    nodes, and those tensors keep pointing at their data file (the weights of
    the 3x3 convolutions that qualify for Winograd are read; their transformed
    weights go inside the written graph, at most twice the model's weight bytes).
    """
    from .exporter.foreign import spec_of
    from .exporter.metadata import load_onnx
    from .exporter.serving import SERVING_PROVIDERS, build_serving_form
    from .exporter.weights import EXTERNAL_DATA_THRESHOLD

    model = load_onnx(path, load_external_data=False)
    form = build_serving_form(model, path, spec_of(model, origin=str(path)), provider=SERVING_PROVIDERS["cpu" if kind == "cpu" else "cuda"],
                              attention=attention)
    if not form.changed:
        return None
    if model.ByteSize() >= EXTERNAL_DATA_THRESHOLD:
        raise UsageError(f"{path.name} in ONNX Runtime's form would exceed 2 GB in one file; write it with "
                         "`attn-export optimize --for onnxruntime` (weights in a data file) and serve that")
    return model, form


# ---------------------------------------------------------------------------------------------------------------------
# the config text
# ---------------------------------------------------------------------------------------------------------------------
def _triton_dtype(name: str) -> str:
    if name not in TRITON_DTYPES:
        raise UsageError(f"tensor data type {name!r} has no Triton equivalent")
    return TRITON_DTYPES[name]


def _tensor_block(t: TensorConfig, batched: bool) -> str:
    dims = t.dims
    lines = [f'    name: "{t.name}"', f"    data_type: {_triton_dtype(t.dtype)}"]
    if batched:
        if not dims:
            raise UsageError(f"tensor {t.name} is a scalar; it cannot be batched (use --max-batch 0)")
        if dims[0] not in (-1,) and dims[0] < 1:
            raise UsageError(f"tensor {t.name}: bad batch dim {dims[0]}")
        dims = dims[1:]
        if not dims:
            # Batch-only tensor such as t [B]: Triton wants at least one dim, so [1] reshaped to [].
            lines.append("    dims: [ 1 ]")
            lines.append("    reshape: { shape: [ ] }")
            return "  {\n" + "\n".join(lines) + "\n  }"
    lines.append(f"    dims: [ {', '.join(str(d) for d in dims)} ]")
    return "  {\n" + "\n".join(lines) + "\n  }"


def config_text(name: str, platform: str, inputs: list[TensorConfig], outputs: list[TensorConfig], *,
                max_batch_size: int, instances: int, kind: str, header: list[str] | None = None,
                backend: str = "", parameters: dict[str, str] | None = None) -> str:
    """config.pbtxt for the given tensors (dims with the batch dim first); ``backend`` replaces ``platform`` where given."""
    batched = max_batch_size > 0
    parts = [f"# {line}" for line in (header or [])]
    parts += [f'name: "{name}"', f'backend: "{backend}"' if backend else f'platform: "{platform}"',
              f"max_batch_size: {max_batch_size}"]
    parts.append("input [\n" + ",\n".join(_tensor_block(t, batched) for t in inputs) + "\n]")
    parts.append("output [\n" + ",\n".join(_tensor_block(t, batched) for t in outputs) + "\n]")
    parts.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_{kind.upper()}\n  }}\n]")
    if batched:
        # Lets Triton merge concurrent requests of the same H x W into one batch.
        parts.append("dynamic_batching { }")
    if platform == "onnxruntime_onnx" and kind.lower() == "cpu":
        # As OrtRunner does on the CPU provider: the memory pattern nearly doubled peak memory at 256 px for no
        # speed (docs/benchmarks.md); the ONNX Runtime backend reads this model parameter.
        parts.append('parameters { key: "enable_mem_pattern" value: { string_value: "0" } }')
    for key, value in (parameters or {}).items():
        parts.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(parts) + "\n"


_PB2: Any = None


def model_config_pb2() -> Any:
    """tritonclient's model_config_pb2 module.

    It is imported from ``tritonclient.grpc``; where tritonclient was installed
    without its grpc extra (the package's __init__ then refuses to import) the
    generated module, which needs only protobuf, is loaded from its file.
    """
    global _PB2
    if _PB2 is not None:
        return _PB2
    try:
        from tritonclient.grpc import model_config_pb2 as pb2
    except (ImportError, RuntimeError):
        spec = importlib.util.find_spec("tritonclient")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("tritonclient is not installed (pip install '.[triton]' from the attn-export checkout)") from None
        file = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
        if not file.is_file():
            raise ImportError(f"tritonclient has no {file}") from None
        mod_spec = importlib.util.spec_from_file_location("attn_export._triton_model_config_pb2", file)
        assert mod_spec is not None and mod_spec.loader is not None
        pb2 = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = pb2
        mod_spec.loader.exec_module(pb2)
    _PB2 = pb2
    return pb2


def parse_config(text: str) -> Any:
    """Parse config.pbtxt text into tritonclient's ModelConfig message (raises on a malformed config)."""
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2().ModelConfig())


# ---------------------------------------------------------------------------------------------------------------------
# writing the repository
# ---------------------------------------------------------------------------------------------------------------------
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _readable_by_all(folder: Path) -> None:
    """The modes a fresh folder would have under the user's umask (mkdtemp makes it 0700).

    A Triton server often runs as another user than the one who wrote the
    repository (containers): with 0700 it could not read the model.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _openvino_settings(src: Path, precision: str | None, kind: str | None, form: str, max_batch: int | None,
                       instances: int) -> tuple[str, dict[str, str], list[str]]:
    """OpenVINO's precision, the config's parameters and its header lines; UsageError for what it cannot serve.

    Triton's OpenVINO backend takes the inference precision through one parameter only, HINT_BF16, and OpenVINO's
    CPU plugin defaults to bf16 wherever the CPU has bf16 units: an f32 model would run bf16 on such a server,
    and f16 has no parameter at all. So bf16 is the one precision the config can state.
    """
    from .runners.openvino_runner import parse_precision

    chosen = parse_precision(precision)
    if chosen != "bf16":
        raise UsageError(f"Triton's OpenVINO backend cannot pin {chosen}: its parameters set bf16 only (HINT_BF16), and "
                         "OpenVINO's CPU default is bf16 wherever the CPU has bf16 units; serve FP32 with the ONNX "
                         "Runtime backend (--backend onnxruntime), or use --precision bf16")
    if is_engine_path(src):
        raise UsageError("--backend openvino serves an ONNX file; an engine runs in TensorRT")
    if (kind or "cpu").lower() != "cpu":
        raise UsageError("--backend openvino writes CPU instances; use --kind cpu")
    if form != "written":
        raise UsageError("--form serving is ONNX Runtime's form; OpenVINO serves the file as written")
    params = {"HINT_BF16": "YES", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": str(instances)}
    header = ["OpenVINO CPU plugin, inference precision bf16 (HINT_BF16): the server's CPU needs AVX512_BF16 or AMX"]
    if max_batch:
        # The backend fixes the model's batch at max_batch_size and refuses smaller batches unless told to pad them.
        params["ENABLE_BATCH_PADDING"] = "YES"
        header.append(f"every batch is padded to {max_batch} (the backend compiles one batch size); --max-batch 0 "
                      "serves each request's own batch")
    from .runners.openvino_runner import import_openvino

    import_openvino()  # a missing OpenVINO is said before anything is written
    return chosen, params, header


def _write_openvino_ir(src: Path, folder: Path) -> str:
    """The ONNX file as OpenVINO IR, model.xml + model.bin in ``folder``, weights kept FP32; what it holds in f32.

    OpenVINO reads the ONNX file (a path: data, nothing in it runs). save_model compresses weights to FP16 by
    default; here they stay FP32, and the timestep's sinusoidal embedding is marked to stay f32 under the server's
    bf16 (runners/openvino_islands.py), so bf16 elsewhere is the only rounding the server adds.
    """
    from .runners.openvino_islands import write_held_ir
    from .runners.openvino_runner import import_openvino

    ov = import_openvino()
    return write_held_ir(ov, ov.Core().read_model(str(src)), folder / "model.xml").describe()


def write_model_repository(artifact: str | Path, repo: str | Path, *, name: str | None = None, version: int = 1,
                           instances: int = 1, kind: str | None = None, max_batch: int | None = None,
                           force: bool = False, form: str = "written", serving_attention: str = "auto",
                           attention: str | None = None, backend: str = "onnxruntime",
                           precision: str | None = None) -> TritonModel:
    """Write ``repo/name/`` for an ONNX file or an engine; refuses an existing model folder unless ``force``.

    ``form="written"`` (the default) copies an ONNX file as it is (a file
    from ``attn-export optimize --for onnxruntime`` is already ONNX Runtime's
    serving form). ``form="serving"`` writes the serving form of the file for
    the instances' kind, the form ``bench``'s onnxruntime-serving backend
    runs: FP32 attention sites as ``com.microsoft.MultiHeadAttention`` or, for
    CPU instances where that kernel's blocks would be thin, in query chunks
    (``serving_attention``: auto, multiheadattention or chunked), memory
    linear in the sequence length either way; for CPU instances the eligible
    3x3 convolutions as Winograd F(4x4, 3x3).

    ``backend="openvino"``: Triton's OpenVINO backend on CPU instances, the
    file converted to OpenVINO IR (``model.xml``/``model.bin``, the backend's
    default model file, FP32 weights) and ``precision`` bf16 set through its
    HINT_BF16 parameter (f32 and f16 cannot be pinned there; see
    :func:`_openvino_settings`). ``max_batch`` defaults to 0: the backend
    compiles a single batch size, so Triton batching would pad every batch.

    The folder is assembled next to its final place and renamed into it, so an
    interrupted run leaves either the old model or the new one, never a mix.
    """
    src = Path(artifact)
    if not src.is_file():
        raise UsageError(f"artifact not found: {src}")
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise UsageError(f"--repo {repo} exists and is not a folder")
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", src.stem)
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise UsageError(f"bad model name {name!r}: use letters, digits, '_', '-' and '.'")
    if version < 1:
        raise UsageError(f"--model-version must be a positive integer (got {version})")
    if instances < 1:
        raise UsageError(f"--instances must be at least 1 (got {instances})")
    if attention is not None:  # the old keyword, kept for one release
        import warnings

        warnings.warn("write_model_repository(attention=...) is now form='serving' with serving_attention=...; "
                      "attention= goes in the next release", DeprecationWarning, stacklevel=2)
        form = "written" if attention == "as-is" else "serving"
        serving_attention = "auto" if attention in ("onnxruntime", "as-is") else attention
    if form not in TRITON_FORMS:
        raise UsageError(f"--form must be one of {', '.join(TRITON_FORMS)} (got {form!r})")
    if backend not in ("onnxruntime", "openvino"):
        raise UsageError(f"--backend must be onnxruntime or openvino (got {backend!r})")
    if backend != "openvino" and precision is not None:
        raise UsageError("--precision sets OpenVINO's inference precision: add --backend openvino")
    ov_params: dict[str, str] = {}
    ov_precision = ""
    if backend == "openvino":
        if max_batch is None:
            max_batch = 0
        ov_precision, ov_params, ov_header = _openvino_settings(src, precision, kind, form, max_batch, instances)
    is_engine = is_engine_path(src)
    served: tuple[onnx.ModelProto, ServingForm] | None = None
    header = [f"written by attn-export from {src.name}"]
    if is_engine:
        inputs, outputs, profile_max, sidecar = _engine_io(src)
        kind = (kind or "gpu").lower()
        if kind != "gpu":
            raise UsageError("a TensorRT engine runs on the GPU only; use --kind gpu (or serve the ONNX file on CPU)")
        if max_batch is None:
            max_batch = profile_max
        elif max_batch > profile_max:
            raise UsageError(f"--max-batch {max_batch} exceeds the engine's largest profile batch {profile_max}; "
                             "rebuild the engine with a larger max batch")
        extra: list[str] = []
        platform, file_name = "tensorrt_plan", "model.plan"
        # A plan only loads on the TensorRT that built it: pick the Triton release that ships it.
        header.append(f"TensorRT {sidecar.get('tensorrt_version', '?')}, GPU {sidecar.get('gpu', {}).get('name', '?')} "
                      f"(compute capability {sidecar.get('gpu', {}).get('compute_capability', '?')}); "
                      "use a Triton release with this TensorRT version")
    else:
        inputs, outputs, extra = _onnx_io(src)
        kind = (kind or "cpu").lower()
        if max_batch is None:
            max_batch = DEFAULT_ONNX_MAX_BATCH
        platform, file_name = "onnxruntime_onnx", "model.onnx"
        if backend == "openvino":
            platform, file_name, extra = "", "model.xml", []  # the IR holds the weights in model.bin
            header += ov_header
    if kind not in ("gpu", "cpu"):
        raise UsageError(f"--kind must be gpu or cpu (got {kind!r})")
    if not is_engine and form == "serving":
        served = _onnxruntime_form(src, kind, serving_attention)
        if served is not None:
            if served[1].attention_sites:
                header.append(f"attention: {served[1].attention_sites} site(s) as {served[1].attention_kind} "
                              "(memory linear in the sequence length)")
            if served[1].winograd_convolutions:
                header.append(f"convolutions: {served[1].winograd_convolutions} 3x3 as Winograd F(4x4, 3x3) "
                              "(faster on ONNX Runtime's CPU provider)")
            header.append(f"{src.name} itself keeps the standard form TensorRT reads")
    if max_batch < 0:
        raise UsageError(f"--max-batch must be 0 (no batching) or more (got {max_batch})")
    if max_batch > 0:
        unbatched = [t.name for t in inputs + outputs if not t.dims or t.dims[0] not in (-1,)]
        if unbatched and not is_engine:
            raise UsageError(f"tensor(s) {', '.join(unbatched)} have a fixed first dim, so Triton cannot batch them; "
                             "use --max-batch 0")
    text = config_text(name, platform, inputs, outputs, max_batch_size=max_batch, instances=instances, kind=kind,
                       header=header, backend="openvino" if backend == "openvino" else "", parameters=ov_params)
    validated = False
    try:
        parse_config(text)
        validated = True
    except ImportError:
        pass  # tritonclient is optional: the config is still written, reported as not validated
    except Exception as exc:  # noqa: BLE001 - protobuf's ParseError: our bug, but say it in one line
        raise UsageError(f"generated config.pbtxt does not parse as a Triton ModelConfig: {exc}") from None

    model_dir = repo / name
    if model_dir.exists() and not force:
        raise UsageError(f"model folder exists: {model_dir} (use --force to replace it)")
    repo.mkdir(parents=True, exist_ok=True)
    copied: list[Path] = []
    islands = ""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=repo))
    try:
        vdir = tmp / str(version)
        vdir.mkdir()
        if served is not None:
            import onnx

            # Initializers kept outside still name their data file, copied unchanged below.
            onnx.save_model(served[0], str(vdir / file_name))
        elif backend == "openvino":
            islands = _write_openvino_ir(src, vdir)
            copied.append(model_dir / str(version) / "model.bin")
        else:
            shutil.copyfile(src, vdir / file_name)
        for loc in extra:
            data = src.parent / loc
            if not data.is_file():
                raise UsageError(f"{src.name} refers to external data {loc} that is not next to it")
            # Same relative name: the ONNX file records it, so it must not be renamed.
            (vdir / loc).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data, vdir / loc)
            copied.append(model_dir / str(version) / loc)
        (tmp / "config.pbtxt").write_text(text, encoding="utf-8")
        _readable_by_all(tmp)
        old = None
        try:
            with signals_deferred():  # the old folder moves aside and the new one in as one step
                if model_dir.exists():
                    old = repo / f".{name}.old-{os.getpid()}"
                    os.replace(model_dir, old)
                os.replace(tmp, model_dir)
        finally:  # a signal held during the swap is raised as it ends: the old folder still goes
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TritonModel(name=name, platform=platform, model_dir=model_dir,
                       model_file=model_dir / str(version) / file_name, config_path=model_dir / "config.pbtxt",
                       config_text=text, max_batch_size=max_batch, inputs=inputs, outputs=outputs, copied=copied,
                       validated=validated, attention_rewritten=served[1].attention_sites if served else 0,
                       attention_kind=served[1].attention_kind if served else "",
                       winograd_rewritten=served[1].winograd_convolutions if served else 0,
                       backend="openvino" if backend == "openvino" else "", precision=ov_precision,
                       f32_islands=islands)
