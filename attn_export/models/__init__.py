"""The UNet, its AttentionBlock, presets and checkpoint loading."""

from .attention import ATTENTION_IMPLS, AttentionBlock, get_norm, set_attention_impl
from ..files import file_sha256
from .checkpoint import load_state_dict_strict, read_checkpoint
from .loader import DenoiserAdapter, LoadedModel, ModelSource, load_model, source_from_spec
from .presets import PRESETS, preset_config
from .unet import UNet, UNetConfig

__all__ = [
    "ATTENTION_IMPLS", "AttentionBlock", "DenoiserAdapter", "LoadedModel", "ModelSource", "PRESETS",
    "UNet", "UNetConfig", "file_sha256", "get_norm", "load_model", "load_state_dict_strict",
    "preset_config", "read_checkpoint", "set_attention_impl", "source_from_spec",
]
