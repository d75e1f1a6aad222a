"""The AttentionBlock and the UNet: seed semantics, formulations, configs, presets."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from attn_export.errors import ShapeError, UsageError
from attn_export.models import (AttentionBlock, UNet, UNetConfig, get_norm, preset_config, set_attention_impl)


class SeedAttentionBlock(nn.Module):
    """The seed document's block, written out literally as the test oracle (bmm, scale after the product, view)."""

    def __init__(self, in_channels: int, norm: str | None = "gn", num_groups: int = 32) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = get_norm(norm, in_channels, num_groups)
        self.to_qkv = nn.Conv2d(in_channels, in_channels * 3, 1)
        self.to_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = torch.split(self.to_qkv(self.norm(x)), self.in_channels, dim=1)
        q = q.permute(0, 2, 3, 1).reshape(b, h * w, c)
        k = k.reshape(b, c, h * w)
        v = v.permute(0, 2, 3, 1).reshape(b, h * w, c)
        dot_products = torch.bmm(q, k) * (c ** (-0.5))
        assert dot_products.shape == (b, h * w, h * w)
        attention = torch.softmax(dot_products, dim=-1)
        out = torch.bmm(attention, v)
        assert out.shape == (b, h * w, c)
        out = out.view(b, h, w, c).permute(0, 3, 1, 2)
        return self.to_out(out) + x


def _randomize(module: nn.Module, seed: int) -> None:
    """Non-trivial norm affine params and running stats, so every norm really matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in list(module.named_parameters()) + list(module.named_buffers()):
            if buf.dtype.is_floating_point:
                if name.endswith("running_var"):
                    buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
                elif name.startswith("norm") or ".norm" in name or name.endswith("running_mean"):
                    buf.copy_(torch.randn(buf.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0.0))


@pytest.mark.parametrize("norm", ["gn", "in", "bn", None])
@pytest.mark.parametrize("impl", ["sdpa", "decomposed"])
def test_deployment_forms_match_seed_math(norm: str | None, impl: str) -> None:
    torch.manual_seed(0)
    seed = SeedAttentionBlock(64, norm=norm, num_groups=8).eval()
    _randomize(seed, 1)
    ours = AttentionBlock(64, norm=norm, num_groups=8, impl=impl).eval()
    ours.load_state_dict(seed.state_dict())  # the seed's state_dict loads unchanged (strict)
    for shape in [(2, 64, 8, 8), (1, 64, 6, 10), (3, 64, 16, 4)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            want = seed(x)
            got = ours(x)
            ref = AttentionBlock(64, norm=norm, num_groups=8, impl="reference").eval()
            ref.load_state_dict(seed.state_dict())
            assert torch.equal(ref(x), want)  # the reference formulation is the seed's math, bit for bit
        assert (got - want).abs().max().item() < 1e-5


def test_seed_state_dict_keys_are_ours() -> None:
    seed = SeedAttentionBlock(32, norm="gn", num_groups=8)
    ours = AttentionBlock(32, norm="gn", num_groups=8)
    assert list(seed.state_dict()) == list(ours.state_dict())
    assert {k.split(".")[0] for k in ours.state_dict()} == {"norm", "to_qkv", "to_out"}


def test_set_attention_impl_switches_every_block() -> None:
    model = UNet(preset_config("tiny"))
    assert set_attention_impl(model, "sdpa") == 4
    assert {m.impl for m in model.modules() if isinstance(m, AttentionBlock)} == {"sdpa"}
    with pytest.raises(ValueError):
        set_attention_impl(model, "flash")


@pytest.mark.parametrize(
    "preset, params",
    [("ddpm-cifar10", 35_746_307), ("ddpm-256", 113_673_219)],
)
def test_preset_parameter_counts(preset: str, params: int) -> None:
    model = UNet(preset_config(preset))
    assert sum(p.numel() for p in model.parameters()) == params


def test_tiny_is_well_under_a_million_parameters() -> None:
    n = sum(p.numel() for p in UNet(preset_config("tiny")).parameters())
    assert n < 500_000


def test_cifar10_with_classes_and_attention_layout() -> None:
    model = UNet(preset_config("ddpm-cifar10", num_classes=10))
    assert sum(p.numel() for p in model.parameters()) == 35_796_227
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert len(blocks) == 6 and {b.in_channels for b in blocks} == {256}
    ddpm256 = [m for m in UNet(preset_config("ddpm-256")).modules() if isinstance(m, AttentionBlock)]
    assert len(ddpm256) == 6 and {b.in_channels for b in ddpm256} == {512}


def test_shape_check_names_the_valid_multiple() -> None:
    model = UNet(preset_config("ddpm-cifar10")).eval()
    with pytest.raises(ShapeError, match="multiples of 8"):
        model(torch.randn(1, 3, 20, 32), torch.zeros(1, dtype=torch.int64))
    assert UNetConfig(channel_mults=(1, 1, 2, 2, 4, 4)).hw_multiple == 32


def test_unet_forward_shapes_and_class_conditioning() -> None:
    torch.manual_seed(0)
    model = UNet(preset_config("tiny", num_classes=5)).eval()
    x = torch.randn(2, 3, 12, 20)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        a = model(x, t, torch.tensor([0, 1]))
        b = model(x, t, torch.tensor([3, 1]))
    assert a.shape == x.shape
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    with pytest.raises(UsageError, match="class-conditional"):
        model(x, t)


def test_config_json_roundtrip_and_errors(tmp_path) -> None:
    cfg = preset_config("tiny", norm="in", dropout=0.2)
    path = tmp_path / "unet.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert UNetConfig.from_json(path) == cfg
    path.write_text(json.dumps({"base_channels": 16, "chanel_mults": [1, 2]}))
    with pytest.raises(UsageError, match="unknown keys chanel_mults"):
        UNetConfig.from_json(path)
    with pytest.raises(UsageError, match="attention level 3"):
        UNetConfig(channel_mults=(1, 2), attention_levels=(3,))
    with pytest.raises(UsageError, match="not divisible by num_groups"):
        UNetConfig(base_channels=24, num_groups=32)


def test_timestep_embedding_switches_change_the_function() -> None:
    torch.manual_seed(0)
    base = UNet(preset_config("tiny")).eval()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    for switch in ({"freq_shift": 1}, {"flip_sin_to_cos": True}, {"downsample_padding": "asymmetric"}):
        other = UNet(preset_config("tiny", **switch)).eval()
        other.load_state_dict(base.state_dict())
        with torch.no_grad():
            assert not torch.allclose(base(x, t), other(x, t)), switch


def test_first_multiplier_other_than_one() -> None:
    model = UNet(UNetConfig(base_channels=8, channel_mults=(2,), attention_levels=(), num_groups=4)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 6, 4), torch.tensor([1, 2])).shape == (2, 3, 6, 4)


def test_top_level_api_names_resolve() -> None:
    import attn_export

    for name in attn_export.__all__:
        assert getattr(attn_export, name) is not None, name
    with pytest.raises(AttributeError):
        attn_export.not_a_function  # noqa: B018
