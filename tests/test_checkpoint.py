"""Checkpoints: formats, nesting, refusal of code, readable mismatches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from attn_export.errors import CheckpointError
from attn_export.models import ModelSource, UNet, load_model, preset_config, read_checkpoint


def _tiny_state(seed: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in UNet(preset_config("tiny")).state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_safetensors_and_pickle_formats(tmp_path: Path) -> None:
    sd = _tiny_state()
    save_file(sd, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = load_model(ModelSource(preset="tiny", checkpoint=tmp_path / name))
        assert _same(loaded.module.state_dict(), sd)
        assert loaded.spec.checkpoint["sha256"] and loaded.spec.checkpoint["path"].endswith(name)


@pytest.mark.parametrize("key", ["model", "ema", "state_dict"])
def test_nested_state_dicts(tmp_path: Path, key: str) -> None:
    sd = _tiny_state()
    torch.save({key: sd, "step": 1000, "optimizer": {"lr": 1e-4}}, tmp_path / "c.ckpt")
    state, used = read_checkpoint(tmp_path / "c.ckpt")
    assert used == key and _same(state, sd)


def test_user_named_key_and_prefix_stripping(tmp_path: Path) -> None:
    sd = _tiny_state()
    other = _tiny_state(seed=6)
    torch.save({"ema": sd, "weights": {"net": {f"module.{k}": v for k, v in other.items()}}}, tmp_path / "c.pth")
    state, used = read_checkpoint(tmp_path / "c.pth", key="weights.net")
    assert used == "weights.net" and _same(state, other)
    with pytest.raises(CheckpointError, match="no key 'nope'"):
        read_checkpoint(tmp_path / "c.pth", key="nope")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": _Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_mismatch_lists_missing_unexpected_and_wrong_shapes(tmp_path: Path) -> None:
    sd = _tiny_state()
    sd.pop("out_conv.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["init_conv.weight"] = torch.zeros(16, 3, 5, 5)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(ModelSource(preset="tiny", checkpoint=tmp_path / "bad.safetensors"))
    msg = str(info.value)
    assert "\n" not in msg
    assert "1 missing: out_conv.bias" in msg
    assert "1 unexpected: extra.weight" in msg
    assert "init_conv.weight (checkpoint [16, 3, 5, 5] vs model [16, 3, 3, 3])" in msg


def test_missing_corrupt_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(tmp_path / "junk.safetensors")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        read_checkpoint(tmp_path / "w.h5")
    torch.save({"step": 3}, tmp_path / "nostate.pt")
    with pytest.raises(CheckpointError, match="checkpoint-key"):
        read_checkpoint(tmp_path / "nostate.pt")


def _seed_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys renamed as the seed article's reference UNet (abarankab/DDPM) names them: mids.* -> mid.*."""
    return {("mid." + k[len("mids."):] if k.startswith("mids.") else k): v for k, v in sd.items()}


def _outputs(module: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    x, t = torch.randn(2, 3, 16, 24), torch.tensor([3, 700])
    with torch.no_grad():
        return module(x, t)


@pytest.mark.parametrize("wrapped", [False, True])
def test_seed_reference_unet_checkpoints_load(tmp_path: Path, wrapped: bool) -> None:
    """A UNet state dict from the seed's reference code, bare or inside its GaussianDiffusion wrapper."""
    ema, train = _tiny_state(5), _tiny_state(6)
    assert any(k.startswith("mids.") for k in ema)
    if wrapped:
        # The reference training script saves diffusion.state_dict(): model.*, ema_model.* and the schedule.
        obj = {**{f"model.{k}": v for k, v in _seed_layout(train).items()},
               **{f"ema_model.{k}": v for k, v in _seed_layout(ema).items()},
               "betas": torch.linspace(1e-4, 0.02, 1000), "alphas_cumprod": torch.rand(1000)}
    else:
        obj = _seed_layout(ema)
    torch.save(obj, tmp_path / "seed.pth")
    loaded = load_model(ModelSource(preset="tiny", checkpoint=tmp_path / "seed.pth"))
    assert _same(loaded.module.state_dict(), ema)  # the EMA weights, not the training ones
    assert "abarankab/DDPM" in loaded.spec.checkpoint["layout"]
    reference = UNet(preset_config("tiny"))
    reference.load_state_dict(ema)
    assert torch.allclose(_outputs(loaded.module), _outputs(reference.eval()), atol=1e-5)


def test_wrong_layout_is_refused_in_one_line(tmp_path: Path) -> None:
    sd = _seed_layout(_tiny_state())
    sd["mid.0.extra.weight"] = torch.zeros(1)  # no known layout fits exactly: the strict report
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(ModelSource(preset="tiny", checkpoint=tmp_path / "bad.pth"))
    message = str(err.value)
    assert "\n" not in message and "missing" in message and "unexpected" in message


def _diffusers_unet(**overrides):
    from diffusers import UNet2DModel

    torch.manual_seed(3)
    kw = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
              down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None, norm_num_groups=8,
              flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, act_fn="silu")
    kw.update(overrides)
    model = UNet2DModel(**kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("as_folder", [True, False])
def test_diffusers_unet2d_weights_load(tmp_path: Path, as_folder: bool) -> None:
    src = _diffusers_unet()
    src.save_pretrained(tmp_path / "unet")  # config.json + diffusion_pytorch_model.safetensors
    ckpt = tmp_path / "unet" if as_folder else tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    loaded = load_model(ModelSource(config=tmp_path / "unet" / "config.json", checkpoint=ckpt))
    cfg = loaded.spec.source["config"]
    assert cfg["attention_levels"] == [1] and cfg["freq_shift"] == 1 and cfg["downsample_padding"] == "asymmetric"
    assert loaded.spec.checkpoint["layout"] == "diffusers UNet2DModel"
    torch.manual_seed(1)
    x, t = torch.randn(2, 3, 16, 24), torch.tensor([3, 700])
    with torch.no_grad():
        want = src(x, t).sample
        got = loaded.module(x, t)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_diffusers_config_checked_against_the_preset(tmp_path: Path) -> None:
    # The layout of the tiny preset, trained with diffusers' switches: loads into the preset, switches taken along.
    _diffusers_unet().save_pretrained(tmp_path / "unet")
    loaded = load_model(ModelSource(preset="tiny", checkpoint=tmp_path / "unet"))
    assert loaded.spec.source["config"]["freq_shift"] == 1
    _diffusers_unet(block_out_channels=(16, 32, 64)).save_pretrained(tmp_path / "wide")
    with pytest.raises(CheckpointError, match=r"does not fit preset tiny: channel_mults is \(1, 2, 4\) in its config.json") as err:
        load_model(ModelSource(preset="tiny", checkpoint=tmp_path / "wide"))
    assert "\n" not in str(err.value)
    _diffusers_unet(attention_head_dim=8).save_pretrained(tmp_path / "mh")
    with pytest.raises(CheckpointError, match="multi-head attention"):
        load_model(ModelSource(config=tmp_path / "mh" / "config.json", checkpoint=tmp_path / "mh"))
