"""Build a TensorRT or TensorRT-RTX engine from an exported ONNX file, via Polygraphy.

One builder for both runtimes (:mod:`.runtime` holds what differs): parse
the ONNX with the runtime's parser, mark every attention layer decomposable
(Polygraphy's ``SetDecomposableAttentions``: the builder picks a fused kernel
where one exists and separate kernels where none does, instead of failing the
whole build), build the serialized plan with Polygraphy's
``EngineBytesFromNetwork`` and read what the builder did: from the engine
inspector where this machine can deserialize the plan (a GPU), else from the
builder's DETAILED layer log (TensorRT-RTX on a CPU). The plan and its
sidecar are put in place together.

TensorRT is reached through :data:`.runtime.trt`, which forwards to the
selected runtime's module, so this module imports (and
:func:`require_runtime` reports clearly) on machines without either.

The build is strongly typed: precision comes from the ONNX's own types (the
FP16 export variant), never from ``BuilderFlag.FP16``, which TensorRT 11
removed. On 10.12-10.x the network is created with the STRONGLY_TYPED flag;
on 11.x strong typing is the only mode.

TensorRT objects carry their real types (``tensorrt`` is imported for the type
checker only), so ``tests/trt_api`` can check every call here against the
real bindings of each supported version. That check proves API conformance
only; it does not build or run an engine.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, SupportsInt

from ..atomic import check_output_path, publish_together
from ..errors import CheckFailed, EngineFailed, MissingDependencyError, UsageError
from ..files import file_sha256
from ..progress import ProgressFn
from ..spec import ModelSpec
from . import runtime as runtimes
from .fusion import FusionReport, build_log_report, fusion_report
from .profiles import Profile, default_profile, tensor_shapes
from .readiness import ReadinessReport, predicted_fusable, predicted_unfused
from .runtime import RTX, TENSORRT, Runtime
from .sidecar import make_sidecar, sidecar_json, sidecar_path

if TYPE_CHECKING:  # typed as the real module; at run time `trt` forwards to the selected runtime's module
    import numpy as np
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork
    from polygraphy.backend.trt import Profile as PolyProfile
else:
    from .runtime import trt

INSTALL_HINT = TENSORRT.install_hint
HARDWARE_LEVELS = ("none", "ampere_plus", "same_compute_capability")
VERBOSITY = ("detailed", "layer_names_only", "none")
# TensorRT data types an attn-export engine can have at its I/O (FP32 images, int64/int32/FP32 timesteps,
# FP16 I/O from foreign ONNX files); each must map to a numpy (and torch) dtype.
IO_DTYPE_NAMES = ("float32", "float16", "int32", "int64", "bool")


@dataclass
class GpuInfo:
    """The CUDA device a build or run uses."""

    name: str
    compute_capability: str  # "X.Y"


@dataclass
class BuildResult:
    """What :func:`build_plan` produced."""

    engine_path: Path
    sidecar_path: Path
    seconds: float
    size_bytes: int
    tensorrt_version: str
    gpu: GpuInfo | None          # None: built without a GPU (TensorRT-RTX ahead of time)
    profiles: list[Profile]
    fusion: FusionReport
    readiness: ReadinessReport
    sidecar: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    runtime: str = "tensorrt"
    compute_capabilities: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- environment
def _libcuda() -> Any | None:
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def gpu_info(device: int = 0) -> GpuInfo | None:
    """Name and compute capability of CUDA device ``device`` via the driver API; None if there is no GPU.

    Uses libcuda directly (no torch or cuda-python import), so it is cheap and
    works wherever the NVIDIA driver is installed.
    """
    lib = _libcuda()
    if lib is None:
        return None
    try:
        if lib.cuInit(0) != 0:
            return None
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= device:
            return None
        dev = ctypes.c_int(0)
        if lib.cuDeviceGet(ctypes.byref(dev), device) != 0:
            return None
        buf = ctypes.create_string_buffer(256)
        lib.cuDeviceGetName(buf, 256, dev)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76 (cuda.h)
        lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
        lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
        return GpuInfo(buf.value.decode(errors="replace"), f"{major.value}.{minor.value}")
    except (AttributeError, OSError):
        return None


def require_tensorrt(what: str = "building a TensorRT engine") -> GpuInfo:
    """Raise MissingDependencyError (one line) unless TensorRT and an NVIDIA GPU are present."""
    has_trt = importlib.util.find_spec("tensorrt") is not None
    gpu = gpu_info()
    if has_trt and gpu is not None:
        return gpu
    if not has_trt and gpu is None:
        missing = "TensorRT is not installed and no NVIDIA GPU is visible"
    elif not has_trt:
        missing = "TensorRT is not installed"
    else:
        missing = "no NVIDIA GPU is visible (TensorRT is installed but CUDA found no device)"
    raise MissingDependencyError(f"{what} needs TensorRT and an NVIDIA GPU: {missing}; {INSTALL_HINT}")


def require_runtime(runtime: Runtime, what: str = "building an engine") -> GpuInfo | None:
    """Select ``runtime`` and return the GPU it will use; MissingDependencyError (one line) if it cannot run here.

    TensorRT needs its module and an NVIDIA GPU. TensorRT-RTX builds without
    a GPU: its GPU is returned when there is one, else None.
    """
    if runtime is TENSORRT:
        gpu = require_tensorrt(what)
        runtimes.select(runtime)
        return gpu
    runtimes.select(runtime)  # MissingDependencyError when tensorrt_rtx is not installed
    return gpu_info()


def require_gpu_runtime(runtime: Runtime, what: str) -> GpuInfo:
    """Select ``runtime`` for running an engine: its module and an NVIDIA GPU, else MissingDependencyError (one line)."""
    gpu = require_runtime(runtime, what)
    if gpu is None:
        raise MissingDependencyError(f"{what} needs an NVIDIA GPU: none is visible ({runtime.display} builds without one, "
                                     "but an engine runs only on a GPU)")
    return gpu


def trt_version() -> tuple[int, int]:
    """(major, minor) of the selected runtime's module, e.g. (10, 14) for TensorRT or (1, 7) for TensorRT-RTX."""
    major, minor = str(trt.__version__).split(".")[:2]
    return int(major), int(minor)


# --------------------------------------------------------------------------- API names
# Each enum member is named literally (never getattr with a string), so the type
# checker sees every member against the real bindings.
def hardware_level(name: str) -> trt.HardwareCompatibilityLevel:
    """The TensorRT hardware-compatibility level for ``--hardware-compatibility NAME``."""
    levels = {
        "none": trt.HardwareCompatibilityLevel.NONE,
        "ampere_plus": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
        "same_compute_capability": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY,
    }
    return levels[name]


def profiling_verbosity(name: str) -> trt.ProfilingVerbosity:
    """The TensorRT profiling verbosity for ``detailed`` / ``layer_names_only`` / ``none``."""
    levels = {
        "detailed": trt.ProfilingVerbosity.DETAILED,
        "layer_names_only": trt.ProfilingVerbosity.LAYER_NAMES_ONLY,
        "none": trt.ProfilingVerbosity.NONE,
    }
    return levels[name]


def network_flags(strongly_typed: bool) -> int:
    """``create_network`` flags: STRONGLY_TYPED on TensorRT 10.x and TensorRT-RTX; 0 on TensorRT 11.x.

    TensorRT 11 types every network strongly (the flag is ignored there);
    TensorRT-RTX supports strongly typed networks only and warns unless the
    flag is given.
    """
    if strongly_typed and (runtimes.selected() is RTX or trt_version() < (11, 0)):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def io_dtypes() -> list[trt.DataType]:
    """The TensorRT data types of IO_DTYPE_NAMES."""
    table = {"float32": trt.float32, "float16": trt.float16, "int32": trt.int32, "int64": trt.int64, "bool": trt.bool}
    return [table[n] for n in IO_DTYPE_NAMES]


def numpy_dtype(dtype: trt.DataType) -> np.dtype[Any]:
    """The numpy dtype of an engine I/O tensor's TensorRT data type."""
    import numpy as np

    return np.dtype(trt.nptype(dtype))


def dims_list(dims: trt.Dims) -> list[int]:
    """A ``trt.Dims`` as a list of ints (indexed: the bindings declare no ``__iter__``)."""
    return [int(dims[i]) for i in range(len(dims))]


def is_input(engine: trt.ICudaEngine, name: str) -> bool:
    """Whether I/O tensor ``name`` of ``engine`` is an input."""
    return engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT


# --------------------------------------------------------------------------- progress
def make_progress_monitor(progress: ProgressFn) -> trt.IProgressMonitor:
    """A ``trt.IProgressMonitor`` reporting each build step to ``progress``.

    The text is the path of open phases ("Building engine > Tactics"), with
    the innermost phase's step count. Defined lazily because the base class
    lives in ``tensorrt``. A KeyboardInterrupt cannot escape a TensorRT
    callback, so one raised by ``progress`` (Ctrl-C) sets a flag and the next
    ``step_complete`` returns False, which cancels the build.
    """
    class CallbackProgressMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.phases: dict[str, int] = {}  # open phases, outermost first, with their step counts
            self.cancelled = False

        def _report(self, phase_name: str, done: int) -> None:
            try:
                progress(" > ".join(self.phases) or phase_name, done, self.phases.get(phase_name, 1))
            except KeyboardInterrupt:
                self.cancelled = True

        # Parameter types as wide as the bindings' (SupportsInt), so the overrides are valid subclass methods.
        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: SupportsInt) -> None:
            self.phases[phase_name] = max(int(num_steps), 1)
            self._report(phase_name, 0)

        def step_complete(self, phase_name: str, step: SupportsInt) -> bool:
            if phase_name in self.phases:
                self._report(phase_name, int(step) + 1)
            return not self.cancelled

        def phase_finish(self, phase_name: str) -> None:
            self.phases.pop(phase_name, None)

    return CallbackProgressMonitor()


# --------------------------------------------------------------------------- logging
class BuildLog:
    """What the builder said: its DETAILED layer list (kept whole) and its errors (kept to the last few)."""

    def __init__(self) -> None:
        self.layer_lines: list[str] = []
        self.errors: list[str] = []

    def add(self, severe: bool, msg: str) -> None:
        if "LayerType: " in msg and "Name: " in msg:
            self.layer_lines.append(msg)
        elif severe:
            self.errors = (self.errors + [" ".join(msg.split())])[-8:]

    @property
    def layers_text(self) -> str:
        return "\n".join(self.layer_lines)


def make_logger(log: BuildLog) -> trt.ILogger:
    """A ``trt.ILogger`` that hands every message to ``log`` (the layer list comes at VERBOSE severity)."""

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            log.add(severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR), str(msg))

    return CapturingLogger()


# --------------------------------------------------------------------------- Polygraphy
# Construction only (Polygraphy builds when the loader is called), so tests/trt_api runs these
# against Polygraphy's real signatures without TensorRT's libraries.
def polygraphy_profiles(shapes: Sequence[Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]]) -> list[PolyProfile]:
    """One Polygraphy Profile per {input name: (min, opt, max)} mapping."""
    from polygraphy.backend.trt import Profile as PolyProfile

    out = []
    for table in shapes:
        pp = PolyProfile()
        for name, (lo, op, hi) in table.items():
            pp.add(name, min=lo, opt=op, max=hi)
        out.append(pp)
    return out


def polygraphy_config(profiles: list[PolyProfile], *, opt_level: int, hardware_compatibility: str, verbosity: str,
                      workspace: int | None, timing_cache: str | Path | None,
                      monitor: trt.IProgressMonitor | None,
                      compute_capabilities: Sequence[str] | None = None) -> CreateConfig:
    """Polygraphy's config loader for a strongly typed build (no precision flags).

    TensorRT: ``CreateConfig`` with the hardware-compatibility level.
    TensorRT-RTX: ``CreateConfigRTX`` with the target compute capabilities
    (None: the runtime's default targets); it has no hardware-compatibility
    level of its own (portability is the compute-capability list).
    """
    common: dict[str, Any] = dict(
        profiles=profiles,
        builder_optimization_level=int(opt_level),
        profiling_verbosity=profiling_verbosity(verbosity),
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace)} if workspace else None,
        load_timing_cache=str(timing_cache) if timing_cache and Path(timing_cache).is_file() else None,
        progress_monitor=monitor,
    )
    if runtimes.selected() is RTX:
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        caps = [(int(c.split(".")[0]), int(c.split(".")[1])) for c in compute_capabilities] if compute_capabilities else None
        return CreateConfigRTX(compute_capabilities=caps, **common)
    from polygraphy.backend.trt import CreateConfig

    return CreateConfig(hardware_compatibility_level=hardware_level(hardware_compatibility), **common)


def polygraphy_loader(network: tuple[trt.Builder, trt.INetworkDefinition, trt.OnnxParser], config: CreateConfig,
                      timing_cache: str | Path | None) -> EngineBytesFromNetwork:
    """Polygraphy's EngineBytesFromNetwork over a network whose attention layers are marked decomposable.

    Calling it builds the serialized plan (no deserialization: that needs a
    GPU). Runtimes without attention layers (TensorRT before 10.14, which
    parse no Attention op) get the network as parsed.
    """
    from polygraphy.backend.trt import EngineBytesFromNetwork, SetDecomposableAttentions

    source = SetDecomposableAttentions(network) if attention_layers_supported() else network
    return EngineBytesFromNetwork(source, config=config, save_timing_cache=str(timing_cache) if timing_cache else None)


def attention_layers_supported() -> bool:
    """Whether the selected runtime has IAttention layers (TensorRT 10.14+, TensorRT-RTX), which can be decomposable."""
    return hasattr(trt.LayerType, "ATTENTION_INPUT")


# --------------------------------------------------------------------------- build steps
def _parse_network(onnx_path: Path, strongly_typed: bool,
                   logger: trt.ILogger) -> tuple[trt.Builder, trt.INetworkDefinition, trt.OnnxParser]:
    """Builder, network and parser for the ONNX; UsageError (exit 2) naming the first node the parser refused.

    Parsed here rather than with Polygraphy's ``NetworkFromOnnxPath`` so that
    each parser error can be reported with its node name and operator
    (Polygraphy only logs them); the tuple is then handed to Polygraphy's
    loaders, which accept (builder, network, parser).
    """
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    if not ok or parser.num_errors:
        lines = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            # node_name()/node_operator() exist on IParserError since TensorRT 9.1; fall back to str(err).
            node, desc = "", str(err)
            with contextlib.suppress(Exception):
                desc = err.desc()
            with contextlib.suppress(Exception):
                node = f"node {err.node_name()} ({err.node_operator()}): " if err.node_name() else ""
            lines.append(" ".join(f"{node}{desc}".split()))
        first = lines[0] if lines else "unknown parser error"
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise UsageError(f"{runtimes.selected().display} could not parse {onnx_path.name}: {first}{more}")
    return builder, network, parser


def _io_table(engine: trt.ICudaEngine) -> list[dict[str, Any]]:
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if is_input(engine, name) else "output"
        dtype = numpy_dtype(engine.get_tensor_dtype(name)).name
        out.append({"name": name, "mode": mode, "dtype": dtype, "shape": dims_list(engine.get_tensor_shape(name))})
    return out


def _network_io_table(network: trt.INetworkDefinition) -> list[dict[str, Any]]:
    """The I/O table read off the network definition (what the engine has, where it cannot be deserialized)."""
    out = []
    for mode, count, get in (("input", network.num_inputs, network.get_input), ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            t = get(i)
            out.append({"name": t.name, "mode": mode, "dtype": numpy_dtype(t.dtype).name, "shape": dims_list(t.shape)})
    return out


def _precision(model_path: Path, spec: ModelSpec) -> str:
    """'fp16' / 'fp32' / 'mixed' from the spec, else from the ONNX initializer types."""
    if spec.precision in ("fp16", "fp32", "mixed"):
        return spec.precision
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    kinds = {i.data_type for i in model.graph.initializer
             if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)}
    if kinds == {onnx.TensorProto.FLOAT} or not kinds:
        return "fp32"
    return "fp16" if onnx.TensorProto.FLOAT not in kinds else "mixed"


def _inspect(plan: bytes, logger: trt.ILogger) -> tuple[str, list[dict[str, Any]]]:
    """Deserialize ``plan`` on this GPU and return (inspector JSON, I/O table)."""
    runtime = trt.Runtime(logger)
    engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineFailed(f"{runtimes.selected().display} could not load the engine it just built")
    inspector = engine.create_engine_inspector()
    return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON)), _io_table(engine)


def unfused_failure(report: FusionReport, readiness: ReadinessReport) -> str | None:
    """The exit-1 message when a site the readiness rules expect to fuse was not fused (None: nothing to refuse).

    Sites with no fused kernel for their types and shapes (FP32, a head size
    outside the kernels' window, one head at batch 1) are expected to run as
    separate kernels: they are listed in warnings, not refused.
    """
    expected = predicted_fusable(readiness)
    surprises = [b for b in report.unfused if b.name in expected]
    if not surprises:
        return None
    listed = "; ".join(f"{b.name}: {b.verdict} ({b.reason})" for b in report.unfused)
    return (f"{len(surprises)} attention site(s) that should fuse were not fused by the builder "
            f"({len(report.blocks) - len(report.unfused)} of {len(report.blocks)} fused): {listed}; "
            "nothing was written (pass --allow-unfused to write the engine anyway)")


def build_plan(
    onnx_path: str | Path,
    engine_path: str | Path,
    profiles: Sequence[Profile] | None,
    readiness: ReadinessReport,
    *,
    runtime: str = "tensorrt",
    compute_capabilities: Sequence[str] | None = None,
    workspace: int | None = None,
    opt_level: int = 3,
    timing_cache: str | Path | None = None,
    hardware_compatibility: str = "none",
    strongly_typed: bool = True,
    verbosity: str = "detailed",
    allow_unfused: bool = False,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> BuildResult:
    """Build ``engine_path`` (plus its sidecar ``<engine>.json``) from an ONNX file that passed ``readiness``.

    The build step alone: :func:`attn_export.build_engine` is the whole
    command (FP16 conversion, profile checks, one readiness run, this).
    ``runtime``: "tensorrt" (needs a GPU) or "rtx" (TensorRT-RTX; builds on a
    CPU). ``compute_capabilities``: TensorRT-RTX targets such as ["8.6"]
    (None: its default, Ampere and later). ``profiles``: optimization
    profiles (None: :func:`default_profile`). ``workspace``: workspace pool
    limit in bytes (None: the builder's default). ``opt_level``: builder
    optimization level 0-5. ``timing_cache``: a file loaded if present and
    saved (merged) after the build. ``hardware_compatibility`` (TensorRT):
    "none", "ampere_plus" or "same_compute_capability". ``verbosity``:
    profiling verbosity ("detailed" is needed for the fusion report).
    ``allow_unfused``: write the engine even when a site the readiness rules
    expect to fuse was not fused (otherwise CheckFailed, exit 1, and nothing
    is written). ``progress`` receives the build phases. Order of checks:
    output path, options, runtime (MissingDependencyError), then the build.
    The engine and its sidecar are put in place together.
    """
    onnx_path = Path(onnx_path)
    out = check_output_path(engine_path, force=force)
    rt = runtimes.get_runtime(runtime)
    if hardware_compatibility not in HARDWARE_LEVELS:
        raise UsageError(f"unknown hardware compatibility {hardware_compatibility!r}; use one of {', '.join(HARDWARE_LEVELS)}")
    if verbosity not in VERBOSITY:
        raise UsageError(f"unknown profiling verbosity {verbosity!r}; use one of {', '.join(VERBOSITY)}")
    if not 0 <= int(opt_level) <= 5:
        raise UsageError(f"builder optimization level must be 0..5 (got {opt_level})")
    caps = check_compute_capabilities(rt, compute_capabilities)
    check_timing_cache(rt, timing_cache)
    gpu = require_runtime(rt)
    if importlib.util.find_spec("polygraphy") is None:
        raise MissingDependencyError(f"building an engine needs Polygraphy: {rt.install_hint}")

    readiness.raise_for_errors()
    spec = readiness.spec
    if spec is None:
        raise UsageError(f"{onnx_path} carries no attn-export description; export it with `attn-export onnx`")
    profiles = list(profiles) if profiles else [default_profile(spec)]
    warnings = [str(f).removeprefix("warning: ") for f in readiness.warnings]

    log = BuildLog()
    logger = make_logger(log)
    t0 = time.perf_counter()
    poly_profiles = polygraphy_profiles([tensor_shapes(p, spec) for p in profiles])
    config = polygraphy_config(poly_profiles, opt_level=opt_level, hardware_compatibility=hardware_compatibility,
                               verbosity=verbosity, workspace=workspace, timing_cache=timing_cache,
                               monitor=make_progress_monitor(progress) if progress is not None else None,
                               compute_capabilities=caps)
    network = _parse_network(onnx_path, strongly_typed, logger)
    loader = polygraphy_loader(network, config, timing_cache)
    from polygraphy.logger import G_LOGGER

    try:
        # Polygraphy's own log lines would interleave with the command's output; the builder's go to `log`.
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            plan = bytes(loader())
    except Exception as exc:  # noqa: BLE001 - Polygraphy raises PolygraphyException on build failure
        said = log.errors[-1] if log.errors else (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise EngineFailed(
            f"{rt.display} could not build {onnx_path.name}: {said} ({len(readiness.attention)} attention site(s) in it; "
            "an out-of-memory build often reports 'Could not find any implementation'; try a smaller max profile or a larger workspace)"
        ) from None
    seconds = time.perf_counter() - t0

    report, io = _read_engine(plan, logger, log, network[1], readiness, inspect=gpu is not None, fallback=rt is RTX)
    refusal = unfused_failure(report, readiness)
    if refusal and not allow_unfused:
        raise CheckFailed(refusal)
    warnings += [f"attention site {b.name} not fused: {b.verdict} ({b.reason})" for b in report.unfused]

    sidecar = make_sidecar(
        engine_path=out, engine_sha256=hashlib.sha256(plan).hexdigest(), tensorrt_version=runtimes.version(),
        runtime=rt.name, gpu_name=gpu.name if gpu else None, compute_capability=gpu.compute_capability if gpu else None,
        compute_capabilities=caps,
        profiles=profiles, spec=spec, io=io, onnx_path=onnx_path.resolve(), onnx_sha256=file_sha256(onnx_path),
        precision=_precision(onnx_path, spec), fusion=report.to_dict(), hardware_compatibility=hardware_compatibility,
        build={
            "seconds": round(seconds, 3), "builder_optimization_level": int(opt_level), "workspace_bytes": workspace,
            "timing_cache": str(timing_cache) if timing_cache else None, "strongly_typed": bool(strongly_typed),
            "attention_decomposable": attention_layers_supported(), "fusion_source": report.source,
        },
    )
    side = sidecar_path(out)
    publish_together([(out, plan), (side, sidecar_json(sidecar).encode("utf-8"))])
    return BuildResult(
        engine_path=out, sidecar_path=side, seconds=seconds, size_bytes=len(plan), tensorrt_version=runtimes.version(),
        gpu=gpu, profiles=profiles, fusion=report, readiness=readiness, sidecar=sidecar, warnings=warnings,
        runtime=rt.name, compute_capabilities=list(caps),
    )


def _read_engine(plan: bytes, logger: trt.ILogger, log: BuildLog, network: trt.INetworkDefinition,
                 readiness: ReadinessReport, *, inspect: bool, fallback: bool) -> tuple[FusionReport, list[dict[str, Any]]]:
    """The fusion report and I/O table: from the engine inspector where a GPU is here, else from the build log.

    ``fallback``: a plan this GPU cannot load (a TensorRT-RTX engine built
    for other compute capabilities) is read from the build log instead.
    """
    if inspect:
        try:
            info, io = _inspect(plan, logger)
            return fusion_report(info, readiness.attention, predicted_unfused(readiness)), io
        except EngineFailed:
            if not fallback:
                raise
    return build_log_report(log.layers_text, readiness.attention, predicted_unfused(readiness)), _network_io_table(network)


def check_timing_cache(rt: Runtime, timing_cache: str | Path | None) -> None:
    """TensorRT-RTX has no builder timing cache (its timing-cache calls are no-ops since 1.2): refuse the option there."""
    if timing_cache and rt is RTX:
        raise UsageError("--timing-cache is a TensorRT option: TensorRT-RTX's timing-cache calls are no-ops since 1.2 "
                         "(its tuning happens when the engine first runs on a GPU)")


def check_compute_capabilities(rt: Runtime, caps: Sequence[str] | None) -> list[str]:
    """The compute capabilities to target: ``caps`` checked against what ``rt`` accepts, or its default list."""
    if not caps:
        return list(rt.default_compute_capabilities)
    if rt is not RTX:
        raise UsageError("--compute-capability is a TensorRT-RTX option (use --hardware-compatibility with TensorRT)")
    out = []
    for c in caps:
        c = c.strip()
        if c not in rt.compute_capabilities:
            raise UsageError(f"compute capability {c!r} is not one TensorRT-RTX builds for; use one of {', '.join(rt.compute_capabilities)}")
        if c not in out:
            out.append(c)
    return out
