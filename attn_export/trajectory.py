"""Verify whole sampling trajectories: the same sampler, from the same noise, on the candidate and the reference.

A single denoiser call can agree within tolerance while the sampler, which
feeds every output back in as the next input for tens of steps, carries a
small error into a visibly different picture. :func:`verify_trajectory` runs
DDIM or DDPM (ancestral) sampling with the artifact and with its reference
(the PyTorch model verify rebuilds, or another ONNX file) side by side, from
the same initial noise, the same class labels and extra inputs, and (DDPM)
the same per-step noise, and compares:

* per step: max and mean abs difference of the model output and of the sample;
* the final images mapped to [0, 1]: max abs difference, PSNR, SSIM
  (:func:`ssim`), NaN/Inf counts.

The pass rule (:class:`PassRule`) is on the final images; its defaults, one
for FP32 artifacts and one for FP16/bf16/mixed ones, come from measurements
written in docs/trajectory.md.

The schedule and the two update rules are small numpy code of our own
(float64); tests check them against diffusers' ``DDPMScheduler`` and
``DDIMScheduler`` (timesteps "leading", ``steps_offset`` 0, ``clip_sample``,
``set_alpha_to_one``; DDPM variance ``fixed_small``, or ``learned_range``
for models that output 2*C channels).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, cast

import numpy as np

from .compare import json_number
from .errors import UsageError
from .host import host_info
from .progress import ProgressFn
from .shapes import Shape, fit_shapes, round_up, typical_size
from .spec import ModelSpec, ReferenceOptions, format_shape, parse_shapes

if TYPE_CHECKING:
    from .runners.base import Runner

SAMPLERS = ("ddim", "ddpm")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("auto", "epsilon", "learned-variance")
DEFAULT_BATCH = 2


# ---------------------------------------------------------------------------------------------------------------------
# schedule and steps (float64 numpy)
# ---------------------------------------------------------------------------------------------------------------------
def beta_schedule(kind: str = "linear", train_steps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> np.ndarray:
    """The training betas: ``linear`` (DDPM, Ho et al.), ``scaled_linear`` (latent diffusion) or
    ``squaredcos_cap_v2`` (the cosine schedule of Nichol & Dhariwal, betas capped at 0.999)."""
    if kind == "linear":
        return np.linspace(beta_start, beta_end, train_steps, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, train_steps, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        def abar(u: np.ndarray) -> np.ndarray:
            return np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        i = np.arange(train_steps, dtype=np.float64)
        return np.minimum(1 - abar((i + 1) / train_steps) / abar(i / train_steps), 0.999)
    raise UsageError(f"unknown beta schedule {kind!r}; use one of {', '.join(BETA_SCHEDULES)}")


def sampling_timesteps(steps: int, train_steps: int) -> np.ndarray:
    """The timesteps a ``steps``-step sampler visits, largest first: every ``train_steps // steps``-th training
    step from 0 (diffusers' "leading" spacing, its default). The step after ``t`` is ``t - train_steps // steps``."""
    if not 1 <= steps <= train_steps:
        raise UsageError(f"--trajectory must be between 1 and the {train_steps} training steps (got {steps})")
    return (np.arange(steps, dtype=np.int64) * (train_steps // steps))[::-1].copy()


def _abar(alphas_cumprod: np.ndarray, t: int) -> float:
    # Past the first training step the sample is clean: alpha-bar 1 (diffusers' set_alpha_to_one / DDPM's `one`).
    return float(alphas_cumprod[t]) if t >= 0 else 1.0


def predicted_x0(eps: np.ndarray, x: np.ndarray, abar_t: float, clip: bool) -> np.ndarray:
    """x_0 from the noise prediction; clipped to [-1, 1] when ``clip`` (Ho's sampler and diffusers' default)."""
    x0 = (x - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)
    return np.clip(x0, -1.0, 1.0) if clip else x0


def ddim_step(eps: np.ndarray, t: int, prev_t: int, x: np.ndarray, alphas_cumprod: np.ndarray, *,
              clip: bool = True, eta: float = 0.0, noise: np.ndarray | None = None) -> np.ndarray:
    """One DDIM update x_t -> x_prev (Song et al. eq. 12). The direction term uses the model's own noise
    prediction, not one recomputed from the clipped x_0 (diffusers' default)."""
    a_t, a_prev = _abar(alphas_cumprod, t), _abar(alphas_cumprod, prev_t)
    x0 = predicted_x0(eps, x, a_t, clip)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * math.sqrt(var)
    out = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - std ** 2, 0.0)) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("DDIM with eta > 0 needs noise")
        out = out + std * noise
    return out


def ddpm_step(eps: np.ndarray, t: int, prev_t: int, x: np.ndarray, alphas_cumprod: np.ndarray, *,
              clip: bool = True, noise: np.ndarray | None = None, variance_out: np.ndarray | None = None) -> np.ndarray:
    """One ancestral DDPM update x_t -> x_prev: the posterior mean of q(x_prev | x_t, x_0), plus noise with the
    posterior variance (``fixed_small``) or, given the model's variance channels ``variance_out`` in [-1, 1],
    the log-variance interpolated between it and beta_t (``learned_range``, improved DDPM)."""
    a_t, a_prev = _abar(alphas_cumprod, t), _abar(alphas_cumprod, prev_t)
    alpha, beta = a_t / a_prev, 1 - a_t / a_prev
    x0 = predicted_x0(eps, x, a_t, clip)
    mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(alpha) * (1 - a_prev) / (1 - a_t)) * x
    if t <= 0:
        return mean
    if noise is None:
        raise ValueError("DDPM steps need noise")
    small = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    if variance_out is None:
        return mean + math.sqrt(small) * noise
    frac = (variance_out + 1) / 2
    log_var = frac * math.log(beta) + (1 - frac) * math.log(small)
    return mean + np.exp(0.5 * log_var) * noise


# ---------------------------------------------------------------------------------------------------------------------
# image metrics
# ---------------------------------------------------------------------------------------------------------------------
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _gaussian(size: int, sigma: float) -> np.ndarray:
    u = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(u ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable filter over the last two axes, valid region only (no padding: every window lies in the image)."""
    k = len(g)
    h, w = img.shape[-2], img.shape[-1]
    rows = sum(g[i] * img[..., i:h - k + 1 + i, :] for i in range(k))
    return sum(g[i] * rows[..., :, i:w - k + 1 + i] for i in range(k))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Mean SSIM per image of two (N, C, H, W) batches (Wang et al. 2004): an 11x11 Gaussian window with
    sigma 1.5, K1 0.01, K2 0.03, weighted (population) statistics, the valid region, averaged over channels.
    Images smaller than the window use the largest odd window that fits, sigma scaled with it."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) arrays of one shape; got {a.shape} and {b.shape}")
    size = min(SSIM_WINDOW, a.shape[2], a.shape[3])
    size -= 1 - size % 2
    g = _gaussian(size, SSIM_SIGMA * size / SSIM_WINDOW)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a ** 2
    var_b = _filter_valid(b * b, g) - mu_b ** 2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(axis=(1, 2, 3))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """PSNR in dB per image of two (N, ...) batches; inf where they are identical."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=tuple(range(1, np.ndim(a))))
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range ** 2 / mse)


def to_unit(x: np.ndarray) -> np.ndarray:
    """A sample in the model's [-1, 1] data range as an image in [0, 1] (clipped)."""
    return np.clip((np.asarray(x, np.float64) + 1) / 2, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# the pass rule
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PassRule:
    """The final images pass when every sample's PSNR and SSIM reach the minimums, its max abs difference
    (in [0, 1]) stays within ``max_abs``, and the candidate has no NaN/Inf where the reference is finite."""

    min_psnr: float
    min_ssim: float
    max_abs: float

    def describe(self) -> str:
        return f"PSNR >= {self.min_psnr:g} dB, SSIM >= {self.min_ssim:g}, max abs <= {self.max_abs:g} (images in [0, 1])"


# From the measurements in docs/trajectory.md (ORT FP32 vs PyTorch, FP16 files vs PyTorch, tiny and ddpm-cifar10).
DEFAULT_RULES = {
    "fp32": PassRule(min_psnr=60.0, min_ssim=0.9999, max_abs=0.01),
    "fp16": PassRule(min_psnr=30.0, min_ssim=0.97, max_abs=0.25),
}


def default_rule(precision: str | None) -> PassRule:
    """The pass rule for an artifact precision: 'fp32', else the FP16 class (fp16, bf16, mixed)."""
    return DEFAULT_RULES["fp32"] if (precision or "fp32") == "fp32" else DEFAULT_RULES["fp16"]


def resolve_rule(precision: str | None, *, min_psnr: float | None = None, min_ssim: float | None = None,
                 max_abs: float | None = None) -> PassRule:
    """The default rule for ``precision`` with any value the user gave instead."""
    base = default_rule(precision)
    if min_ssim is not None and not -1.0 <= min_ssim <= 1.0:
        raise UsageError(f"--min-ssim must be in [-1, 1] (got {min_ssim})")
    if max_abs is not None and max_abs < 0:
        raise UsageError(f"--max-image-error must be at least 0 (got {max_abs})")
    return PassRule(base.min_psnr if min_psnr is None else float(min_psnr),
                    base.min_ssim if min_ssim is None else float(min_ssim),
                    base.max_abs if max_abs is None else float(max_abs))


# ---------------------------------------------------------------------------------------------------------------------
# settings and report
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerSettings:
    """What both sides run: sampler, steps, schedule, and how the model's output is read."""

    steps: int
    sampler: str = "ddim"
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    train_steps: int = 1000
    eta: float = 0.0
    clip_sample: bool = True
    prediction: str = "epsilon"  # resolved: "epsilon" or "learned-variance"


@dataclass
class StepRecord:
    """One sampler step: the differences of the model outputs and of the samples after the update."""

    index: int
    timestep: int
    output_max_abs: float
    output_mean_abs: float
    sample_max_abs: float
    sample_mean_abs: float
    nonfinite_reference: int
    nonfinite_candidate: int

    def to_dict(self) -> dict[str, Any]:
        return {k: json_number(v) for k, v in asdict(self).items()}


@dataclass
class ImageRecord:
    """One sample's final images in [0, 1], compared."""

    index: int
    max_abs: float
    psnr: float
    ssim: float
    nan_candidate: int
    inf_candidate: int
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {k: json_number(v) for k, v in asdict(self).items()}


@dataclass
class TrajectoryReport:
    """Everything :func:`verify_trajectory` measured; ``passed`` is the verdict, ``reference_images`` and
    ``candidate_images`` the final images in [0, 1] (N, C, H, W) for drawing (not in the JSON)."""

    artifact: str
    kind: str
    precision: str
    reference: str
    candidate: str
    seed: int
    shape: Shape
    settings: SamplerSettings
    rule: PassRule
    timesteps: list[int]
    steps: list[StepRecord] = field(default_factory=list)
    images: list[ImageRecord] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    reference_images: np.ndarray | None = None
    candidate_images: np.ndarray | None = None
    images_written: str | None = None

    @property
    def passed(self) -> bool:
        return bool(self.images) and all(i.passed for i in self.images) and \
            all(s.nonfinite_candidate <= s.nonfinite_reference for s in self.steps)

    def worst(self) -> dict[str, float]:
        """The worst sample's figures: lowest PSNR and SSIM, largest max abs."""
        return {"psnr": min(i.psnr for i in self.images), "ssim": min(i.ssim for i in self.images),
                "max_abs": max(i.max_abs for i in self.images)}

    def failures(self) -> list[str]:
        """One line per failing sample (or step with new NaN/Inf), naming the reason."""
        out = []
        for s in self.steps:
            if s.nonfinite_candidate > s.nonfinite_reference:
                out.append(f"step {s.index} (t={s.timestep}): {s.nonfinite_candidate} NaN/Inf in the candidate, "
                           f"{s.nonfinite_reference} in the reference")
                break
        r = self.rule
        for i in self.images:
            if not i.passed:
                why = [w for w, bad in ((f"PSNR {i.psnr:.2f} dB < {r.min_psnr:g}", not i.psnr >= r.min_psnr),
                                         (f"SSIM {i.ssim:.5f} < {r.min_ssim:g}", not i.ssim >= r.min_ssim),
                                         (f"max abs {i.max_abs:.3g} > {r.max_abs:g}", not i.max_abs <= r.max_abs),
                                         (f"{i.nan_candidate} NaN / {i.inf_candidate} Inf", bool(i.nan_candidate or i.inf_candidate)))
                       if bad]
                out.append(f"sample {i.index}: " + ", ".join(why))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "attn-export verify --trajectory",
            "artifact": self.artifact, "kind": self.kind, "precision": self.precision, "passed": self.passed,
            "reference": self.reference, "candidate": self.candidate, "seed": self.seed,
            "shape": format_shape(self.shape), "batch": self.shape[0], "height": self.shape[1], "width": self.shape[2],
            "sampler": asdict(self.settings), "rule": asdict(self.rule), "timesteps": list(self.timesteps),
            "final": {k: json_number(v) for k, v in self.worst().items()} if self.images else None,
            "images": [i.to_dict() for i in self.images], "steps": [s.to_dict() for s in self.steps],
            "failures": self.failures(), "seconds": {k: json_number(v) for k, v in self.seconds.items()},
            "images_written": self.images_written, "host": host_info(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


# ---------------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------------
def _abs_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Max and mean abs difference over the elements finite on both sides (nan when there are none)."""
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    d = d[np.isfinite(d)]
    return (float(d.max()), float(d.mean())) if d.size else (math.nan, math.nan)


def _nonfinite(a: np.ndarray) -> int:
    return int(np.size(a) - np.count_nonzero(np.isfinite(a)))


def trajectory_shape(spec: ModelSpec, batch: int | None, shapes: str | Sequence[str] | Sequence[Shape] | None) -> Shape:
    """The one BxHxW a trajectory runs at: the given shape, or ``batch`` at the model's fixed or typical size."""
    if isinstance(shapes, str) or (shapes and isinstance(next(iter(shapes)), str)):
        shapes = parse_shapes(shapes)  # type: ignore[arg-type]  # text, as the test above found
    if shapes:
        shapes = [cast(Shape, tuple(int(v) for v in s)) for s in shapes]
        if len(shapes) != 1:
            raise UsageError("--trajectory samples at one shape; give one BxHxW in --shapes (or --batch)")
        if batch is not None and batch != shapes[0][0]:
            raise UsageError(f"--batch {batch} and --shapes {format_shape(shapes[0])} disagree; give one of them")
        return shapes[0]
    b = DEFAULT_BATCH if batch is None else batch
    if b < 1:
        raise UsageError(f"--batch must be at least 1 (got {b})")
    if spec.fixed_hw is not None:
        return (b, *spec.fixed_hw)
    size = round_up(typical_size(spec), spec.hw_multiple)
    fitted = fit_shapes(spec, [(b, size, size)])
    if not fitted:
        raise UsageError("no default image size fits this artifact; pass --shapes BxHxW")
    return fitted[0]


def _read_artifact(path: Path, input_ranges: dict[str, tuple[float, float]] | None
                   ) -> tuple[str, ModelSpec, str, Any, list[str], Any]:
    """(kind, spec, precision, engine profiles or None, the ONNX file's parts in words, its weightless graph or
    None) as verify reads them."""
    from .engines.sidecar import is_engine_path

    kind = "engine" if is_engine_path(path) else "onnx"
    if kind == "engine":
        from .engines.sidecar import read_sidecar, sidecar_profiles, sidecar_spec

        sidecar = read_sidecar(path)
        spec = sidecar_spec(sidecar)
        return kind, spec, str(sidecar.get("precision") or spec.precision), sidecar_profiles(sidecar), [], None
    from .exporter.foreign import spec_of
    from .exporter.metadata import load_onnx

    graph = load_onnx(path, load_external_data=False)
    spec = spec_of(graph, origin=str(path), input_ranges=input_ranges)
    from .exporter.serving import written_parts

    return kind, spec, spec.precision, None, written_parts(graph), graph


def _prediction(spec: ModelSpec, asked: str) -> str:
    """How the first output is read: epsilon, or epsilon in the first C channels and the variance in the rest."""
    if asked not in PREDICTIONS:
        raise UsageError(f"unknown --prediction {asked!r}; use one of {', '.join(PREDICTIONS)}")
    dims = spec.outputs[0].dims
    out_c = dims[1] if len(dims) == 4 and isinstance(dims[1], int) else None
    c = spec.in_channels
    if asked == "auto":
        return "learned-variance" if out_c == 2 * c else "epsilon"
    if asked == "learned-variance" and out_c is not None and out_c != 2 * c:
        raise UsageError(f"--prediction learned-variance needs an output of 2x{c} channels; this model's has {out_c}")
    return asked


def verify_trajectory(
    artifact: str | Path,
    steps: int,
    *,
    sampler: str = "ddim",
    batch: int | None = None,
    shapes: str | Sequence[str] | Sequence[Shape] | None = None,
    seed: int = 0,
    beta_schedule_kind: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    train_steps: int | None = None,
    eta: float = 0.0,
    clip_sample: bool = True,
    prediction: str = "auto",
    min_psnr: float | None = None,
    min_ssim: float | None = None,
    max_abs: float | None = None,
    reference: str | Path | None = None,
    reference_model: ReferenceOptions | None = None,
    providers: Sequence[str] | None = None,
    form: str = "written",
    input_ranges: dict[str, tuple[float, float]] | None = None,
    max_memory: int | None = None,
    progress: ProgressFn | None = None,
    backend: str = "onnxruntime",
    precision: str | None = None,
) -> TrajectoryReport:
    """Sample ``steps`` steps of ``sampler`` with ``artifact`` and with its reference, side by side, and compare.

    The reference is the PyTorch model the artifact describes (as in
    :func:`attn_export.verify.verify`; ``reference_model`` chooses it), or
    the ONNX file ``reference`` in ONNX Runtime. Both start from the same
    noise (``seed``) and get the same class labels and extra inputs (drawn
    once, as verify draws them); DDPM draws each step's noise from
    ``(seed, step)``, the same on both sides. The schedule is ``beta_schedule_kind``
    from ``beta_start`` to ``beta_end`` over ``train_steps`` (default: the
    model's recorded training steps, 1000). ``prediction``: "auto" reads a
    2*C-channel output as epsilon and variance (learned variance), else epsilon.
    Pass rule: :func:`default_rule` for the artifact's precision, each value
    replaceable. ``max_memory``: as verify's, bytes one call may need. Raises UsageError (exit 2) for bad options; a trajectory that
    runs and differs is ``report.passed == False``.
    """
    path = Path(artifact)
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown --sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    if not isinstance(steps, int) or steps < 1:
        raise UsageError(f"--trajectory needs a number of steps of at least 1 (got {steps})")
    if not 0.0 <= eta <= 1.0:
        raise UsageError(f"--eta must be in [0, 1] (got {eta})")
    if not 0 < beta_start < beta_end < 1:
        raise UsageError(f"betas must satisfy 0 < start < end < 1 (got {beta_start}..{beta_end})")
    if form not in ("written", "serving"):
        raise UsageError(f"--form must be one of written, serving (got {form!r})")
    if not path.is_file():
        raise UsageError(f"artifact not found: {path}")
    ov_precision: str | None = None
    if backend == "openvino":
        from .runners.openvino_runner import PROJECT_PRECISION, import_openvino, parse_precision

        ov_precision = parse_precision(precision)
        if providers or form != "written":
            raise UsageError("--provider and --form serving are ONNX Runtime's; OpenVINO runs the file as written")
        import_openvino()  # a missing OpenVINO is said before anything is parsed
    elif backend != "onnxruntime":
        raise UsageError(f"--backend must be onnxruntime or openvino (got {backend!r})")
    elif precision is not None:
        raise UsageError("--precision sets OpenVINO's inference precision: add --backend openvino")
    kind, spec, file_precision, profiles, file_parts, graph = _read_artifact(path, input_ranges)
    if kind == "engine" and (providers or ov_precision is not None):
        raise UsageError("--provider and --backend apply to ONNX files; an engine always runs in TensorRT")
    # The compute precision decides the pass rule when it is lower than the file's (an FP32 file run in bf16).
    precision = PROJECT_PRECISION[ov_precision] if ov_precision not in (None, "f32") else file_precision
    train = int(train_steps if train_steps is not None else spec.num_timesteps)
    if train < 1:
        raise UsageError(f"--train-steps must be at least 1 (got {train})")
    timesteps = sampling_timesteps(steps, train)
    alphas_cumprod = np.cumprod(1.0 - beta_schedule(beta_schedule_kind, train, beta_start, beta_end))
    settings = SamplerSettings(steps, sampler, beta_schedule_kind, beta_start, beta_end, train, eta, clip_sample,
                               _prediction(spec, prediction))
    rule = resolve_rule(precision, min_psnr=min_psnr, min_ssim=min_ssim, max_abs=max_abs)
    shape = trajectory_shape(spec, batch, shapes)
    from .engines.profiles import check_servable

    check_servable(shape, spec, profiles)
    if graph is not None:
        from .graph.memory import check_shapes_fit

        check_shapes_fit(graph, spec, [shape], max_memory)
        del graph  # its inline weights are not needed while the runners hold their own
    from .exporter.foreign import is_foreign

    if reference is None and is_foreign(spec):
        raise UsageError(f"{path} has no attn-export description, so there is no PyTorch model to sample with; "
                         "pass --reference model.onnx (for example the FP32 file it was made from)")
    if reference is not None and not Path(reference).is_file():
        raise UsageError(f"reference ONNX file not found: {reference}")
    options = reference_model or ReferenceOptions()
    if reference is not None and options.names_model:
        raise UsageError("--reference replaces the PyTorch model; drop --preset/--config/--model/--checkpoint")

    total = steps + 2
    say = (lambda i, text: progress(text, i, total)) if progress else (lambda i, text: None)
    seconds: dict[str, float] = {}
    # The candidate first: a missing TensorRT or GPU should fail before the (slow) reference is built.
    say(0, f"loading {kind}")
    t0 = time.perf_counter()
    cand: Runner
    if kind == "engine":
        from .runners.trt_runner import TrtRunner

        cand = TrtRunner(path)
        cand_desc = f"tensorrt ({precision})"
    elif ov_precision is not None:
        from .runners.openvino_runner import OpenVinoRunner

        cand = OpenVinoRunner(path, precision=ov_precision, spec=spec)
        cand_desc = f"openvino (CPU, {ov_precision}, {', '.join(file_parts)})"
    else:
        from .runners.ort_runner import OrtRunner

        ort = OrtRunner(path, providers=providers, spec=spec, attention="as-is" if form == "written" else "onnxruntime")
        cand = ort
    cand.activate()
    if kind != "engine" and ov_precision is None:
        parts = file_parts if form == "written" else ["serving form", *ort.serving_form_parts()]
        cand_desc = f"onnxruntime ({', '.join([ort.provider, *parts])})"
    seconds["candidate setup"] = time.perf_counter() - t0
    try:
        say(1, "building the reference")
        t0 = time.perf_counter()
        ref, ref_desc = _reference_runner(spec, kind, reference, options, input_ranges, form)
        seconds["reference setup"] = time.perf_counter() - t0
        try:
            report = _sample_both(ref, cand, spec, shape, seed, settings, timesteps, alphas_cumprod, say, seconds)
        finally:
            ref.deactivate()
    finally:
        cand.deactivate()
    report.artifact, report.kind, report.precision = str(path), kind, precision
    report.reference, report.candidate, report.rule = ref_desc, cand_desc, rule
    _judge(report)
    say(total, "done")
    return report


def _reference_runner(spec: ModelSpec, kind: str, reference: str | Path | None, options: ReferenceOptions,
                      input_ranges: dict[str, tuple[float, float]] | None, form: str) -> tuple[Runner, str]:
    """The reference runner, active, and its description: another ONNX file, else the PyTorch model."""
    if reference is not None:
        from .exporter.foreign import spec_of
        from .runners.ort_runner import OrtRunner

        ort = OrtRunner(reference, spec=spec_of(reference, input_ranges=input_ranges),
                        attention="as-is" if form == "written" else "onnxruntime")
        ort.name = "reference"
        differing = sorted({t.name for t in spec.inputs} ^ {t.name for t in ort.spec.inputs})
        if differing:
            raise UsageError(f"--reference {reference} does not take the same inputs (differing: {', '.join(differing)})")
        ort.activate()
        return ort, f"onnxruntime ({Path(reference).name}, {ort.provider})"
    from .models.loader import check_reference_fits, load_model, source_from_spec
    from .runners.torch_runner import TorchRunner

    loaded = load_model(source_from_spec(spec, options), attention_impl="reference")
    check_reference_fits(spec, loaded.spec)
    runner = TorchRunner.from_loaded(loaded)
    if kind == "engine":
        import torch

        if torch.cuda.is_available():
            runner.device = "cuda"
    runner.activate()
    return runner, f"pytorch ({runner.device})"


def _sample_both(ref: Runner, cand: Runner, spec: ModelSpec, shape: Shape, seed: int, settings: SamplerSettings,
                 timesteps: np.ndarray, alphas_cumprod: np.ndarray, say: Any, seconds: dict[str, float]) -> TrajectoryReport:
    """Run the sampler with both runners in lockstep (each on its own sample) and record every step."""
    b, h, w = shape
    x_name, t_name = spec.inputs[0].name, spec.inputs[1].name
    # Class labels and extra inputs as verify draws them, once; they hold for the whole trajectory.
    fixed = {k: v for k, v in spec.make_inputs(b, h, w, seed=seed).items() if k not in (x_name, t_name)}
    c = spec.in_channels
    x0 = np.random.default_rng(seed).standard_normal((b, c, h, w))
    x_ref, x_cand = x0.copy(), x0.copy()
    t_dtype = spec.inputs[1].dtype
    stride = settings.train_steps // settings.steps
    report = TrajectoryReport(artifact="", kind="", precision="", reference="", candidate="", seed=seed, shape=shape,
                              settings=settings, rule=DEFAULT_RULES["fp32"], timesteps=[int(t) for t in timesteps])
    seconds.setdefault("reference", 0.0)
    seconds.setdefault("candidate", 0.0)
    for i, t in enumerate(int(v) for v in timesteps):
        say(2 + i, f"step {i + 1}/{len(timesteps)} (t={t})")
        tt = np.full((b,), t).astype(t_dtype)
        outs = []
        for side, runner, x in (("reference", ref, x_ref), ("candidate", cand, x_cand)):
            feeds = {x_name: x.astype(np.float32), t_name: tt, **fixed}
            feeds = {n.name: np.asarray(feeds[n.name]).astype(n.dtype) for n in runner.spec.inputs} \
                if side == "reference" else feeds
            t0 = time.perf_counter()
            out = next(iter(runner.infer(feeds).values()))
            seconds[side] += time.perf_counter() - t0
            outs.append(np.asarray(out, dtype=np.float64))
        noise = np.random.default_rng([seed, i + 1]).standard_normal(x0.shape) \
            if settings.sampler == "ddpm" or settings.eta > 0 else None
        new = []
        for out, x in zip(outs, (x_ref, x_cand)):
            eps, var = (out[:, :c], out[:, c:2 * c]) if settings.prediction == "learned-variance" else (out, None)
            if settings.sampler == "ddim":
                new.append(ddim_step(eps, t, t - stride, x, alphas_cumprod, clip=settings.clip_sample,
                                     eta=settings.eta, noise=noise))
            else:
                new.append(ddpm_step(eps, t, t - stride, x, alphas_cumprod, clip=settings.clip_sample, noise=noise,
                                     variance_out=var))
        x_ref, x_cand = new
        o_max, o_mean = _abs_stats(outs[0], outs[1])
        s_max, s_mean = _abs_stats(x_ref, x_cand)
        report.steps.append(StepRecord(i, t, o_max, o_mean, s_max, s_mean,
                                       _nonfinite(outs[0]) + _nonfinite(x_ref), _nonfinite(outs[1]) + _nonfinite(x_cand)))
    report.seconds = dict(seconds)
    report.reference_images, report.candidate_images = to_unit(x_ref), to_unit(x_cand)
    # NaN/Inf survive to_unit's clip as NaN (Inf is clipped): count them on the raw samples.
    report.images = [ImageRecord(k, 0.0, 0.0, 0.0, int(np.isnan(x_cand[k]).sum()), int(np.isinf(x_cand[k]).sum()), False)
                     for k in range(b)]
    return report


def _judge(report: TrajectoryReport) -> None:
    """Fill in each sample's final-image figures and verdict under ``report.rule``."""
    ref, cand = report.reference_images, report.candidate_images
    assert ref is not None and cand is not None
    finite = np.nan_to_num(cand, nan=0.0)
    p, s = psnr(ref, finite), ssim(ref, finite)
    r = report.rule
    for k, img in enumerate(report.images):
        img.max_abs = float(np.abs(ref[k] - finite[k]).max())
        img.psnr, img.ssim = float(p[k]), float(s[k])
        img.passed = (img.psnr >= r.min_psnr and img.ssim >= r.min_ssim and img.max_abs <= r.max_abs
                      and not (img.nan_candidate or img.inf_candidate))


__all__ = [
    "SAMPLERS", "BETA_SCHEDULES", "PREDICTIONS", "DEFAULT_RULES", "PassRule", "SamplerSettings", "StepRecord",
    "ImageRecord", "TrajectoryReport", "beta_schedule", "sampling_timesteps", "ddim_step", "ddpm_step", "ssim",
    "psnr", "to_unit", "default_rule", "resolve_rule", "trajectory_shape", "verify_trajectory",
]
