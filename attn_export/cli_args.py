"""The command line's option groups, declared and validated once (as Polygraphy's argument groups are).

A command names the groups it takes; each group adds its options to the
command's signature (and to a panel of its own in ``--help``), and the
command receives one parsed object per group: :class:`ReferenceOptions`,
:class:`ShapeArgs`, :class:`Fp16Args`, :class:`BuildArgs`, or the report path.
Every option name means one thing in every command that has it.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer

from .cli_support import PlainHelpCommand, guarded
from .errors import UsageError
from .spec import ReferenceOptions

_T = TypeVar("_T")
Shape = tuple[int, int, int]

# readiness.supported_range(), spelled out so --help needs no onnx import (a test keeps the two equal).
SUPPORTED_TRT = "10.12-10.16, 11.0-11.4"
TARGETS_HELP = f"one of {SUPPORTED_TRT}, e.g. 10.14 or 11.0 (the releases whose Python API the conformance check covers)"
SHAPES_HELP = ("A shape, repeatable: BxHxW for the image (e.g. 2x64x96; comma-separate several: 1x32x32,2x64x64), or "
               "every dynamic input of one call in Polygraphy's form, name:DIMS,... (e.g. x:1x3x64x64,sigma:1).")


FORCE = typer.Option(False, "--force", help="Replace an existing output file.")
ATTENTION = typer.Option("op", "--attention", help=(
    "The attention form TensorRT reads: op, one ONNX Attention node per site (opset 23, TensorRT 10.14+), or "
    "decomposed, Mul(q, scale) -> MatMul -> Softmax -> MatMul (any TensorRT 10.x)."))
SERVING_ATTENTION = typer.Option("auto", "--serving-attention", help=(
    "The serving form's attention: auto (per site, the form measured faster on this CPU), multiheadattention "
    "(ONNX Runtime's flash attention), chunked (query chunks in standard ops, CPU) or none (as the file has it)."))
TUNE = typer.Option(False, "--tune", help=(
    "--for onnxruntime: time the file and each rewrite (attention, Winograd, both) at the --shapes given (default: "
    "the model's sample size) on this machine, and keep only what is faster than the file (by 3 %) and slower at none."))
THREADS = typer.Option(None, "--threads", help="Intra-op threads for PyTorch and ONNX Runtime (default: each library's own).")


def renamed(old: _T | None, old_name: str, new: _T | None, new_name: str, default: _T) -> _T:
    """An option's value under its new name or, with a deprecation line, its old one (kept for one release)."""
    if old is not None:
        if new is not None:
            raise UsageError(f"give {new_name} only ({old_name} is its old spelling)")
        from .render import err_console

        err_console.print(f"[yellow]deprecated:[/] {old_name} is now {new_name}; the old spelling goes in the next "
                          "release", highlight=False)
        return old
    return default if new is None else new


def triton_form(old_attention: Optional[str], form: Optional[str], serving_attention: str) -> tuple[str, str]:
    """``triton``'s --form and --serving-attention, from the old --attention spelling where that was given."""
    if old_attention is not None:
        old_form = "written" if old_attention == "as-is" else "serving"
        form = renamed(old_form, "--attention", form, "--form", "written")
        serving_attention = "auto" if old_attention in ("onnxruntime", "as-is") else old_attention
    return form or "written", serving_attention


def json_object(text: Optional[str], option: str) -> dict[str, Any]:
    """A JSON object given on the command line ({} when absent)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{option} must be a JSON object, e.g. '{{\"ch\": 64}}'")
    return value


def parse_hw(text: Optional[str], option: str) -> tuple[int, int] | None:
    """HEIGHTxWIDTH, e.g. 32x32 (None when absent)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"{option} must be HEIGHTxWIDTH such as 32x32 (got {text!r})")
    return int(m.group(1)), int(m.group(2))


def split_shapes(texts: list[str] | None, option: str = "--shapes") -> tuple[list[Shape] | None, list[str] | None]:
    """One shape syntax family: (image shorthands, Polygraphy input-shape sets); at most one kind is given."""
    from .spec import parse_shapes

    sets = [t for t in texts or [] if ":" in t]
    short = [t for t in texts or [] if ":" not in t]
    if sets and short:
        raise UsageError(f"{option}: give BxHxW shapes or name:DIMS sets, not both")
    return (parse_shapes(",".join(short)) if short else None), (sets or None)


@dataclass
class Group:
    """Options declared once, delivered to a command as one object built by ``build``."""

    param: str                                    # the command's parameter that receives the object
    options: list[tuple[str, Any, Any]]           # (unique parameter name, type, typer.Option), build's order
    build: Callable[..., Any]
    panel: str = ""

    def __post_init__(self) -> None:
        for _, _, info in self.options:
            info.rich_help_panel = self.panel or None


def _plain_metavar(info: Any, kind: Any) -> None:
    """Flags shown as flags (no ``<bool>``), repeatable options as one value (``<text>``, not ``<list[str]>``)."""
    if not isinstance(info, typer.models.OptionInfo) or info.metavar is not None:
        return
    if kind is bool:
        info.metavar = ""
    elif kind in (Optional[list[str]], list[str]):
        info.metavar = "<text>"


def command_with(app: typer.Typer, name: str, *groups: Group, **settings: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register ``fn`` as command ``name``, its signature extended with the groups' options."""
    def register(fn: Callable[..., None]) -> Callable[..., None]:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name not in {g.param for g in groups}]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind)
                 for g in groups for n, kind, info in g.options]

        @guarded
        @functools.wraps(fn)
        def run(**kwargs: Any) -> None:
            for g in groups:
                kwargs[g.param] = g.build(*[kwargs.pop(n) for n, _, _ in g.options])
            fn(**kwargs)

        for p in [*own, *added]:
            _plain_metavar(p.default, p.annotation)
        run.__signature__ = sig.replace(parameters=[  # type: ignore[attr-defined]
            *[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own], *added])
        run.__annotations__ = {p.name: p.annotation for p in [*own, *added]}
        app.command(name, **{"cls": PlainHelpCommand, **settings})(run)
        return run

    return register


# ---------------------------------------------------------------------------------------------------------------------
# the groups
# ---------------------------------------------------------------------------------------------------------------------
def _reference(preset: Optional[str], config: Optional[Path], model: Optional[str], model_kwargs: Optional[str],
               checkpoint: Optional[Path], checkpoint_key: Optional[str], allow_checkpoint_mismatch: bool,
               trust_artifact: bool) -> ReferenceOptions:
    return ReferenceOptions(preset=preset, config=config, model=model,
                            model_kwargs=json_object(model_kwargs, "--model-kwargs") or None, checkpoint=checkpoint,
                            checkpoint_key=checkpoint_key, allow_checkpoint_mismatch=allow_checkpoint_mismatch,
                            trust_artifact=trust_artifact)


REFERENCE = Group("reference_model", [
    ("ref_preset", Optional[str], typer.Option(None, "--preset", help="A built-in preset (default: the one the artifact records).")),
    ("ref_config", Optional[Path], typer.Option(None, "--config", help="A UNet config JSON.")),
    ("ref_model", Optional[str], typer.Option(None, "--model", help="Your factory, package.module:function (imported: it is your code).")),
    ("ref_model_kwargs", Optional[str], typer.Option(None, "--model-kwargs", help="JSON object of keyword arguments for --model.")),
    ("ref_checkpoint", Optional[Path], typer.Option(None, "--checkpoint", help="The checkpoint the artifact was exported from; its sha256 must be the one recorded.")),
    ("ref_checkpoint_key", Optional[str], typer.Option(None, "--checkpoint-key", help="Key of the state dict inside --checkpoint.")),
    ("ref_allow_checkpoint_mismatch", bool, typer.Option(False, "--allow-checkpoint-mismatch", help="Compare even if the checkpoint is not the one recorded at export.")),
    ("ref_trust_artifact", bool, typer.Option(False, "--trust-artifact", "--trust-model", help=(
        "Use what the artifact records about its reference: import the factory it names and read the checkpoint "
        "path it records. Default: refuse both; name them with --model/--checkpoint instead."))),
], _reference, "Reference model (PyTorch; default: what the artifact records)")


@dataclass
class ShapeArgs:
    """The shapes to run, the inputs' data ranges and the memory bound."""

    shapes: list[Shape] | None = None          # BxHxW shorthands
    input_shapes: list[str] | None = None      # Polygraphy sets, resolved against the artifact's spec
    input_ranges: dict[str, tuple[float, float]] | None = None
    max_memory: int | None = None

    @property
    def given(self) -> bool:
        return bool(self.shapes or self.input_shapes)

    def images(self, command: str) -> list[Shape] | None:
        """The BxHxW shapes, for a command that takes no name:DIMS sets."""
        if self.input_shapes:
            raise UsageError(f"{command} takes image shapes, BxHxW (e.g. --shapes 1x32x32,4x64x64)")
        return self.shapes



def _shape_args(shapes: Optional[list[str]], input_shapes: Optional[list[str]], input_range: Optional[list[str]],
                max_memory: Optional[str]) -> ShapeArgs:
    from .exporter.foreign import parse_input_ranges
    from .graph.memory import parse_memory

    texts = renamed(input_shapes, "--input-shapes", shapes, "--shapes", None)
    short, sets = split_shapes(texts)
    return ShapeArgs(short, sets, parse_input_ranges(input_range) or None,
                     None if max_memory is None else parse_memory(max_memory))


SHAPES = Group("shape_args", [
    ("shape_shapes", Optional[list[str]], typer.Option(None, "--shapes", help=SHAPES_HELP + " Default: derived from the artifact.")),
    ("shape_input_shapes", Optional[list[str]], typer.Option(None, "--input-shapes", hidden=True, help="Old spelling of --shapes.")),
    ("shape_input_range", Optional[list[str]], typer.Option(None, "--input-range", help=(
        "Data range of an input, name:LOW:HIGH, e.g. sigma:0.002:80 (repeatable; default: image N(0,1), other "
        "floats [0,1], integers [0,1000)."))),
    ("shape_max_memory", Optional[str], typer.Option(None, "--max-memory", help=(
        "Refuse shapes whose estimated memory (activations, attention scores, weights) exceeds this, e.g. 16GiB; "
        "default: this machine's available memory; 0: no limit."))),
], _shape_args, "Shapes and inputs")


def _report(report: Optional[Path]) -> Optional[Path]:
    if report is not None and (not report.parent.exists() or report.is_dir()):
        raise UsageError(f"cannot write the report to {report}: "
                         + ("it is a folder" if report.is_dir() else f"folder {report.parent} does not exist"))
    return report


REPORT = Group("report", [
    ("report", Optional[Path], typer.Option(None, "--report", help="Also write the full result as JSON to this file (atomically).")),
], _report, "Output")


@dataclass
class Fp16Args:
    """How the FP16 conversion chooses its FP32 islands."""

    threshold: float = 4096.0
    calibration_shapes: list[Shape] | None = None
    calibration_sets: list[str] | None = None
    fp32_ops: tuple[str, ...] = ()
    fp32_nodes: tuple[str, ...] = ()


def calibration(fp16: Fp16Args, shapes: ShapeArgs) -> tuple[list[Shape] | None, list[str] | None]:
    """The FP16 audit's shapes, from --calibration-shapes or --shapes (one of them): (BxHxW, name:DIMS sets)."""
    if (fp16.calibration_shapes or fp16.calibration_sets) and shapes.given:
        raise UsageError("give the FP16 calibration shapes once: --calibration-shapes or --shapes")
    return fp16.calibration_shapes or shapes.shapes, fp16.calibration_sets or shapes.input_shapes


def _fp16_args(threshold: float, calibration_shapes: Optional[list[str]], fp32_op: Optional[list[str]],
               fp32_node: Optional[list[str]]) -> Fp16Args:
    short, sets = split_shapes(calibration_shapes, "--calibration-shapes")
    return Fp16Args(threshold, short, sets, tuple(fp32_op or ()), tuple(fp32_node or ()))


FP16 = Group("fp16_args", [
    ("fp16_threshold", float, typer.Option(4096.0, "--threshold", help="Activation absmax above which nodes stay FP32 (FP16's largest value is 65504).")),
    ("fp16_calibration_shapes", Optional[list[str]], typer.Option(None, "--calibration-shapes", help=(
        "Shapes of the FP16 range audit, in --shapes' syntax (default: derived from the model and this machine's memory)."))),
    ("fp16_fp32_op", Optional[list[str]], typer.Option(None, "--fp32-op", help="Also keep every node of this op type in FP32 (repeatable).")),
    ("fp16_fp32_node", Optional[list[str]], typer.Option(None, "--fp32-node", help="Also keep this node in FP32, by name (repeatable; `verify --localize` names the node to keep).")),
], _fp16_args, "FP16")

HARDWARE_COMPAT = {"none": "none", "ampere+": "ampere_plus", "same-cc": "same_compute_capability"}


@dataclass
class BuildArgs:
    """Engine build settings, as :func:`attn_export.pipeline.build_engine` takes them."""

    kwargs: dict[str, Any] = field(default_factory=dict)


def _build_args(mins: Optional[list[str]], opts: Optional[list[str]], maxs: Optional[list[str]],
                workspace: Optional[int], opt_level: int, timing_cache: Optional[Path], hardware_compat: str,
                target: str, runtime: str, compute_capability: Optional[list[str]], allow_unfused: bool) -> BuildArgs:
    from .engines.profiles import parse_profiles

    if hardware_compat not in HARDWARE_COMPAT:
        raise UsageError(f"--hardware-compat must be one of {', '.join(HARDWARE_COMPAT)} (got {hardware_compat!r})")
    return BuildArgs({
        "profiles": parse_profiles(mins or [], opts or [], maxs or []) or None, "target": target, "runtime": runtime,
        "workspace": workspace * (1 << 20) if workspace is not None else None, "opt_level": opt_level,
        "timing_cache": timing_cache, "hardware_compatibility": HARDWARE_COMPAT[hardware_compat],
        "compute_capabilities": compute_capability or None, "allow_unfused": allow_unfused})


RUNTIME = typer.Option("tensorrt", "--runtime", help=(
    "tensorrt (NVIDIA TensorRT; building needs a GPU) or rtx (TensorRT for RTX; builds on a CPU, runs on RTX-class GPUs)."))
TARGET = typer.Option("10.14", "--target", help=f"TensorRT version the readiness rules check for: {TARGETS_HELP} (not used with --runtime rtx).")

BUILD = Group("build_args", [
    ("build_mins", Optional[list[str]], typer.Option(None, "--min", help="Profile min BxHxW (repeat --min/--opt/--max per profile).")),
    ("build_opts", Optional[list[str]], typer.Option(None, "--opt", help="Profile opt BxHxW, the shape TensorRT tunes for.")),
    ("build_maxs", Optional[list[str]], typer.Option(None, "--max", help="Profile max BxHxW.")),
    ("build_workspace", Optional[int], typer.Option(None, "--workspace", help="Workspace memory pool limit in MiB (default: TensorRT's).")),
    ("build_opt_level", int, typer.Option(3, "--opt-level", help="Builder optimization level 0-5.")),
    ("build_timing_cache", Optional[Path], typer.Option(None, "--timing-cache", help="Timing cache file: loaded if present, saved after the build.")),
    ("build_hardware_compat", str, typer.Option("none", "--hardware-compat", help="Hardware compatibility: none, ampere+ or same-cc.")),
    ("build_target", str, TARGET),
    ("build_runtime", str, RUNTIME),
    ("build_compute_capability", Optional[list[str]], typer.Option(None, "--compute-capability", help=(
        "TensorRT-RTX: a compute capability X.Y the engine must run on (repeat; default: its own, 8.0, 8.6, 8.9, 12.0)."))),
    ("build_allow_unfused", bool, typer.Option(False, "--allow-unfused", help=(
        "Write the engine even when an attention site the readiness rules expect to fuse was not fused "
        "(default: exit 1, nothing written)."))),
], _build_args, "Engine build")


@dataclass
class TrajectoryArgs:
    """``verify --trajectory``: the settings :func:`attn_export.pipeline.verify_artifact` takes, or None."""

    settings: dict[str, Any] | None = None


def _trajectory_args(steps: Optional[int], sampler: Optional[str], batch: Optional[int], images: Optional[Path],
                     eta: Optional[float], schedule: Optional[str], beta_start: Optional[float], beta_end: Optional[float],
                     train_steps: Optional[int], prediction: Optional[str], no_clip: bool, min_psnr: Optional[float],
                     min_ssim: Optional[float], max_image_error: Optional[float]) -> TrajectoryArgs:
    given = {"--sampler": sampler, "--batch": batch, "--images": images, "--eta": eta, "--beta-schedule": schedule,
             "--beta-start": beta_start, "--beta-end": beta_end, "--train-steps": train_steps,
             "--prediction": prediction, "--no-clip": no_clip or None, "--min-psnr": min_psnr, "--min-ssim": min_ssim,
             "--max-image-error": max_image_error}
    if steps is None:
        named = [k for k, v in given.items() if v is not None]
        if named:
            raise UsageError(f"{', '.join(named)} set up a trajectory check: add --trajectory STEPS")
        return TrajectoryArgs()
    if steps < 1:
        raise UsageError(f"--trajectory needs a number of steps of at least 1 (got {steps})")
    if images is not None:
        from .trajectory_images import check_images_path

        check_images_path(images)  # before anything runs: a bad name should not cost a whole trajectory
    chosen = {"sampler": sampler, "batch": batch, "images": images, "eta": eta, "beta_schedule_kind": schedule,
              "beta_start": beta_start, "beta_end": beta_end, "train_steps": train_steps, "prediction": prediction,
              "clip_sample": False if no_clip else None, "min_psnr": min_psnr, "min_ssim": min_ssim,
              "max_abs": max_image_error}
    return TrajectoryArgs({"steps": steps, **{k: v for k, v in chosen.items() if v is not None}})


TRAJECTORY = Group("trajectory_args", [
    ("traj_steps", Optional[int], typer.Option(None, "--trajectory", metavar="STEPS", help=(
        "Instead of single calls: sample STEPS steps with the artifact and with its reference from the same noise, "
        "compare every step and the final images (PSNR, SSIM, max abs); exit 1 when the images differ beyond the pass rule."))),
    ("traj_sampler", Optional[str], typer.Option(None, "--sampler", help="ddim (default, deterministic) or ddpm (ancestral; the same noise on both sides).")),
    ("traj_batch", Optional[int], typer.Option(None, "--batch", help="Samples per trajectory (default 2), at the model's typical size; or give one BxHxW in --shapes.")),
    ("traj_images", Optional[Path], typer.Option(None, "--images", help="Write a PNG: per sample reference, candidate and amplified |difference|, and the error-growth curve.")),
    ("traj_eta", Optional[float], typer.Option(None, "--eta", help="DDIM's eta, 0 (default, deterministic) to 1.")),
    ("traj_schedule", Optional[str], typer.Option(None, "--beta-schedule", help="linear (default, DDPM), scaled_linear or squaredcos_cap_v2 (cosine).")),
    ("traj_beta_start", Optional[float], typer.Option(None, "--beta-start", help="First beta of the schedule (default 1e-4).")),
    ("traj_beta_end", Optional[float], typer.Option(None, "--beta-end", help="Last beta of the schedule (default 0.02).")),
    ("traj_train_steps", Optional[int], typer.Option(None, "--train-steps", help="Training steps of the schedule (default: the model's recorded timesteps, 1000).")),
    ("traj_prediction", Optional[str], typer.Option(None, "--prediction", help="auto (default: a 2xC-channel output is epsilon + learned variance), epsilon or learned-variance.")),
    ("traj_no_clip", bool, typer.Option(False, "--no-clip", help="Do not clip the predicted x0 to [-1, 1] (clipping is diffusers' and Ho's default).")),
    ("traj_min_psnr", Optional[float], typer.Option(None, "--min-psnr", help="Pass rule: lowest PSNR of a final image, dB (default by precision, docs/trajectory.md).")),
    ("traj_min_ssim", Optional[float], typer.Option(None, "--min-ssim", help="Pass rule: lowest SSIM of a final image (default by precision).")),
    ("traj_max_image_error", Optional[float], typer.Option(None, "--max-image-error", help="Pass rule: largest abs difference of a final image in [0, 1] (default by precision).")),
], _trajectory_args, "Trajectory (whole sampling runs)")


@dataclass
class BackendArgs:
    """The runtime that runs an ONNX file (verify) or serves it (triton), and OpenVINO's inference precision."""

    backend: str = "onnxruntime"
    precision: str | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision}


def _backend_args(backend: str, precision: Optional[str]) -> BackendArgs:
    name = backend.strip().lower()
    if name not in ("onnxruntime", "openvino"):
        raise UsageError(f"--backend must be onnxruntime or openvino (got {backend!r})")
    if name == "openvino":
        from .runners.openvino_runner import parse_precision

        return BackendArgs(name, parse_precision(precision))
    if precision is not None:
        raise UsageError("--precision sets OpenVINO's inference precision: add --backend openvino")
    return BackendArgs(name)


BACKEND = Group("backend_args", [
    # "\\[" keeps rich's markup from reading "[openvino]" as a style tag in --help.
    ("backend_name", str, typer.Option("onnxruntime", "--backend", help=(
        "onnxruntime (default) or openvino: OpenVINO's CPU plugin on the ONNX file as written, at --precision "
        "(pip install '.\\[openvino]' from the attn-export checkout)."))),
    ("backend_precision", Optional[str], typer.Option(None, "--precision", help=(
        "OpenVINO's inference precision, required with --backend openvino: f32, bf16 (needs AVX512_BF16 or AMX) or f16 "
        "(needs AVX512_FP16 or AMX-FP16); one this CPU cannot run natively is refused, never emulated. verify holds bf16 "
        "and f16 to the FP16 tolerances; triton takes bf16 only (Triton's OpenVINO backend cannot pin the others)."))),
], _backend_args, "Backend")
