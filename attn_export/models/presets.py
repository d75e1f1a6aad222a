"""Built-in UNet presets.

``tiny``         a small model (well under 1M parameters) for tests and the demo;
                 attention head size 32, inside TensorRT's fused window.
``ddpm-cifar10`` Ho et al.'s CIFAR-10 layout: 35,746,307 parameters, attention at 16x16
                 (level 1 for 32x32 input) and in the middle block.
``ddpm-256``     Ho et al.'s 256x256 (LSUN / CelebA-HQ) layout: 113,673,219 parameters,
                 attention at 16x16 (level 4) with 512 channels.
"""

from __future__ import annotations

from .unet import UNetConfig

PRESETS: dict[str, dict] = {
    "tiny": dict(
        base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, attention_levels=(1,),
        time_emb_dim=64, num_groups=8, dropout=0.0,
    ),
    "ddpm-cifar10": dict(
        base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(1,),
        time_emb_dim=512, dropout=0.1,
    ),
    "ddpm-256": dict(
        base_channels=128, channel_mults=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_levels=(4,),
        time_emb_dim=512, dropout=0.0,
    ),
}



def preset_config(name: str, **overrides: object) -> UNetConfig:
    """The UNetConfig of a preset, with optional overrides (e.g. norm='in')."""
    from ..errors import UsageError

    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return UNetConfig(**{**PRESETS[name], **overrides})
