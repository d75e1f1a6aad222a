"""Build a TensorRT engine from an exported ONNX file, via Polygraphy.

Everything that needs ``tensorrt`` is imported inside functions, so this
module imports (and :func:`require_tensorrt` reports clearly) on machines
without TensorRT or a GPU.

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
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, SupportsInt

from ..atomic import check_output_path, write_bytes_atomic
from ..errors import EngineFailed, MissingDependencyError, UsageError
from ..files import file_sha256
from ..progress import ProgressFn
from ..spec import ModelSpec
from .fusion import FusionReport, fusion_report
from .profiles import Profile, default_profile, tensor_shapes
from .readiness import ReadinessReport
from .sidecar import make_sidecar, sidecar_path, write_sidecar

if TYPE_CHECKING:  # the real import stays inside the functions: this module imports without TensorRT
    import numpy as np
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork
    from polygraphy.backend.trt import Profile as PolyProfile

INSTALL_HINT = (
    'install it with `pip install "attn-export[trt]"` (the tensorrt wheel must match the CUDA major '
    "version: tensorrt-cu12 or tensorrt-cu13) on a machine with an NVIDIA GPU and its driver"
)
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
    gpu: GpuInfo
    profiles: list[Profile]
    fusion: FusionReport
    readiness: ReadinessReport
    sidecar: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


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


def trt_version() -> tuple[int, int]:
    """(major, minor) of the installed TensorRT, e.g. (10, 14)."""
    import tensorrt as trt

    major, minor = str(trt.__version__).split(".")[:2]
    return int(major), int(minor)


# --------------------------------------------------------------------------- API names
# Each enum member is named literally (never getattr with a string), so the type
# checker sees every member against the real bindings.
def hardware_level(name: str) -> trt.HardwareCompatibilityLevel:
    """The TensorRT hardware-compatibility level for ``--hardware-compatibility NAME``."""
    import tensorrt as trt

    levels = {
        "none": trt.HardwareCompatibilityLevel.NONE,
        "ampere_plus": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
        "same_compute_capability": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY,
    }
    return levels[name]


def profiling_verbosity(name: str) -> trt.ProfilingVerbosity:
    """The TensorRT profiling verbosity for ``detailed`` / ``layer_names_only`` / ``none``."""
    import tensorrt as trt

    levels = {
        "detailed": trt.ProfilingVerbosity.DETAILED,
        "layer_names_only": trt.ProfilingVerbosity.LAYER_NAMES_ONLY,
        "none": trt.ProfilingVerbosity.NONE,
    }
    return levels[name]


def network_flags(strongly_typed: bool) -> int:
    """``create_network`` flags: STRONGLY_TYPED on 10.x; 0 on 11.x, where strong typing is the only mode."""
    import tensorrt as trt

    if trt_version() < (11, 0) and strongly_typed:
        # 10.x: weak typing is the default (deprecated since 10.12); ask for strong typing.
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def io_dtypes() -> list[trt.DataType]:
    """The TensorRT data types of IO_DTYPE_NAMES."""
    import tensorrt as trt

    table = {"float32": trt.float32, "float16": trt.float16, "int32": trt.int32, "int64": trt.int64, "bool": trt.bool}
    return [table[n] for n in IO_DTYPE_NAMES]


def numpy_dtype(dtype: trt.DataType) -> np.dtype[Any]:
    """The numpy dtype of an engine I/O tensor's TensorRT data type."""
    import numpy as np
    import tensorrt as trt

    return np.dtype(trt.nptype(dtype))


def dims_list(dims: trt.Dims) -> list[int]:
    """A ``trt.Dims`` as a list of ints (indexed: the bindings declare no ``__iter__``)."""
    return [int(dims[i]) for i in range(len(dims))]


def is_input(engine: trt.ICudaEngine, name: str) -> bool:
    """Whether I/O tensor ``name`` of ``engine`` is an input."""
    import tensorrt as trt

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
    import tensorrt as trt

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
                      monitor: trt.IProgressMonitor | None) -> CreateConfig:
    """Polygraphy's CreateConfig for a strongly typed build (no precision flags)."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig

    return CreateConfig(
        profiles=profiles,
        builder_optimization_level=int(opt_level),
        hardware_compatibility_level=hardware_level(hardware_compatibility),
        profiling_verbosity=profiling_verbosity(verbosity),
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace)} if workspace else None,
        load_timing_cache=str(timing_cache) if timing_cache and Path(timing_cache).is_file() else None,
        progress_monitor=monitor,
    )


def polygraphy_loader(network: tuple[trt.Builder, trt.INetworkDefinition, trt.OnnxParser], config: CreateConfig,
                      timing_cache: str | Path | None) -> EngineFromNetwork:
    """Polygraphy's EngineFromNetwork; calling it builds the engine."""
    from polygraphy.backend.trt import EngineFromNetwork

    return EngineFromNetwork(network, config=config, save_timing_cache=str(timing_cache) if timing_cache else None)


# --------------------------------------------------------------------------- build steps
def _parse_network(onnx_path: Path, strongly_typed: bool) -> tuple[trt.Builder, trt.INetworkDefinition, trt.OnnxParser]:
    """Builder, network and parser for the ONNX; UsageError listing parser errors with node names.

    Parsed here rather than with Polygraphy's ``NetworkFromOnnxPath`` so that
    each parser error can be reported with its node name and operator
    (Polygraphy only logs them); the tuple is then handed to Polygraphy's
    ``EngineFromNetwork``, which accepts (builder, network, parser).
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
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
            lines.append(f"{node}{desc}".replace("\n", " "))
        first = lines[0] if lines else "unknown parser error"
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise EngineFailed(f"TensorRT could not parse {onnx_path.name}: {first}{more}")
    return builder, network, parser


def _io_table(engine: trt.ICudaEngine) -> list[dict[str, Any]]:
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if is_input(engine, name) else "output"
        dtype = numpy_dtype(engine.get_tensor_dtype(name)).name
        out.append({"name": name, "mode": mode, "dtype": dtype, "shape": dims_list(engine.get_tensor_shape(name))})
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


def build_plan(
    onnx_path: str | Path,
    engine_path: str | Path,
    profiles: Sequence[Profile] | None,
    readiness: ReadinessReport,
    *,
    workspace: int | None = None,
    opt_level: int = 3,
    timing_cache: str | Path | None = None,
    hardware_compatibility: str = "none",
    strongly_typed: bool = True,
    verbosity: str = "detailed",
    force: bool = False,
    progress: ProgressFn | None = None,
) -> BuildResult:
    """Build ``engine_path`` (plus its sidecar ``<engine>.json``) from an ONNX file that passed ``readiness``.

    The build step alone: :func:`attn_export.build_engine` is the whole
    command (FP16 conversion, profile checks, one readiness run, this).
    ``profiles``: optimization profiles (None: :func:`default_profile`).
    ``workspace``: workspace pool limit in bytes (None: TensorRT's default).
    ``opt_level``: builder optimization level 0-5. ``timing_cache``: a file
    loaded if present and saved (merged) after the build.
    ``hardware_compatibility``: "none", "ampere_plus" or
    "same_compute_capability". ``verbosity``: profiling verbosity
    ("detailed" is needed for the fusion report). ``progress`` receives
    TensorRT's build phases. Order of checks: output path, options, TensorRT
    + GPU (MissingDependencyError), then the build. The engine file is
    written atomically.
    """
    onnx_path = Path(onnx_path)
    out = check_output_path(engine_path, force=force)
    if hardware_compatibility not in HARDWARE_LEVELS:
        raise UsageError(f"unknown hardware compatibility {hardware_compatibility!r}; use one of {', '.join(HARDWARE_LEVELS)}")
    if verbosity not in VERBOSITY:
        raise UsageError(f"unknown profiling verbosity {verbosity!r}; use one of {', '.join(VERBOSITY)}")
    if not 0 <= int(opt_level) <= 5:
        raise UsageError(f"builder optimization level must be 0..5 (got {opt_level})")
    gpu = require_tensorrt()
    if importlib.util.find_spec("polygraphy") is None:
        raise MissingDependencyError(f"building a TensorRT engine needs Polygraphy: {INSTALL_HINT}")

    import tensorrt as trt

    readiness.raise_for_errors()
    spec = readiness.spec
    if spec is None:
        raise UsageError(f"{onnx_path} carries no attn-export description; export it with `attn-export onnx`")
    profiles = list(profiles) if profiles else [default_profile(spec)]
    warnings = [str(f) for f in readiness.warnings]

    poly_profiles = polygraphy_profiles([tensor_shapes(p, spec) for p in profiles])

    t0 = time.perf_counter()
    config = polygraphy_config(poly_profiles, opt_level=opt_level, hardware_compatibility=hardware_compatibility,
                               verbosity=verbosity, workspace=workspace, timing_cache=timing_cache,
                               monitor=make_progress_monitor(progress) if progress is not None else None)
    loader = polygraphy_loader(_parse_network(onnx_path, strongly_typed), config, timing_cache)
    try:
        engine: trt.ICudaEngine = loader()
    except Exception as exc:  # noqa: BLE001 - Polygraphy raises PolygraphyException on build failure
        msg = str(exc).strip().splitlines()
        raise EngineFailed(
            f"TensorRT could not build {onnx_path.name}: {msg[-1] if msg else type(exc).__name__} "
            "(an out-of-memory build often reports 'Could not find any implementation'; try a smaller max profile or a larger workspace)"
        ) from None
    seconds = time.perf_counter() - t0

    plan = bytes(engine.serialize())
    write_bytes_atomic(out, plan)

    inspector = engine.create_engine_inspector()
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    report = fusion_report(info, readiness.attention)

    sidecar = make_sidecar(
        engine_path=out, engine_sha256=file_sha256(out), tensorrt_version=str(trt.__version__),
        gpu_name=gpu.name, compute_capability=gpu.compute_capability, profiles=profiles, spec=spec,
        io=_io_table(engine), onnx_path=onnx_path.resolve(), onnx_sha256=file_sha256(onnx_path),
        precision=_precision(onnx_path, spec), fusion=report.to_dict(), hardware_compatibility=hardware_compatibility,
        build={
            "seconds": round(seconds, 3), "builder_optimization_level": int(opt_level), "workspace_bytes": workspace,
            "timing_cache": str(timing_cache) if timing_cache else None, "strongly_typed": bool(strongly_typed),
        },
    )
    side = write_sidecar(sidecar_path(out), sidecar)
    return BuildResult(
        engine_path=out, sidecar_path=side, seconds=seconds, size_bytes=len(plan), tensorrt_version=str(trt.__version__),
        gpu=gpu, profiles=profiles, fusion=report, readiness=readiness, sidecar=sidecar, warnings=warnings,
    )
