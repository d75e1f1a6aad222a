"""The seed's single-head spatial self-attention block, in two formulations.

``reference``  the seed's literal math: bmm(q, k) * C**-0.5, softmax, bmm.
``sdpa``       deployment form: q, k, v laid out as [B, 1, HW, C] and fed to
               ``scaled_dot_product_attention``; the dynamo exporter at opset
               >= 23 turns it into one ONNX ``Attention`` node.
``decomposed`` deployment form: the scale multiplied into q *before* the first
               MatMul, then MatMul, Softmax, MatMul on [B, 1, HW, C]. This is
               the canonical chain TensorRT pattern-fuses; the reference form
               (scale after the product) is not.

All three compute the same function; parameter names (``norm``, ``to_qkv``,
``to_out``) match the seed, so the seed's state_dicts load unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AttentionImpl = Literal["reference", "sdpa", "decomposed"]
ATTENTION_IMPLS: tuple[str, ...] = ("reference", "sdpa", "decomposed")
NORMS: tuple[str | None, ...] = ("gn", "in", "bn", None)


def get_norm(norm: str | None, num_channels: int, num_groups: int = 32, eps: float = 1e-5) -> nn.Module:
    """Normalization layer by name, as the seed's factory builds it."""
    if norm == "gn":
        if num_channels % num_groups:
            raise ValueError(f"group norm: {num_channels} channels are not divisible by num_groups={num_groups}")
        return nn.GroupNorm(num_groups, num_channels, eps=eps)
    if norm == "in":
        return nn.InstanceNorm2d(num_channels, eps=eps, affine=True)
    if norm == "bn":
        return nn.BatchNorm2d(num_channels, eps=eps)
    if norm is None:
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}: expected one of 'gn', 'in', 'bn' or None")


class AttentionBlock(nn.Module):
    """QKV self-attention over the H*W positions with a residual connection.

    Input and output: (N, C, H, W). Single head, head size C, scale C**-0.5.
    ``impl`` picks the formulation (see the module docstring); it can be
    changed after construction with :func:`set_attention_impl`.
    """

    def __init__(
        self,
        in_channels: int,
        norm: str | None = "gn",
        num_groups: int = 32,
        eps: float = 1e-5,
        impl: AttentionImpl = "reference",
    ) -> None:
        super().__init__()
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention impl {impl!r}: expected one of {ATTENTION_IMPLS}")
        self.in_channels = in_channels
        self.impl: str = impl
        self.norm = get_norm(norm, in_channels, num_groups, eps)
        self.to_qkv = nn.Conv2d(in_channels, in_channels * 3, 1)
        self.to_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.to_qkv(self.norm(x))
        if self.impl == "reference":
            out = self._reference(qkv, x.shape)
        else:
            out = self._deploy(qkv, x.shape)
        return self.to_out(out) + x

    def _reference(self, qkv: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        b, c, h, w = shape
        q, k, v = torch.split(qkv, self.in_channels, dim=1)
        q = q.permute(0, 2, 3, 1).reshape(b, h * w, c)
        k = k.reshape(b, c, h * w)
        v = v.permute(0, 2, 3, 1).reshape(b, h * w, c)
        dot_products = torch.bmm(q, k) * (c ** (-0.5))
        attention = torch.softmax(dot_products, dim=-1)
        out = torch.bmm(attention, v)
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2)

    def _deploy(self, qkv: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        b, _, h, w = shape
        # A Python int, so that the export carries constants rather than shape arithmetic.
        c = self.in_channels
        # [B, 3C, H, W] -> [B, 3, 1, HW, C]: one reshape and one transpose for all of q, k, v.
        qkv = qkv.reshape(b, 3, 1, c, h * w).transpose(-1, -2)
        q, k, v = qkv.unbind(1)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # Scale on q before the first product: TensorRT's fusion rule.
            q = q * (c ** (-0.5))
            out = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1), v)
        # [B, 1, HW, C] -> [B, C, H, W]
        return out.transpose(-1, -2).reshape(b, c, h, w)


def set_attention_impl(model: nn.Module, impl: AttentionImpl) -> int:
    """Switch every AttentionBlock in ``model`` to ``impl``; returns how many were switched."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}: expected one of {ATTENTION_IMPLS}")
    count = 0
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.impl = impl
            count += 1
    return count
