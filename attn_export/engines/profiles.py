"""TensorRT optimization profiles over (batch, height, width).

An engine with dynamic shapes serves only the shapes inside one of its
profiles; each profile gives a min, an opt (the shape TensorRT tunes for)
and a max triple. Everything here is plain Python so profiles can be parsed,
checked and stored on machines without TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..errors import ShapeError, UsageError
from ..shapes import round_up, typical_size
from ..spec import ModelSpec, format_shape

Triple = tuple[int, int, int]

# Fused FP16 MHA kernels have returned NaN once the key count passed the
# largest finite FP16 value (reported in tier4/autoware-ml#95 with 65,536 keys;
# switching to BF16 fixed it there).
FP16_MAX_KEYS = 65504

FIELDS = ("min", "opt", "max")
AXES = ("batch", "height", "width")


@dataclass(frozen=True)
class Profile:
    """One optimization profile: min, opt and max (batch, height, width) triples."""

    min: Triple
    opt: Triple
    max: Triple

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Profile":
        """Inverse of :meth:`to_dict` (also accepts 'BxHxW' strings)."""
        def triple(v: Any) -> Triple:
            if isinstance(v, str):
                return _parse_triple(v, "profile")
            b, h, w = (int(x) for x in v)
            return b, h, w

        return cls(triple(data["min"]), triple(data["opt"]), triple(data["max"]))

    def __str__(self) -> str:
        return f"{format_shape(self.min)}..{format_shape(self.max)} (opt {format_shape(self.opt)})"


def _parse_triple(text: str, what: str) -> Triple:
    parts = text.lower().strip().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"{what}: bad shape {text!r}: expected BATCHxHEIGHTxWIDTH, e.g. 1x64x64")
    b, h, w = (int(p) for p in parts)
    return b, h, w


def parse_profiles(mins: Sequence[str], opts: Sequence[str], maxs: Sequence[str]) -> list[Profile]:
    """Build profiles from repeated CLI strings ("1x32x32"); the i-th min, opt and max form profile i.

    All three lists must have the same length (UsageError otherwise). Empty
    lists give an empty result, meaning "use :func:`default_profile`".
    """
    mins, opts, maxs = list(mins or []), list(opts or []), list(maxs or [])
    if not (len(mins) == len(opts) == len(maxs)):
        raise UsageError(
            f"profile shapes do not pair up: {len(mins)} --min, {len(opts)} --opt, {len(maxs)} --max; "
            "give one of each per profile"
        )
    return [
        Profile(_parse_triple(lo, f"profile {i} min"), _parse_triple(op, f"profile {i} opt"),
                _parse_triple(hi, f"profile {i} max"))
        for i, (lo, op, hi) in enumerate(zip(mins, opts, maxs))
    ]


def _fixed_dims(spec: ModelSpec) -> dict[str, int]:
    """Axes ('batch', 'height', 'width') that the model fixes to a number.

    Read from the image input's dims: (B, C, H, W); an int where a symbolic
    name is expected means the ONNX only accepts that size.
    """
    dims = spec.image_input.dims
    fixed: dict[str, int] = {}
    if len(dims) == 4:
        for axis, d in zip(AXES, (dims[0], dims[2], dims[3])):
            if not isinstance(d, str):
                fixed[axis] = int(d)
    # Other inputs (t, y) share the batch axis; a fixed batch there fixes it too.
    for t in spec.inputs[1:]:
        if t.dims and not isinstance(t.dims[0], str) and "batch" not in fixed:
            fixed["batch"] = int(t.dims[0])
    return fixed


def validate_profiles(profiles: Sequence[Profile], spec: ModelSpec) -> list[str]:
    """Check profiles against the model; raise UsageError on the first problem, return warnings.

    Errors (one line, naming the profile index, the field and the reason):
    min <= opt <= max per axis, batch >= 1, H/W positive multiples of
    ``spec.hw_multiple``, and every axis the ONNX fixes kept at that size.
    Warnings: see :func:`key_count_warnings`.
    """
    if not profiles:
        raise UsageError("no optimization profile given")
    m = spec.hw_multiple
    fixed = _fixed_dims(spec)
    warnings: list[str] = []
    for i, p in enumerate(profiles):
        for field in FIELDS:
            b, h, w = getattr(p, field)
            if b < 1:
                raise UsageError(f"profile {i} {field}: batch must be at least 1 (got {b})")
            for axis, v in (("height", h), ("width", w)):
                if v < m or v % m:
                    raise UsageError(
                        f"profile {i} {field}: {axis} {v} is not a positive multiple of {m} (this model's H/W multiple)"
                    )
            need = int(getattr(spec, "min_deep_positions", 1) or 1)
            deep = (h // m) * (w // m)
            if deep < need:
                raise UsageError(
                    f"profile {i} {field}: {h}x{w} leaves {deep} position(s) at the deepest level; "
                    f"this model needs at least {need}"
                )
            for axis, v in zip(AXES, (b, h, w)):
                if axis in fixed and v != fixed[axis]:
                    raise UsageError(
                        f"profile {i} {field}: {axis} must be {fixed[axis]} (the ONNX fixes it; got {v})"
                    )
        for k, axis in enumerate(AXES):
            lo, op, hi = p.min[k], p.opt[k], p.max[k]
            if not lo <= op <= hi:
                raise UsageError(
                    f"profile {i} opt: {axis} must satisfy min <= opt <= max (got {lo} <= {op} <= {hi})"
                )
        warnings.extend(f"profile {i} max: {w}" for w in key_count_warnings(p.max[1], p.max[2], spec))
    return warnings


def attention_levels(spec: ModelSpec) -> list[int] | None:
    """Resolution levels (0 = full size, level l = H/2**l) that carry attention, or None if unknown.

    Read from the UNet config stored in ``spec.source["config"]``: its
    ``attention_levels`` plus the middle block (the deepest level) when
    ``mid_attention`` is on (the UNet's default).
    """
    config = (spec.source or {}).get("config") or {}
    levels = config.get("attention_levels")
    if levels is None:
        return None
    out = {int(x) for x in levels}
    mults = config.get("channel_mults")
    if config.get("mid_attention", True) and mults:
        out.add(len(mults) - 1)
    return sorted(out)


def key_count_warnings(height: int, width: int, spec: ModelSpec) -> list[str]:
    """Warnings for attention layers whose key count S_kv = (H/2^l)*(W/2^l) exceeds 65504 at (H, W).

    Fused FP16 attention kernels have produced NaN above that count. Returns
    [] when the model's attention levels are unknown.
    """
    levels = attention_levels(spec)
    if not levels:
        return []
    out = []
    for lvl in levels:
        keys = (height >> lvl) * (width >> lvl)
        if keys > FP16_MAX_KEYS:
            out.append(
                f"{height}x{width} gives {keys} attention keys at level {lvl} "
                f"(over {FP16_MAX_KEYS}; fused FP16 attention has produced NaN there; lower the max H/W)"
            )
    return out


def default_profile(spec: ModelSpec) -> Profile:
    """A profile for when the user gives none.

    * min: batch 1 at the smallest square size >= 32 px that is a multiple
      of ``hw_multiple`` (small enough for previews, large enough to avoid
      degenerate 1x1 attention maps), grown if the model needs more
      positions at its deepest level (``spec.min_deep_positions``).
    * opt: batch 1 at the model's typical resolution (its preset's, else 64),
      rounded up to the multiple; TensorRT tunes kernels for this shape.
    * max: batch 4 at max(256, typical) rounded up to the multiple.

    Axes the ONNX fixes keep their fixed size. The result passes
    :func:`validate_profiles`.
    """
    m = spec.hw_multiple
    lo = round_up(32, m)
    # Some models (instance norm) need several positions at the deepest level.
    while (lo // m) ** 2 < int(getattr(spec, "min_deep_positions", 1) or 1):
        lo += m
    typical = max(round_up(typical_size(spec), m), lo)
    hi = max(round_up(256, m), typical)
    fixed = _fixed_dims(spec)

    def fit(b: int, h: int, w: int) -> Triple:
        return (fixed.get("batch", b), fixed.get("height", h), fixed.get("width", w))

    return Profile(fit(1, lo, lo), fit(1, typical, typical), fit(4, hi, hi))


def tensor_shapes(profile: Profile, spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Per input tensor name: its (min_shape, opt_shape, max_shape) under ``profile``."""
    return {
        t.name: (spec.shape_of(t, *profile.min, which="min"), spec.shape_of(t, *profile.opt),
                 spec.shape_of(t, *profile.max, which="max"))
        for t in spec.inputs
    }


def profile_contains(profile: Profile, batch: int, height: int, width: int) -> bool:
    """Whether (batch, height, width) lies inside ``profile`` on every axis."""
    return all(lo <= v <= hi for lo, v, hi in zip(profile.min, (batch, height, width), profile.max))


def find_profile(profiles: Iterable[Profile], batch: int, height: int, width: int) -> int | None:
    """Index of the first profile containing the shape, or None."""
    for i, p in enumerate(profiles):
        if profile_contains(p, batch, height, width):
            return i
    return None


def describe_profiles(profiles: Iterable[Profile]) -> str:
    """One-line summary such as 'profile 0: 1x32x32..4x256x256 (opt 1x64x64)'."""
    return "; ".join(f"profile {i}: {p}" for i, p in enumerate(profiles))


def check_servable(shape: Sequence[int], spec: ModelSpec, profiles: Sequence[Profile] | None = None) -> None:
    """ShapeError (exit 2, one line) when an artifact cannot serve ``shape`` (batch, H, W): the model's rules, then
    an engine's ``profiles``."""
    b, h, w = (int(v) for v in shape)
    try:
        spec.check_shape(b, h, w)
    except ShapeError as exc:
        raise ShapeError(f"shape {format_shape((b, h, w))} cannot be served: {exc}") from None
    if profiles is not None and find_profile(profiles, b, h, w) is None:
        raise ShapeError(f"shape {format_shape((b, h, w))} is outside the engine's optimization profiles "
                         f"({describe_profiles(profiles)})")
