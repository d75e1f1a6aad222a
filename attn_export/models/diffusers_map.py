"""diffusers ``UNet2DModel`` weights in the DDPM layouts, mapped onto :class:`attn_export.models.UNet`.

The published DDPM weights (CIFAR-10 32 px, the 256 px LSUN / CelebA-HQ models) come as a folder
with ``config.json`` and ``diffusion_pytorch_model.safetensors``. Both describe the same network as
our UNet with other names:

=====================================  ==========================================
diffusers                              attn-export
=====================================  ==========================================
``time_embedding.linear_1 / linear_2``  ``time_mlp.1 / time_mlp.3``
``conv_in``, ``conv_norm_out``,         ``init_conv``, ``out_norm``, ``out_conv``
``conv_out``
``down_blocks.i.resnets.j``             ``downs.[i * (R + 1) + j]`` (R res blocks per level)
``down_blocks.i.downsamplers.0.conv``   ``downs.[i * (R + 1) + R].downsample``
``mid_block.resnets.0 / 1``,            ``mids.0 / mids.1``, ``mids.0.attention``
``mid_block.attentions.0``
``up_blocks.i.resnets.j``               ``ups.[i * (R + 2) + j]``
``up_blocks.i.upsamplers.0.conv``       ``ups.[i * (R + 2) + R + 1].upsample.1``
resnet ``norm1, conv1, norm2, conv2,    ``norm_1, conv_1, norm_2, conv_2.1,
time_emb_proj, conv_shortcut``          time_bias, residual_connection``
attention ``group_norm``, ``to_q/k/v``  ``norm``, ``to_qkv`` (the three Linear weights
(Linear), ``to_out.0``                  stacked as one 1x1 conv), ``to_out`` (1x1 conv)
=====================================  ==========================================

The config is translated too (block types to attention levels, ``freq_shift``,
``flip_sin_to_cos``, ``downsample_padding`` 0 = TF "SAME" = our "asymmetric"); anything this UNet
family does not have (multi-head attention, class or extra embeddings, other block types) is
refused in one line naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError
from .unet import UNetConfig

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Fields that say how the weights were trained rather than what shape they have: taken from the checkpoint.
BEHAVIOUR_FIELDS = ("freq_shift", "flip_sin_to_cos", "downsample_padding", "norm_eps", "activation")


@dataclass
class DiffusersCheckpoint:
    """A diffusers UNet2DModel checkpoint: its config.json (path and parsed content) and its weights file."""

    config_path: Path
    weights: Path
    config: dict[str, Any]


def find_diffusers(path: str | Path) -> DiffusersCheckpoint | None:
    """The checkpoint when ``path`` is a diffusers UNet2DModel folder or a file next to its config.json; else None."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("_class_name") != "UNet2DModel":
        return None
    if p.is_dir():
        weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{folder} has a UNet2DModel config.json but no {' or '.join(WEIGHT_NAMES)}")
        return DiffusersCheckpoint(config, weights, data)
    return DiffusersCheckpoint(config, p, data)


def config_from_diffusers(data: Mapping[str, Any], origin: str = "config.json") -> UNetConfig:
    """The :class:`UNetConfig` of a diffusers UNet2DModel config; CheckpointError naming what does not map."""
    def get(key: str, default: Any) -> Any:
        return data.get(key, default) if data.get(key) is not None else default

    def refuse(what: str) -> None:
        raise CheckpointError(f"{origin}: {what}; this UNet family cannot take it")

    channels = list(get("block_out_channels", (224, 448, 672, 896)))
    down = list(get("down_block_types", ()))
    up = list(get("up_block_types", ()))
    if len(down) != len(channels) or len(up) != len(channels):
        refuse(f"{len(down)} down and {len(up)} up blocks for {len(channels)} block_out_channels")
    levels = []
    for i, kind in enumerate(down):
        if kind not in ("DownBlock2D", "AttnDownBlock2D"):
            refuse(f"down block {i} is {kind}")
        if kind == "AttnDownBlock2D":
            levels.append(i)
        mirror = up[len(up) - 1 - i]
        want = "AttnUpBlock2D" if kind == "AttnDownBlock2D" else "UpBlock2D"
        if mirror != want:
            refuse(f"up block {len(up) - 1 - i} is {mirror}, but down block {i} is {kind} (needs {want})")
    checks = {
        "time_embedding_type": ("positional", get("time_embedding_type", "positional")),
        "resnet_time_scale_shift": ("default", get("resnet_time_scale_shift", "default")),
        "add_attention": (True, get("add_attention", True)),
        "center_input_sample": (False, get("center_input_sample", False)),
        "class_embed_type": (None, data.get("class_embed_type")),
        "num_class_embeds": (None, data.get("num_class_embeds")),
        "mid_block_type": ("UNetMidBlock2D", get("mid_block_type", "UNetMidBlock2D")),
        "attn_norm_num_groups": (None, data.get("attn_norm_num_groups")),
        "dropout": (0.0, float(get("dropout", 0.0))),
    }
    for key, (supported, got) in checks.items():
        if got != supported:
            refuse(f"{key} is {got!r} (supported: {supported!r})")
    head_dim = data.get("attention_head_dim")
    attn_channels = [channels[i] for i in levels] + [channels[-1]]
    if head_dim is not None and any(c != head_dim for c in attn_channels):
        refuse(f"attention_head_dim {head_dim} makes multi-head attention ({attn_channels[0] // int(head_dim)} heads); "
               "the seed's AttentionBlock is single-head")
    if any(c % channels[0] for c in channels):
        refuse(f"block_out_channels {channels} are not multiples of the first")
    act = str(get("act_fn", "silu"))
    if act not in ("silu", "swish"):
        refuse(f"act_fn is {act}")
    pad = int(get("downsample_padding", 1))
    if pad not in (0, 1):
        refuse(f"downsample_padding is {pad}")
    in_ch, out_ch = int(get("in_channels", 3)), int(get("out_channels", 3))
    return UNetConfig(
        in_channels=in_ch, out_channels=out_ch, base_channels=channels[0],
        channel_mults=tuple(c // channels[0] for c in channels), num_res_blocks=int(get("layers_per_block", 2)),
        attention_levels=tuple(levels), mid_attention=True, time_emb_dim=channels[0] * 4, num_classes=None,
        norm="gn", num_groups=int(get("norm_num_groups", 32)), norm_eps=float(get("norm_eps", 1e-5)), dropout=0.0,
        activation="silu", freq_shift=int(get("freq_shift", 0)), flip_sin_to_cos=bool(get("flip_sin_to_cos", True)),
        downsample_padding="asymmetric" if pad == 0 else "symmetric",
    )


def checked_against(preset: UNetConfig, loaded: UNetConfig, preset_name: str) -> UNetConfig:
    """The preset with the checkpoint's training switches; CheckpointError naming the first structural difference."""
    import dataclasses

    for f in dataclasses.fields(UNetConfig):
        if f.name in BEHAVIOUR_FIELDS or f.name in ("dropout", "num_timesteps", "time_emb_scale"):
            continue
        a, b = getattr(preset, f.name), getattr(loaded, f.name)
        if a != b:
            raise CheckpointError(f"the diffusers checkpoint does not fit preset {preset_name}: {f.name} is {b!r} in its "
                                  f"config.json and {a!r} in the preset (pass --config with the config.json instead)")
    return dataclasses.replace(preset, **{k: getattr(loaded, k) for k in BEHAVIOUR_FIELDS})


def map_state_dict(state: Mapping[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers UNet2DModel keys -> attn-export UNet keys (see the module table); unknown keys are kept as they are."""
    r = config.num_res_blocks
    resnet = {"norm1": "norm_1", "conv1": "conv_1", "norm2": "norm_2", "conv2": "conv_2.1",
              "time_emb_proj": "time_bias", "conv_shortcut": "residual_connection"}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}

    def put_attention(prefix: str, rest: str, value: torch.Tensor) -> None:
        part, _, leaf = rest.partition(".")
        if part in ("to_q", "to_k", "to_v"):
            qkv.setdefault(f"{prefix}.attention.to_qkv.{leaf}", {})[part] = value
        elif part == "to_out" and leaf.startswith("0."):
            kind = leaf[2:]
            out[f"{prefix}.attention.to_out.{kind}"] = value[:, :, None, None] if kind == "weight" else value
        elif part == "group_norm":
            out[f"{prefix}.attention.norm.{leaf}"] = value
        else:
            out[f"{prefix}.attention.{rest}"] = value

    def put_resnet(prefix: str, rest: str, value: torch.Tensor) -> None:
        part, _, leaf = rest.partition(".")
        out[f"{prefix}.{resnet.get(part, part)}.{leaf}"] = value

    simple = {"time_embedding.linear_1.": "time_mlp.1.", "time_embedding.linear_2.": "time_mlp.3.",
              "conv_in.": "init_conv.", "conv_norm_out.": "out_norm.", "conv_out.": "out_conv."}
    for key, value in state.items():
        parts = key.split(".")
        prefix = next((p for p in simple if key.startswith(p)), None)
        if prefix is not None:
            out[simple[prefix] + key[len(prefix):]] = value
        elif parts[0] in ("down_blocks", "up_blocks") and len(parts) > 4:
            i, group, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            down = parts[0] == "down_blocks"
            stride = r + 1 if down else r + 2
            prefix = ("downs." if down else "ups.") + str(i * stride + j)
            if group == "resnets":
                put_resnet(prefix, rest, value)
            elif group == "attentions":
                put_attention(prefix, rest, value)
            elif group in ("downsamplers", "upsamplers") and rest.startswith("conv."):
                k = i * stride + (r if down else r + 1)
                out[("downs." if down else "ups.") + f"{k}." + ("downsample." if down else "upsample.1.") + rest[5:]] = value
            else:
                out[key] = value
        elif parts[0] == "mid_block" and len(parts) > 3:
            group, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if group == "resnets":
                put_resnet(f"mids.{j}", rest, value)
            elif group == "attentions" and j == 0:
                put_attention("mids.0", rest, value)
            else:
                out[key] = value
        else:
            out[key] = value
    for key, pieces in qkv.items():
        if set(pieces) != {"to_q", "to_k", "to_v"}:
            raise CheckpointError(f"attention weights {key} lack one of to_q, to_k, to_v")
        stacked = torch.cat([pieces["to_q"], pieces["to_k"], pieces["to_v"]], dim=0)
        out[key] = stacked[:, :, None, None] if key.endswith("weight") else stacked
    return out
