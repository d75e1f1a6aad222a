"""Small denoisers whose attention is written the ways real UNets write it, for the attention-form tests.

Each factory returns a ``model(x, t)`` with two attention sites (one at full
resolution, one after a stride-2 conv), so a test can check that every site is
found and rewritten. Importable as ``attention_zoo:<factory>`` through ``--model``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    """GroupNorm -> 1x1 qkv conv -> attention (subclass) -> 1x1 out conv + residual."""

    def __init__(self, ch: int, heads: int = 1) -> None:
        super().__init__()
        self.ch, self.heads = ch, heads
        self.norm = nn.GroupNorm(8, ch)
        self.to_qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.to_out = nn.Conv2d(ch, ch, 1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = torch.split(self.to_qkv(self.norm(x)), self.ch, dim=1)  # each [B, C, H, W]
        out = self.attend(q, k, v, (h, w))  # [B, C, H, W]
        return self.to_out(out) + x


class SeedBmm(_Block):
    """The seed article's block: bmm with K as [B, C, S], the scale c ** -0.5 read from x.shape at run time."""

    def attend(self, q, k, v, hw):
        b, c, h, w = q.shape
        q = q.permute(0, 2, 3, 1).reshape(b, h * w, c)
        k = k.reshape(b, c, h * w)
        v = v.permute(0, 2, 3, 1).reshape(b, h * w, c)
        dot = torch.bmm(q, k) * (c ** (-0.5))
        att = torch.softmax(dot, dim=-1)
        out = torch.bmm(att, v)
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2)


class LogitsDiv(_Block):
    """Scale as a division of the logits by a constant sqrt(C), K transposed."""

    def attend(self, q, k, v, hw):
        b, c, h, w = q.shape
        q, k, v = (t.flatten(2).transpose(1, 2) for t in (q, k, v))  # [B, S, C]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.ch), dim=-1)
        return (att @ v).transpose(1, 2).reshape(b, c, h, w)


class SqrtQK(_Block):
    """sqrt(scale) on q and on k (as the SDPA decomposition and guided-diffusion write it), matmul form."""

    def attend(self, q, k, v, hw):
        b, c, h, w = q.shape
        s = 1.0 / math.sqrt(math.sqrt(self.ch))
        q, k, v = (t.flatten(2).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax((q * s) @ (k.transpose(1, 2) * s), dim=-1)
        return (att @ v).transpose(1, 2).reshape(b, c, h, w)


class EinsumChannelFirst(_Block):
    """guided-diffusion's QKVAttentionLegacy: q and k times C^-1/4, Einsum bct,bcs->bts then bts,bcs->bct."""

    def attend(self, q, k, v, hw):
        b, c, h, w = q.shape
        n = self.heads
        q, k, v = (t.reshape(b * n, c // n, h * w) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(c // n))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = torch.einsum("bts,bcs->bct", weight, v)
        return out.reshape(b, c, h, w)


class MultiHeadSdpa(_Block):
    """F.scaled_dot_product_attention on [B, heads, S, d] (ADM, diffusers' AttnProcessor2_0)."""

    def attend(self, q, k, v, hw):
        b, c, h, w = q.shape
        n = self.heads
        q, k, v = (t.reshape(b, n, c // n, h * w).transpose(-1, -2) for t in (q, k, v))  # [B, n, S, d]
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(-1, -2).reshape(b, c, h, w)


class MultiHeadEinsum(_Block):
    """Einsum on [B, heads, S, d]: bhqd,bhkd->bhqk then bhqk,bhkd->bhqd, scale on the logits."""

    def attend(self, q, k, v, hw):
        b, c, h, w = q.shape
        n = self.heads
        q, k, v = (t.reshape(b, n, c // n, h * w).transpose(-1, -2) for t in (q, k, v))
        logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * (c // n) ** -0.5
        out = torch.einsum("bhqk,bhkd->bhqd", logits.softmax(dim=-1), v)
        return out.transpose(-1, -2).reshape(b, c, h, w)


class BiasedLogits(_Block):
    """A learned bias added to the logits before the Softmax: attention-like, but not a form we rewrite."""

    def __init__(self, ch: int, heads: int = 1) -> None:
        super().__init__(ch, heads)
        self.bias = nn.Parameter(torch.zeros(1))

    def attend(self, q, k, v, hw):
        b, c, h, w = q.shape
        q, k, v = (t.flatten(2).transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(1, 2) * c ** -0.5
        att = torch.softmax(logits + self.bias * logits.mean(dim=-1, keepdim=True), dim=-1)
        return (att @ v).transpose(1, 2).reshape(b, c, h, w)


class Denoiser(nn.Module):
    """conv in -> attention -> stride-2 conv -> attention -> upsample -> conv out, conditioned on t."""

    def __init__(self, block: type[_Block], ch: int = 32, heads: int = 1) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.temb = nn.Linear(1, ch)
        self.att1 = block(ch, heads)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.att2 = block(ch, heads)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.temb(t.float()[:, None] / 1000.0)[:, :, None, None]
        h = self.att1(h)
        h = self.att2(self.down(h))
        return self.out(self.up(h))


FORMS: dict[str, tuple[type[_Block], int]] = {
    "seed_bmm": (SeedBmm, 1),
    "logits_div": (LogitsDiv, 1),
    "sqrt_qk": (SqrtQK, 1),
    "einsum_channel_first": (EinsumChannelFirst, 1),
    "einsum_channel_first_mh": (EinsumChannelFirst, 4),
    "sdpa_mh": (MultiHeadSdpa, 4),
    "sdpa_1h": (MultiHeadSdpa, 1),
    "einsum_mh": (MultiHeadEinsum, 2),
}


def make(form: str, ch: int = 32) -> Denoiser:
    """A seeded denoiser whose attention is written in ``form`` (a key of FORMS, or "biased")."""
    torch.manual_seed(0)
    block, heads = (BiasedLogits, 1) if form == "biased" else FORMS[form]
    model = Denoiser(block, ch, heads).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial weights: attention that is not near-uniform
            p.add_(torch.randn_like(p) * 0.05)
    return model


def seed_bmm() -> Denoiser:
    return make("seed_bmm")


def logits_div() -> Denoiser:
    return make("logits_div")


def sqrt_qk() -> Denoiser:
    return make("sqrt_qk")


def einsum_channel_first() -> Denoiser:
    return make("einsum_channel_first")


def einsum_channel_first_mh() -> Denoiser:
    return make("einsum_channel_first_mh")


def sdpa_mh() -> Denoiser:
    return make("sdpa_mh")


def sdpa_1h() -> Denoiser:
    return make("sdpa_1h")


def einsum_mh() -> Denoiser:
    return make("einsum_mh")


def biased() -> Denoiser:
    return make("biased")


def diffusers_ddpm_cifar10() -> nn.Module:
    """diffusers' UNet2DModel in the DDPM CIFAR-10 layout (the google/ddpm-cifar10-32 config), seeded weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
        norm_num_groups=32, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, act_fn="silu",
    ).eval()


class SigmaDenoiser(nn.Module):
    """A denoiser fed (noisy, sigma, difficulty) as trained diffusion UNets from elsewhere are, with
    guided-diffusion Einsum attention at two levels and one MatMul attention site."""

    def __init__(self, ch: int = 32) -> None:
        super().__init__()
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.cond = nn.Linear(2, ch)
        self.att1 = EinsumChannelFirst(ch, 1)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.att2 = EinsumChannelFirst(ch, 2)
        self.att3 = SqrtQK(ch, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.out = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, noisy: torch.Tensor, sigma: torch.Tensor, difficulty: torch.Tensor) -> torch.Tensor:
        c = self.cond(torch.stack([torch.log(sigma + 1e-3), difficulty], dim=-1))
        h = self.inp(noisy) + c[:, :, None, None]
        h = self.att1(h)
        h = self.att3(self.att2(self.down(h)))
        return self.out(self.up(h))


def foreign_onnx(path: str, opset: int = 18) -> SigmaDenoiser:
    """Export a seeded SigmaDenoiser with plain torch.onnx.export (no attn-export metadata) to ``path``."""
    import warnings

    torch.manual_seed(0)
    model = SigmaDenoiser().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    args = (torch.randn(2, 1, 16, 24), torch.tensor([0.5, 3.0]), torch.tensor([0.1, 0.9]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, path, dynamo=False, opset_version=opset,
                          input_names=["noisy", "sigma", "difficulty"], output_names=["denoised"],
                          dynamic_axes={"noisy": {0: "N", 2: "H", 3: "W"}, "sigma": {0: "N"}, "difficulty": {0: "N"},
                                        "denoised": {0: "N", 2: "H", 3: "W"}})
    return model


def diffusers_small_classic() -> nn.Module:
    """A small diffusers UNet2DModel with the classic AttnProcessor (baddbmm, softmax, bmm), seeded weights."""
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import AttnProcessor

    torch.manual_seed(3)
    model = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=8,
    ).eval()
    for module in model.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(AttnProcessor())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model
