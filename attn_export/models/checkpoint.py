"""Checkpoint loading: safetensors and pickled torch files, nested state dicts, readable mismatches."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointError

# Where training scripts commonly nest the state dict; EMA weights first, since samplers use them.
NESTED_KEYS = ("ema", "ema_model", "model", "state_dict", "model_state_dict")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_checkpoint(path: str | Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read a state dict from ``path``; returns (state_dict, the nested key used or None).

    Pickled files are opened with ``weights_only=True``: a checkpoint is data and
    must never run code.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read safetensors checkpoint {p}: {exc}") from None
    elif suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"refusing to load {p}: it holds Python objects other than tensors, and loading it could run code "
                f"(weights_only=True rejected it: {first})"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot read checkpoint {p}: {first}") from None
    else:
        raise CheckpointError(
            f"unsupported checkpoint type {suffix or '(none)'} for {p}; use .safetensors, .pt, .pth, .ckpt or .bin"
        )
    return _select_state_dict(obj, key, p)


def _select_state_dict(obj: Any, key: str | None, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    if key is not None:
        node = obj
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                found = ", ".join(sorted(map(str, obj.keys()))[:10]) if isinstance(obj, Mapping) else type(obj).__name__
                raise CheckpointError(f"checkpoint {path} has no key {key!r} (top-level keys: {found})")
            node = node[part]
        if not _is_state_dict(node):
            raise CheckpointError(f"checkpoint {path}: {key!r} does not hold a state dict of tensors")
        return _strip_prefix(dict(node)), key
    if _is_state_dict(obj):
        return _strip_prefix(dict(obj)), None
    if isinstance(obj, Mapping):
        for k in NESTED_KEYS:
            if k in obj and _is_state_dict(obj[k]):
                return _strip_prefix(dict(obj[k])), k
        found = ", ".join(sorted(map(str, obj.keys()))[:10])
        raise CheckpointError(
            f"checkpoint {path} holds no state dict at the top level or under {', '.join(NESTED_KEYS)} "
            f"(top-level keys: {found}); name the key with --checkpoint-key"
        )
    raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel / DDP wrap parameter names in "module."; torch.compile in "_orig_mod.".
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _short_list(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", +{len(items) - limit} more" if len(items) > limit else "")


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``model``; on any mismatch raise one readable line listing
    missing, unexpected and wrongly shaped keys."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    wrong = sorted(
        f"{k} (checkpoint {list(state_dict[k].shape)} vs model {list(own[k].shape)})"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_short_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_short_list(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} wrong shape: {_short_list(wrong, 3)}")
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
