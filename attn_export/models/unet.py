"""A DDPM-style UNet (Ho et al. layout) built around the seed's AttentionBlock.

Module names follow the common PyTorch DDPM code base the seed block comes
from (``time_mlp``, ``init_conv``, ``downs``, ``mids``, ``ups``, ``out_norm``,
``out_conv``; residual blocks with ``norm_1``, ``conv_1``, ``time_bias``,
``class_bias``, ``norm_2``, ``conv_2``, ``residual_connection``,
``attention``), so checkpoints trained with it load by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeError, UsageError
from .attention import AttentionBlock, AttentionImpl, get_norm

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "mish": nn.Mish}


@dataclass
class UNetConfig:
    """Every knob of the UNet. ``attention_levels`` holds level indices (0 = full resolution)."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mults: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_levels: Sequence[int] = (1,)
    mid_attention: bool = True
    time_emb_dim: int = 512
    num_classes: int | None = None
    norm: str | None = "gn"
    num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.1
    activation: str = "silu"
    # Timestep embedding switches: Ho's TF code divides by (half - 1) (freq_shift=1);
    # the seed's code base divides by half (freq_shift=0). Sin comes first unless flipped.
    freq_shift: int = 0
    flip_sin_to_cos: bool = False
    time_emb_scale: float = 1.0
    # "symmetric": conv(stride 2, pad 1). "asymmetric": TF 'SAME' = pad (0,1,0,1) then conv(pad 0), as Ho.
    downsample_padding: str = "symmetric"
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        self.attention_levels = tuple(int(a) for a in self.attention_levels)
        self.validate()

    def validate(self) -> None:
        """Raise UsageError naming the first inconsistent setting."""
        levels = len(self.channel_mults)
        if levels < 1:
            raise UsageError("config: channel_mults must have at least one entry")
        for lvl in self.attention_levels:
            if not 0 <= lvl < levels:
                raise UsageError(f"config: attention level {lvl} is outside 0..{levels - 1}")
        if self.norm not in ("gn", "in", "bn", None):
            raise UsageError(f"config: unknown norm {self.norm!r}; use 'gn', 'in', 'bn' or null")
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"config: unknown activation {self.activation!r}; use one of {sorted(ACTIVATIONS)}")
        if self.downsample_padding not in ("symmetric", "asymmetric"):
            raise UsageError("config: downsample_padding must be 'symmetric' or 'asymmetric'")
        if self.base_channels % 2:
            raise UsageError("config: base_channels must be even (sinusoidal embedding)")
        if self.norm == "gn":
            for width in {self.base_channels * m for m in self.channel_mults} | {self.base_channels}:
                if width % self.num_groups:
                    raise UsageError(
                        f"config: {width} channels are not divisible by num_groups={self.num_groups}"
                    )
        if self.num_classes is not None and self.num_classes < 1:
            raise UsageError("config: num_classes must be a positive integer or null")

    @property
    def hw_multiple(self) -> int:
        """H and W must be multiples of this: 2**(levels - 1)."""
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def min_deep_positions(self) -> int:
        """Positions needed at the deepest level. Instance norm is undefined on one position and
        ill-conditioned on two or three (its outputs saturate near +-1 and amplify rounding error
        to ~1e-1 in the output), so it needs four."""
        return 4 if self.norm == "in" else 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"config: unknown keys {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise UsageError(f"config: {exc}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "UNetConfig":
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"config file not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"config file {p} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError(f"config file {p} must hold a JSON object")
        return cls.from_dict(data)


class PositionalEmbedding(nn.Module):
    """Sinusoidal timestep embedding of size ``dim``."""

    def __init__(self, dim: int, scale: float = 1.0, freq_shift: int = 0, flip_sin_to_cos: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.scale = scale
        self.freq_shift = freq_shift
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        exponent = -math.log(10000.0) / (half - self.freq_shift)
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * exponent)
        args = (t.to(torch.float32) * self.scale)[:, None] * freqs[None, :]
        parts = (torch.cos(args), torch.sin(args)) if self.flip_sin_to_cos else (torch.sin(args), torch.cos(args))
        return torch.cat(parts, dim=-1)


class Downsample(nn.Module):
    """Stride-2 3x3 conv; halves H and W."""

    def __init__(self, channels: int, padding: str = "symmetric") -> None:
        super().__init__()
        self.asymmetric = padding == "asymmetric"
        self.downsample = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.asymmetric else 1)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.downsample(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.upsample(x)


class ResidualBlock(nn.Module):
    """norm, act, conv; + time bias (+ class bias); norm, act, dropout, conv; + skip; optional attention."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        dropout: float,
        time_emb_dim: int | None,
        num_classes: int | None,
        activation: str,
        norm: str | None,
        num_groups: int,
        eps: float,
        use_attention: bool,
        attention_impl: AttentionImpl = "reference",
    ) -> None:
        super().__init__()
        self.activation = ACTIVATIONS[activation]()
        self.norm_1 = get_norm(norm, in_channels, num_groups, eps)
        self.conv_1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm_2 = get_norm(norm, out_channels, num_groups, eps)
        self.conv_2 = nn.Sequential(nn.Dropout(p=dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.time_bias = nn.Linear(time_emb_dim, out_channels) if time_emb_dim is not None else None
        self.class_bias = nn.Embedding(num_classes, out_channels) if num_classes is not None else None
        self.residual_connection = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )
        self.attention = (
            AttentionBlock(out_channels, norm, num_groups, eps, impl=attention_impl) if use_attention else nn.Identity()
        )

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv_1(self.activation(self.norm_1(x)))
        if self.time_bias is not None and time_emb is not None:
            out = out + self.time_bias(self.activation(time_emb))[:, :, None, None]
        if self.class_bias is not None and y is not None:
            out = out + self.class_bias(y)[:, :, None, None]
        out = self.conv_2(self.activation(self.norm_2(out)))
        out = out + self.residual_connection(x)
        return self.attention(out)


class UNet(nn.Module):
    """Denoiser eps(x, t[, y]): x (B, in_channels, H, W) float, t (B,) int64 steps, y (B,) int64 classes."""

    def __init__(self, config: UNetConfig | None = None, *, attention_impl: AttentionImpl = "reference", **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = UNetConfig(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        c = config
        self.activation = ACTIVATIONS[c.activation]()
        if c.time_emb_dim:
            self.time_mlp: nn.Module | None = nn.Sequential(
                PositionalEmbedding(c.base_channels, c.time_emb_scale, c.freq_shift, c.flip_sin_to_cos),
                nn.Linear(c.base_channels, c.time_emb_dim),
                nn.SiLU(),
                nn.Linear(c.time_emb_dim, c.time_emb_dim),
            )
        else:
            self.time_mlp = None
        self.init_conv = nn.Conv2d(c.in_channels, c.base_channels, 3, padding=1)

        def block(cin: int, cout: int, attn: bool) -> ResidualBlock:
            return ResidualBlock(
                cin, cout, dropout=c.dropout, time_emb_dim=c.time_emb_dim or None, num_classes=c.num_classes,
                activation=c.activation, norm=c.norm, num_groups=c.num_groups, eps=c.norm_eps,
                use_attention=attn, attention_impl=attention_impl,
            )

        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        channels = [c.base_channels]
        now = c.base_channels
        last = len(c.channel_mults) - 1
        for i, mult in enumerate(c.channel_mults):
            out = c.base_channels * mult
            for _ in range(c.num_res_blocks):
                self.downs.append(block(now, out, i in c.attention_levels))
                now = out
                channels.append(now)
            if i != last:
                self.downs.append(Downsample(now, c.downsample_padding))
                channels.append(now)
        self.mids = nn.ModuleList([block(now, now, c.mid_attention), block(now, now, False)])
        for i, mult in reversed(list(enumerate(c.channel_mults))):
            out = c.base_channels * mult
            for _ in range(c.num_res_blocks + 1):
                self.ups.append(block(channels.pop() + now, out, i in c.attention_levels))
                now = out
            if i != 0:
                self.ups.append(Upsample(now))
        # `now` is base * channel_mults[0], which is not base_channels when the first multiplier isn't 1.
        self.out_norm = get_norm(c.norm, now, c.num_groups, c.norm_eps)
        self.out_conv = nn.Conv2d(now, c.out_channels, 3, padding=1)

    @property
    def hw_multiple(self) -> int:
        return self.config.hw_multiple

    def check_shape(self, h: int, w: int) -> None:
        """Raise ShapeError unless H and W are positive multiples of the valid multiple."""
        m = self.hw_multiple
        if h <= 0 or w <= 0 or h % m or w % m:
            raise ShapeError(f"H and W must be positive multiples of {m} for this model (got {h}x{w})")
        need = self.config.min_deep_positions
        if (h // m) * (w // m) < need:
            raise ShapeError(
                f"{h}x{w} leaves {(h // m) * (w // m)} position(s) at the deepest level; this model's instance norm "
                f"needs at least {need} (e.g. {2 * m}x{2 * m})"
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            self.check_shape(int(x.shape[2]), int(x.shape[3]))
            if self.config.num_classes is not None and y is None:
                raise UsageError("this model is class-conditional: pass y (class ids)")
        time_emb = self.time_mlp(t) if self.time_mlp is not None else None
        x = self.init_conv(x)
        skips = [x]
        for layer in self.downs:
            x = layer(x, time_emb, y)
            skips.append(x)
        for layer in self.mids:
            x = layer(x, time_emb, y)
        for layer in self.ups:
            if isinstance(layer, ResidualBlock):
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, time_emb, y)
        return self.out_conv(self.activation(self.out_norm(x)))
