"""Whole commands as library functions: each one does everything its `attn-export` command does.

This module sits above verify: it composes the layers below it (the FP16
conversion in :mod:`.exporter.fp16`, the comparison in :mod:`.verify`, the
readiness check and the build in :mod:`.engines`) and returns one result the
caller (the CLI) renders. Nothing here draws: progress goes through one
:class:`~attn_export.progress.ProgressFn`.
"""

from __future__ import annotations

import json
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
from .exporter.foreign import spec_of
from .exporter.metadata import load_onnx
from .exporter.fp16 import Fp16Result, fp16_settings, recorded_fp16_settings
from .exporter.optimize import OptimizeResult
from .localize import LocalizeReport
from .trajectory import TrajectoryReport
from .verify import VerifyReport
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

    # max_memory=0: the conversion has checked these shapes against the user's limit on the FP32 model, whose
    # estimate bounds the FP16 file's.
    r = verify(path, shapes=[cast(Shape, tuple(s)) for s in shapes], reference=reference, input_ranges=input_ranges,
               reference_model=None if reference is not None else reference_model, max_memory=0)
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


def optimize_artifact(onnx_in: str | Path, output: str | Path, *, tune: bool = False, threads: int | None = None,
                      **options: Any) -> OptimizeResult:
    """``attn-export optimize``: :func:`.exporter.optimize.optimize_onnx`, with ``tune`` its serving form measured.

    ``tune`` (``--for onnxruntime``): the file and each form of its rewrites are timed on this machine with
    ``threads`` at the shapes given (default: the model's sample size), and only rewrites faster than the file are
    made (:mod:`.runners.serving_tune`); where none is, nothing is written (exit 2, the measurements in the line).
    """
    from .exporter.optimize import optimize_onnx

    if not tune:
        if threads is not None:
            raise UsageError("--threads sets the threads of the tuning runs: add --tune")
        return optimize_onnx(onnx_in, output, **options)
    from .exporter.serving import SERVING_PROVIDERS, ServingChoice
    from .runners.serving_tune import tune_serving_form
    from .shapes import sample_shape

    def choose(spec: ModelSpec, shapes: list[Shape] | None) -> ServingChoice:
        tuning = tune_serving_form(onnx_in, spec, shapes or [sample_shape(spec)], threads=threads,
                                   provider=SERVING_PROVIDERS.get(options.get("provider", "cpu"), "CPUExecutionProvider"),
                                   serving_attention=options.get("serving_attention", "auto"),
                                   progress=options.get("progress"))
        if not tuning.pays:
            raise UsageError(f"no rewrite of {Path(onnx_in).name} is faster than the file on this machine "
                             f"({tuning.summary()}); serve it as it is")
        return ServingChoice(tuning.chosen.attention, tuning.chosen.winograd, tuning.to_dict())

    return optimize_onnx(onnx_in, output, choose_form=choose, **options)


@dataclass
class EngineResult:
    """What :func:`build_engine` did, stage by stage (later fields stay None where an earlier stage stopped)."""

    onnx: Path
    spec: ModelSpec
    fp16_requested: bool
    profiles: list[Profile]
    profile_warnings: list[str] = field(default_factory=list)
    fp16: Fp16Result | None = None       # the conversion, when the input was FP32 and fp16 was asked for
    fp16_reused: Path | None = None      # an FP16 file of the same source and settings, used instead of converting
    built_from: Path | None = None       # the ONNX file the engine is built from
    readiness: ReadinessReport | None = None
    build: BuildResult | None = None


def _fp16_destination(engine: Path, asked: str | Path | None, settings: dict[str, Any], *,
                      force: bool) -> tuple[Path, bool]:
    """Where ``trt --fp16`` keeps its FP16 file, and whether a file already there is reused.

    A file recording the same source bytes and settings (and a passed check) is reused, ``force`` or not. The
    default name is ``<engine stem>.fp16.onnx``, the one ``attn-export fp16`` users pick; a file there made
    otherwise is the user's and is never replaced: the conversion goes to ``<engine name>.fp16.onnx`` instead
    (replaced with ``force``). A name the user gives (``fp16_onnx``) is replaced only with ``force``.
    """
    def reusable(path: Path) -> bool:
        return path.is_file() and recorded_fp16_settings(path) == settings

    if asked is not None:
        path = Path(asked)
        return (path, True) if reusable(path) else (check_output_path(path, force=force), False)
    default, own = engine.with_name(engine.stem + ".fp16.onnx"), engine.with_name(engine.name + ".fp16.onnx")
    for path in (default, own):
        if reusable(path):
            return path, True
    if not default.exists():
        return default, False
    return check_output_path(own, force=force), False


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
    extra_fp32_ops: Sequence[str] = (),
    extra_fp32_nodes: Sequence[str] = (),
    input_ranges: dict[str, tuple[float, float]] | None = None,
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
    against PyTorch; saved to ``fp16_onnx``, default ``<engine stem>.fp16.onnx``, see
    :func:`_fp16_destination`; an FP16 file there made from the same source with the same settings is
    reused) and the engine is built strongly typed from it. ``profiles``: None for
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
    if not fp16 and (fp16_onnx or calibration_shapes or input_shapes or extra_fp32_ops or extra_fp32_nodes
                     or input_ranges):
        raise UsageError("--fp16-onnx, --calibration-shapes, --shapes, --fp32-op, --fp32-node and --input-range shape "
                         "the FP16 conversion: add --fp16")
    # Parsed once (weightless): the description, the FP16 settings and the conversion read this graph.
    graph = load_onnx(onnx_path, load_external_data=False)
    spec = spec_of(graph, origin=str(onnx_path))
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
        settings = fp16_settings(onnx_path, threshold=threshold, calibration_shapes=calibration_shapes,
                                 input_shapes=input_shapes, extra_fp32_ops=extra_fp32_ops,
                                 extra_fp32_nodes=extra_fp32_nodes, input_ranges=input_ranges, model=graph)
        fp16_path, reuse = _fp16_destination(engine, fp16_onnx, settings, force=force)
        if reuse:
            result.fp16_reused = result.built_from = fp16_path
        else:
            say = None if progress is None else (lambda text, done=None, total=None: progress(f"fp16: {text}", done, total))
            result.fp16 = convert_fp16(onnx_path, fp16_path, threshold=threshold, calibration_shapes=calibration_shapes,
                                       extra_fp32_ops=tuple(extra_fp32_ops), extra_fp32_nodes=tuple(extra_fp32_nodes),
                                       force=force, input_shapes=input_shapes or None,
                                       reference_model=reference_model, max_memory=max_memory, progress=say,
                                       input_ranges=input_ranges, model=graph, settings=settings)
            result.built_from = result.fp16.path
    stage("fp16", result)

    # The one readiness run: its report goes to the caller and its attention sites to the fusion report.
    made = result.fp16
    result.readiness = check_trt_readiness(result.built_from, target, chosen, fp16=fp16, runtime=rt.name,
                                           graph=made.graph if made else None, analysis=made.analysis if made else None)
    stage("readiness", result)
    result.readiness.raise_for_errors()

    build_say = None if progress is None else (lambda text, done=None, total=None: progress(f"{rt.name}: {text}", done, total))
    result.build = build_plan(result.built_from, engine, chosen, result.readiness, runtime=rt.name,
                              compute_capabilities=compute_capabilities, workspace=workspace,
                              opt_level=opt_level, timing_cache=timing_cache, hardware_compatibility=hardware_compatibility,
                              allow_unfused=allow_unfused, force=force, progress=build_say)
    return result


@dataclass
class VerifyOutcome:
    """``attn-export verify``: the comparison and, when asked, where a failure starts and the inputs kept;
    with ``trajectory``, the trajectory check instead of the comparison (``report`` is then None)."""

    report: VerifyReport | None
    localized: LocalizeReport | None = None
    inputs_saved: Path | None = None
    trajectory: TrajectoryReport | None = None

    @property
    def passed(self) -> bool:
        return self.trajectory.passed if self.trajectory is not None else bool(self.report and self.report.passed)

    def to_dict(self) -> dict[str, Any]:
        """The JSON report: every figure of the check that ran."""
        if self.trajectory is not None:
            return self.trajectory.to_dict()
        assert self.report is not None
        return {**json.loads(self.report.to_json()), **({"localize": self.localized.to_dict()} if self.localized else {})}


# verify's options a trajectory check has no use for (its pass rule is on the final images).
_SINGLE_CALL_ONLY = {"atol": "--atol", "rtol": "--rtol", "stat": "--stat", "input_shapes": "--shapes name:DIMS"}


def _verify_trajectory(artifact: str | Path, trajectory: dict[str, Any], *, localize: bool, save_inputs: Any,
                       load_inputs: Any, force: bool, options: dict[str, Any]) -> VerifyOutcome:
    """``verify --trajectory``: :func:`.trajectory.verify_trajectory` and, with ``images``, its PNG."""
    from .trajectory import verify_trajectory
    from .trajectory_images import check_images_path, write_grid

    given = [name for name, flag in (("--localize", localize), ("--save-inputs", save_inputs),
                                     ("--load-inputs", load_inputs)) if flag]
    given += [flag for key, flag in _SINGLE_CALL_ONLY.items() if options.get(key)]
    if given:
        raise UsageError(f"{', '.join(given)} check single calls; --trajectory judges the final images "
                         "(--min-psnr, --min-ssim, --max-image-error)")
    options = {k: v for k, v in options.items() if k not in ("quantile", *_SINGLE_CALL_ONLY)}
    settings = dict(trajectory)
    steps, images = settings.pop("steps"), settings.pop("images", None)
    if images is not None:
        check_output_path(check_images_path(images), force=force)
    report = verify_trajectory(artifact, steps, **settings, **options)
    if images is not None:
        report.images_written = str(write_grid(report, images))
    return VerifyOutcome(None, trajectory=report)


def verify_artifact(artifact: str | Path, *, localize: bool = False, save_inputs: str | Path | None = None,
                    load_inputs: str | Path | None = None, force: bool = False,
                    trajectory: dict[str, Any] | None = None, **options: Any) -> VerifyOutcome:
    """:func:`attn_export.verify`, then, with ``localize`` and a failure, the first node that diverges there.

    ``trajectory``: instead of single calls, sample whole trajectories with the
    artifact and its reference (:func:`attn_export.trajectory.verify_trajectory`
    with these settings: ``steps`` and its keyword options) and, with
    ``images``, write their picture there (``force`` replaces a file there).

    ``load_inputs``: an ``.npz`` of one call's inputs to verify on (real data)
    instead of the seeded sweep. ``save_inputs``: write the inputs of the first
    failing shape (else the first shape) to an ``.npz``, for ``load_inputs``
    or other tools. The localization runs on exactly the inputs verify used
    there, against the same reference (:func:`attn_export.localize.localize`).
    """
    from .engines.sidecar import is_engine_path
    from .inputs import load_inputs as read_inputs, save_inputs as write_inputs
    from .localize import localize as find_divergence
    from .verify import verify

    if trajectory is not None:
        return _verify_trajectory(artifact, trajectory, localize=localize, save_inputs=save_inputs,
                                  load_inputs=load_inputs, force=force, options=options)
    if localize:
        # Refused before the comparison runs: localize runs an ONNX file as written on the CPU provider, so it could
        # not look at what verify would have compared; an engine is compared with the file it was built from.
        if is_engine_path(Path(artifact)):
            from .localize import engine_source

            reference = options.get("reference")
            engine_source(Path(artifact), Path(reference) if reference is not None else None)
        elif options.get("backend", "onnxruntime") != "onnxruntime":
            raise UsageError("--localize compares node by node in ONNX Runtime; drop --backend openvino to localize the "
                             "file as written")
        elif options.get("form", "written") != "written" or any(
                str(p).lower() not in ("cpu", "cpuexecutionprovider") for p in options.get("providers") or []):
            raise UsageError("--localize runs the file as written on ONNX Runtime's CPU provider; drop --form serving "
                             "and --provider to localize the same graph")
    if save_inputs is not None:
        check_output_path(save_inputs, force=force)
    # Read once, for the inputs file to load and the inputs to save.
    from .engines.sidecar import artifact_spec

    spec = artifact_spec(artifact, options.get("input_ranges")) if load_inputs or save_inputs else None
    given = read_inputs(load_inputs, spec) if load_inputs is not None and spec is not None else None
    report = verify(artifact, inputs=given, **options)
    outcome = VerifyOutcome(report)
    failing = next((i for i, s in enumerate(report.shapes) if not s.passed), None)
    index = failing if failing is not None else 0
    b, h, w = (int(v) for v in report.shapes[index].shape)
    seed = int(options.get("seed", 0)) + index
    if save_inputs is not None:
        assert spec is not None
        feeds = given if given is not None else spec.make_inputs(b, h, w, seed=seed)
        outcome.inputs_saved = write_inputs(save_inputs, feeds, force=force)
    if localize and failing is not None:
        outcome.localized = find_divergence(
            artifact, reference=options.get("reference"), reference_model=options.get("reference_model"),
            shapes=None if given is not None else [(b, h, w)], seed=seed, inputs=given, atol=options.get("atol"),
            rtol=options.get("rtol"), stat=options.get("stat"), quantile=options.get("quantile", 0.99),
            input_ranges=options.get("input_ranges"), max_memory=options.get("max_memory"),
            progress=options.get("progress"))
    return outcome
