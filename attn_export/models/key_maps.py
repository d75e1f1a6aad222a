"""State dicts saved by other code for the same UNet layout, mapped onto this project's key names.

* **The seed article's reference UNet** (github.com/abarankab/DDPM, ``ddpm/unet.py``): the same
  module tree as :class:`attn_export.models.UNet` except that the middle blocks are called ``mid``
  (ours: ``mids``). Its training script saves the whole ``GaussianDiffusion`` wrapper, so a
  checkpoint holds the UNet twice, under ``model.`` and ``ema_model.`` (the EMA weights, the ones to
  sample with), next to the diffusion schedule buffers (``betas``, ``alphas_cumprod``, ...).

Mapping only renames keys; tensors are never changed. A mapping is used only when it yields exactly
the model's keys, so a partial fit falls through to the strict loader's one-line mismatch report.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

StateDict = dict[str, torch.Tensor]

# (prefix inside the checkpoint, description), tried in order: EMA weights first.
_PREFIXES = (
    ("", ""),
    ("ema_model.", "EMA weights (ema_model.*)"),
    ("model.", "training weights (model.*)"),
    ("ema.", "EMA weights (ema.*)"),
)


def _seed_names(key: str) -> str:
    return "mids." + key[len("mid."):] if key.startswith("mid.") else key


_RENAMES: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("attn-export", lambda k: k),
    ("the seed article's reference UNet (abarankab/DDPM)", _seed_names),
)


def adapt_state_dict(state: Mapping[str, torch.Tensor], own_keys: set[str]) -> tuple[StateDict, str | None]:
    """``state`` renamed to ``own_keys`` when a known layout fits exactly, with a description of what was used.

    Returns ``(state, None)`` unchanged when nothing fits exactly (or it already did).
    """
    plain = dict(state)
    if set(plain) == own_keys:
        return plain, None
    for prefix, what in _PREFIXES:
        part = {k[len(prefix):]: v for k, v in plain.items() if k.startswith(prefix)} if prefix else plain
        if not part:
            continue
        for layout, rename in _RENAMES:
            mapped = {rename(k): v for k, v in part.items()}
            if len(mapped) == len(part) and set(mapped) == own_keys:
                desc = layout + (f", {what}" if what else "")
                return mapped, desc
    return plain, None
