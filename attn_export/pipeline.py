"""Whole commands as library functions: each one does everything its `attn-export` command does.

This module sits above verify: it composes the layers below it (the FP16
conversion in :mod:`.exporter.fp16`, the comparison in :mod:`.verify`, the
readiness check and the build in :mod:`.engines`) and returns one result the
caller (the CLI) renders. Nothing here draws: progress goes through one
:class:`~attn_export.progress.ProgressFn`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, cast

from .atomic import check_output_path
from .engines.profiles import Profile, default_profile, validate_profiles
from .engines.readiness import ReadinessReport, check_target, check_trt_readiness
from .engines.runtime import TENSORRT, get_runtime, installed
from .engines.trt_build import HARDWARE_LEVELS, BuildResult, build_plan, check_compute_capabilities, check_timing_cache
from .errors import MissingDependencyError, UsageError
from .exporter.audit import DEFAULT_THRESHOLD
from .exporter.foreign import spec_of_file
from .exporter.fp16 import Fp16Result
from .exporter.fp16 import convert_fp16 as _convert_fp16
from .progress import ProgressFn
from .shapes import Shape
from .spec import ModelSpec, ReferenceOptions

DEFAULT_TARGET = "10.14"
# Stages build_engine reports as it goes, so a caller can show each before a later step fails.
STAGES = ("profiles", "fp16", "readiness")


def compare_fp16(path: Path, shapes: Sequence[Shape], *, reference: Path | None,
                 input_ranges: dict[str, tuple[float, float]] | None,
                 reference_model: ReferenceOptions | None) -> dict[str, Any]:
    """The FP16 check: compare ``path`` with PyTorch (or the FP32 ``reference`` file) via :func:`.verify.verify`."""
    from .verify import verify

    r = verify(path, shapes=[cast(Shape, tuple(s)) for s in shapes], reference=reference, input_ranges=input_ranges,
               reference_model=None if reference is not None else reference_model)
    per: list[dict[str, Any]] = [{"shape": list(s.shape), "max_abs_err": max(o.max_abs for o in s.outputs),
            "mean_abs_err": max(o.mean_abs for o in s.outputs), "passed": s.passed} for s in r.shapes]
    return {"passed": r.passed, "shapes": per, "max_abs_err": max(p["max_abs_err"] for p in per),
            "tolerances": r.tolerances.describe(), "failures": r.failures()}


def convert_fp16(onnx_in: str | Path, onnx_out: str | Path, *, check: bool = True, **options: Any) -> Fp16Result:
    """``attn-export fp16``: :func:`.exporter.fp16.convert_fp16`, checked against PyTorch by default.

    Takes the options of :func:`attn_export.exporter.fp16.convert_fp16`. With
    ``check`` (default) the written file must match its reference (PyTorch,
    or the FP32 input for files this tool did not export) and pass the FP16
    emulation before it is put in place; otherwise nothing is written and
    CheckFailed (exit 1) is raised.
    """
    return _convert_fp16(onnx_in, onnx_out, check=check, compare=compare_fp16 if check else None, **options)


@dataclass
class EngineResult:
    """What :func:`build_engine` did, stage by stage (later fields stay None where an earlier stage stopped)."""

    onnx: Path
    spec: ModelSpec
    fp16_requested: bool
    profiles: list[Profile]
    profile_warnings: list[str] = field(default_factory=list)
    fp16: Fp16Result | None = None       # the conversion, when the input was FP32 and fp16 was asked for
    built_from: Path | None = None       # the ONNX file the engine is built from
    readiness: ReadinessReport | None = None
    build: BuildResult | None = None


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    profiles: Sequence[Profile] | None = None,
    *,
    fp16: bool = False,
    fp16_onnx: str | Path | None = None,
    target: str = DEFAULT_TARGET,
    threshold: float = DEFAULT_THRESHOLD,
    calibration_shapes: Sequence[Shape] | None = None,
    input_shapes: Sequence[str] | None = None,
    reference_model: ReferenceOptions | None = None,
    max_memory: int | None = None,
    workspace: int | None = None,
    opt_level: int = 3,
    timing_cache: str | Path | None = None,
    hardware_compatibility: str = "none",
    runtime: str = "tensorrt",
    compute_capabilities: Sequence[str] | None = None,
    allow_unfused: bool = False,
    force: bool = False,
    progress: ProgressFn | None = None,
    on_stage: Callable[[str, EngineResult], None] | None = None,
) -> EngineResult:
    """``attn-export trt``: FP16 conversion (``fp16``), one readiness check, the build and its sidecar.

    Cheap checks come first (input file, output paths, options, ``target``,
    profiles), so nothing is converted or built for a bad option. With
    ``fp16`` an FP32 input is converted (:func:`convert_fp16`, checked
    against PyTorch; saved to ``fp16_onnx``, default ``<engine stem>.fp16.onnx``)
    and the engine is built strongly typed from it. ``profiles``: None for
    :func:`.engines.profiles.default_profile`. ``workspace`` in bytes.
    ``on_stage(name, result)`` is called after each of :data:`STAGES`, so a
    caller can show what was done before a later step fails (a missing
    TensorRT, say). ``runtime``: "tensorrt" (GPU) or "rtx" (TensorRT-RTX,
    builds on a CPU; ``compute_capabilities`` names its targets, ``target``
    is not used). ``allow_unfused``: write the engine even when a site the
    readiness rules expect to fuse was not fused (else exit 1, nothing
    written). Returns an :class:`EngineResult`.
    """
    onnx_path = Path(onnx_path)
    spec = spec_of_file(onnx_path)
    engine = check_output_path(engine_path, force=force)
    if hardware_compatibility not in HARDWARE_LEVELS:
        raise UsageError(f"unknown hardware compatibility {hardware_compatibility!r}; use one of {', '.join(HARDWARE_LEVELS)}")
    if not 0 <= opt_level <= 5:
        raise UsageError(f"--opt-level must be 0..5 (got {opt_level})")
    if workspace is not None and workspace <= 0:
        raise UsageError(f"--workspace must be a positive number of MiB (got {workspace // (1 << 20)})")
    rt = get_runtime(runtime)
    if rt.builds_without_gpu and not installed(rt):
        # Installable on any machine, so nothing is converted first (for TensorRT the FP16 file is made, to carry over).
        raise MissingDependencyError(f"{rt.display} is not installed; {rt.install_hint}")
    check_compute_capabilities(rt, compute_capabilities)
    check_timing_cache(rt, timing_cache)
    if rt is TENSORRT:
        check_target(target)
    chosen = list(profiles) if profiles else [default_profile(spec)]
    result = EngineResult(onnx=onnx_path, spec=spec, fp16_requested=fp16, profiles=chosen,
                          profile_warnings=validate_profiles(chosen, spec))
    stage = on_stage or (lambda name, r: None)
    stage("profiles", result)

    result.built_from = onnx_path
    if fp16 and spec.precision == "fp32":
        fp16_path = Path(fp16_onnx) if fp16_onnx else engine.with_name(engine.stem + ".fp16.onnx")
        check_output_path(fp16_path, force=force)
        say = None if progress is None else (lambda text, done=None, total=None: progress(f"fp16: {text}", done, total))
        result.fp16 = convert_fp16(onnx_path, fp16_path, threshold=threshold, calibration_shapes=calibration_shapes,
                                   force=force, input_shapes=input_shapes or None, reference_model=reference_model,
                                   max_memory=max_memory, progress=say)
        result.built_from = result.fp16.path
    stage("fp16", result)

    # The one readiness run: its report goes to the caller and its attention sites to the fusion report.
    result.readiness = check_trt_readiness(result.built_from, target, chosen, fp16=fp16, runtime=rt.name)
    stage("readiness", result)
    result.readiness.raise_for_errors()

    build_say = None if progress is None else (lambda text, done=None, total=None: progress(f"{rt.name}: {text}", done, total))
    result.build = build_plan(result.built_from, engine, chosen, result.readiness, runtime=rt.name,
                              compute_capabilities=compute_capabilities, workspace=workspace,
                              opt_level=opt_level, timing_cache=timing_cache, hardware_compatibility=hardware_compatibility,
                              allow_unfused=allow_unfused, force=force, progress=build_say)
    return result
