"""Train the tiny preset for a few minutes on drawn shapes: a trained checkpoint for trajectory measurements.

This machine has no network, so no published DDPM checkpoint can be fetched; whole sampling runs of untrained
presets are chaotic (docs/trajectory.md). This script gives them a denoiser that has learned something: random
discs and boxes in random colours on a colour gradient, 32x32, trained with the DDPM objective (epsilon, linear
betas 1e-4..0.02 over 1000 steps, the presets' schedule), Adam, weights averaged (EMA 0.999). It writes the
averaged weights as safetensors, for `attn-export onnx --preset tiny --checkpoint FILE`.

    python bench/toy_checkpoint.py --minutes 14 -o toy.safetensors
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from attn_export.models import UNet, preset_config
from attn_export.trajectory import beta_schedule


def drawn_shapes(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` images in [-1, 1]: a two-colour gradient with one to three filled discs or boxes on it."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    c0, c1 = torch.rand(n, 3, 1, 1, generator=gen), torch.rand(n, 3, 1, 1, generator=gen)
    angle = torch.rand(n, 1, 1, generator=gen) * 6.2832
    ramp = (xs * torch.cos(angle) + ys * torch.sin(angle)).unsqueeze(1)
    ramp = (ramp - ramp.amin((2, 3), keepdim=True)) / (ramp.amax((2, 3), keepdim=True) - ramp.amin((2, 3), keepdim=True))
    img = c0 + (c1 - c0) * ramp
    for _ in range(3):
        present = (torch.rand(n, 1, 1, 1, generator=gen) < 0.7).float()
        cx, cy = torch.rand(n, 1, 1, generator=gen), torch.rand(n, 1, 1, generator=gen)
        r = 0.1 + 0.2 * torch.rand(n, 1, 1, generator=gen)
        disc = ((xs - cx) ** 2 + (ys - cy) ** 2 < r ** 2).float()
        box = (((xs - cx).abs() < r) & ((ys - cy).abs() < r)).float()
        is_disc = (torch.rand(n, 1, 1, generator=gen) < 0.5).float()
        mask = (is_disc * disc + (1 - is_disc) * box).unsqueeze(1) * present
        colour = torch.rand(n, 3, 1, 1, generator=gen)
        img = img * (1 - mask) + colour * mask
    return img * 2 - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=14.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    config = preset_config("tiny")
    model = UNet(config)
    ema = copy.deepcopy(model).eval()
    # The schedule verify --trajectory samples with by default, so the model is trained for what it is checked on.
    abar = torch.from_numpy(np.cumprod(1 - beta_schedule("linear", config.num_timesteps))).float()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start, step, losses = time.monotonic(), 0, []
    budget = args.minutes * 60
    while time.monotonic() - start < budget:
        # The last third at a third of the rate: the averaged weights settle.
        for group in opt.param_groups:
            group["lr"] = args.lr if time.monotonic() - start < budget * 2 / 3 else args.lr / 3
        x0 = drawn_shapes(args.batch, args.size, gen)
        t = torch.randint(0, config.num_timesteps, (args.batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        loss = ((model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(0.999).add_(pm, alpha=0.001)
        losses.append(loss.item())
        step += 1
        if step % 200 == 0:
            print(f"step {step}, {time.monotonic() - start:.0f} s, loss (last 200) {sum(losses[-200:]) / 200:.4f}",
                  flush=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp))
    tmp.replace(args.output)
    print(f"{step} steps in {time.monotonic() - start:.0f} s; final loss (last 200) {sum(losses[-200:]) / max(len(losses[-200:]), 1):.4f}; "
          f"wrote {args.output}")


if __name__ == "__main__":
    main()
