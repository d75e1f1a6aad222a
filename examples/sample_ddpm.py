#!/usr/bin/env python
"""DDPM ancestral sampling with any attn-export runner (ONNX Runtime, OpenVINO, PyTorch, TensorRT).

    python examples/sample_ddpm.py unet.onnx --steps 50 --batch 2 --size 32 --seed 0 --out samples.npy
    python examples/sample_ddpm.py unet.plan --steps 1000 --batch 8 --size 32 --out samples.npy
    python examples/sample_ddpm.py unet.onnx --backend pytorch --steps 50 --out reference.npy

The model was trained with T = 1000 steps and linear betas from 1e-4 to 0.02
(Ho et al.). ``--steps`` below T samples on an evenly spaced subset of the
training steps with the betas recomputed from the cumulative products
("respacing", as in improved-diffusion), so the denoiser always receives
timesteps from its training range; ``--steps 1000`` is exactly DDPM.

All noise comes from one numpy Generator seeded with ``--seed``: the same
seed gives the same noise sequence on every backend, so the samples of two
backends differ only by their numerical error, accumulated over the steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def linear_betas(num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """The DDPM training schedule (float64)."""
    return np.linspace(beta_start, beta_end, num_train_steps, dtype=np.float64)


def respaced_schedule(steps: int, num_train_steps: int = 1000, beta_start: float = 1e-4,
                      beta_end: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, betas) for sampling in ``steps`` steps: an evenly spaced subset of the training steps,
    with betas chosen so that the cumulative alpha products match the training schedule at those steps."""
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"--steps must be between 1 and {num_train_steps} (got {steps})")
    alphas_cumprod = np.cumprod(1.0 - linear_betas(num_train_steps, beta_start, beta_end))
    timesteps = np.unique(np.round(np.linspace(0, num_train_steps - 1, steps)).astype(np.int64))
    abar = alphas_cumprod[timesteps]
    prev = np.concatenate([[1.0], abar[:-1]])
    return timesteps, 1.0 - abar / prev


def sample(denoise: Callable[..., Any], *, batch: int, size: int, channels: int = 3, steps: int = 50,
           seed: int = 0, num_train_steps: int = 1000, clip: bool = True, variance: str = "large",
           class_label: int | None = None, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Ancestral sampling: x_T ~ N(0, I), then for each step x_{t-1} ~ p(x_{t-1} | x_t) with the predicted noise.

    ``denoise(x, t[, y])`` is a runner (or any callable) returning the predicted noise for
    x float32 (B, C, H, W) and t int64 (B,). ``variance``: "large" uses beta_t (Ho's CIFAR-10
    setting), "small" the posterior variance. ``clip`` clips the predicted x_0 to [-1, 1] as Ho's sampler does.
    """
    timesteps, betas = respaced_schedule(steps, num_train_steps)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    y = None if class_label is None else np.full((batch,), class_label, dtype=np.int64)
    n = len(timesteps)
    for i in reversed(range(n)):
        t = np.full((batch,), timesteps[i], dtype=np.int64)
        eps = np.asarray(denoise(x, t) if y is None else denoise(x, t, y), dtype=np.float64)
        xd = x.astype(np.float64)
        # Predicted x_0 from the noise, then the posterior mean of q(x_{t-1} | x_t, x_0).
        x0 = (xd - np.sqrt(1.0 - abar[i]) * eps) / np.sqrt(abar[i])
        if clip:
            x0 = np.clip(x0, -1.0, 1.0)
        mean = (np.sqrt(abar_prev[i]) * betas[i] / (1.0 - abar[i])) * x0 \
            + (np.sqrt(alphas[i]) * (1.0 - abar_prev[i]) / (1.0 - abar[i])) * xd
        if i > 0:
            var = betas[i] if variance == "large" else betas[i] * (1.0 - abar_prev[i]) / (1.0 - abar[i])
            # Drawn every step, whatever the backend, so the noise sequence only depends on the seed.
            z = rng.standard_normal(x.shape)
            xd = mean + np.sqrt(var) * z
        else:
            xd = mean
        x = xd.astype(np.float32)
        if progress:
            progress(n - i, n)
    return x


def open_runner(artifact: str, backend: str = "auto", provider: str = "cpu", threads: int | None = None,
                precision: str | None = None) -> Any:
    """A Runner for the artifact: ONNX Runtime for .onnx, TensorRT for engines, OpenVINO (at ``precision``) or PyTorch."""
    path = Path(artifact)
    if backend == "auto":
        backend = "tensorrt" if path.suffix.lower() in (".plan", ".engine", ".trt") else "onnxruntime"
    if backend == "onnxruntime":
        from attn_export.runners.ort_runner import OrtRunner

        return OrtRunner(path, providers=[provider], threads=threads)
    if backend == "tensorrt":
        from attn_export.runners.trt_runner import TrtRunner

        return TrtRunner(path)
    if backend == "openvino":
        from attn_export.runners.openvino_runner import OpenVinoRunner

        return OpenVinoRunner(path, precision=precision or "", threads=threads)  # no precision: refused, by name
    if backend == "pytorch":
        from attn_export.engines.sidecar import artifact_spec
        from attn_export.runners.torch_runner import TorchRunner
        from attn_export.models.loader import source_from_spec

        spec = artifact_spec(path)
        return TorchRunner(source_from_spec(spec), spec=spec, threads=threads)
    raise SystemExit(f"unknown backend {backend!r}: use auto, onnxruntime, openvino, pytorch or tensorrt")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", help="unet.onnx, or a TensorRT engine (.plan with its .json sidecar)")
    ap.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "openvino", "pytorch", "tensorrt"])
    ap.add_argument("--precision", default=None, help="OpenVINO's inference precision (required with --backend openvino): "
                    "f32, bf16 or f16")
    ap.add_argument("--provider", default="cpu", help="ONNX Runtime provider: cpu, cuda, tensorrt")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=50, help="sampling steps (<= the training T; T gives plain DDPM)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=32, help="H = W of the samples (a multiple of the model's H/W multiple)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--class-label", type=int, default=None, help="class id for class-conditional models")
    ap.add_argument("--variance", choices=["large", "small"], default="large")
    ap.add_argument("--no-clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1]")
    ap.add_argument("--out", default="samples.npy", help="where to save the samples (float32, B x C x H x W, in [-1, 1])")
    args = ap.parse_args(argv)

    from attn_export.atomic import atomic_path
    from attn_export.errors import AttnExportError

    try:
        runner = open_runner(args.artifact, args.backend, args.provider, args.threads, args.precision)
        with runner:
            spec = runner.spec
            if spec.num_classes and args.class_label is None:
                raise SystemExit("this model is class-conditional: pass --class-label")
            t0 = time.perf_counter()
            out = sample(runner, batch=args.batch, size=args.size, channels=spec.in_channels, steps=args.steps,
                         seed=args.seed, num_train_steps=spec.num_timesteps, clip=not args.no_clip,
                         variance=args.variance, class_label=args.class_label,
                         progress=lambda k, n: print(f"\rstep {k}/{n}", end="", file=sys.stderr, flush=True))
            seconds = time.perf_counter() - t0
    except AttnExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(file=sys.stderr)
    with atomic_path(args.out, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, out)
    print(f"{runner.name}: {args.batch} samples of {args.size}x{args.size} in {args.steps} steps, "
          f"{seconds:.1f} s ({1e3 * seconds / args.steps:.1f} ms/step); range [{out.min():.3f}, {out.max():.3f}] "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
