"""Default shapes, shared by every sweep (verify, the FP16 audit and check, default engine profiles).

Sizes are multiples of the model's H/W multiple; the largest default size is
capped per preset so each sweep stays affordable on a 2-core CPU (verify's
module doc has the measurements).
"""

from __future__ import annotations

from typing import Iterable

from .errors import ShapeError
from .spec import ModelSpec

Shape = tuple[int, int, int]

# Typical serving resolution of each preset (kept here, not in models.presets, so that
# choosing a shape never imports torch).
PRESET_RESOLUTION = {"tiny": 32, "ddpm-cifar10": 32, "ddpm-256": 256}
DEFAULT_TYPICAL = 64
# Largest H/W of a default sweep per preset: the audit holds every activation of a run at once.
LARGE_CAP = {"tiny": 64, "ddpm-cifar10": 64, "ddpm-256": 128}
DEFAULT_LARGE_CAP = 128


def round_up(value: float, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``, at least ``multiple``."""
    return max(multiple, -(-int(value) // multiple) * multiple)


def preset_of(spec: ModelSpec) -> str | None:
    """The built-in preset the model was exported from, if any."""
    return (spec.source or {}).get("preset")


def typical_size(spec: ModelSpec) -> int:
    """The model's usual serving resolution: its preset's, else 64 (not rounded)."""
    return int(PRESET_RESOLUTION.get(preset_of(spec) or "", DEFAULT_TYPICAL))


def sample_shape(spec: ModelSpec) -> Shape:
    """Batch 1 at the model's own sample size: its fixed H/W, else its typical size rounded to its H/W multiple."""
    if spec.fixed_hw:
        return (1, *spec.fixed_hw)
    size = round_up(typical_size(spec), spec.hw_multiple)
    return (1, size, size)


def large_size(spec: ModelSpec) -> int:
    """The largest H/W of a default sweep: twice the typical size, capped per preset, a multiple of H/W."""
    m = spec.hw_multiple
    cap = LARGE_CAP.get(preset_of(spec) or "", DEFAULT_LARGE_CAP)
    return round_up(min(2 * round_up(typical_size(spec), m), cap), m)


def accepts(spec: ModelSpec, shape: Shape) -> bool:
    """Whether the model accepts ``shape`` (B, H, W)."""
    try:
        spec.check_shape(*shape)
    except ShapeError:
        return False
    return True


def fit_shapes(spec: ModelSpec, candidates: Iterable[Shape], *, limit: int | None = None) -> list[Shape]:
    """The candidates the model accepts, each widened (W x2..x4) until it does, deduplicated, in order.

    Widening: instance norm needs more than one position at the deepest
    level. A candidate no width fixes is dropped; ``limit`` keeps the first N.
    A model with static H and W gets each candidate's batch at its one size.
    """
    out: list[Shape] = []
    fixed = spec.fixed_hw
    if fixed is not None:
        # A model of one size: every candidate keeps its batch at that size.
        for b, _, _ in candidates:
            if accepts(spec, (b, *fixed)) and (b, *fixed) not in out:
                out.append((b, *fixed))
        return out if limit is None else out[:limit]
    for b, h, w in candidates:
        for k in range(1, 5):
            if accepts(spec, (b, h, w * k)):
                if (b, h, w * k) not in out:
                    out.append((b, h, w * k))
                break
    return out if limit is None else out[:limit]
