"""The model description: declared once, read by export, verify, engines and runners.

A :class:`ModelSpec` names the inputs and outputs (dtypes, dims with the
symbolic names ``batch``, ``height``, ``width``), the valid H/W multiple,
the timestep and class ranges used to make realistic inputs, and how to
rebuild the PyTorch reference (preset, config or import path, seed,
checkpoint hash). It travels inside every artifact: as ONNX metadata under
:data:`METADATA_KEY`, and inside an engine's sidecar.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import ShapeError, UsageError

METADATA_KEY = "attn_export.spec"
SPEC_FORMAT = 1
DYNAMIC_DIMS = ("batch", "height", "width")


@dataclass
class TensorSpec:
    """One input or output: name, numpy dtype name, dims (int or a symbolic name)."""

    name: str
    dtype: str
    dims: list[int | str]

    def shape_for(self, batch: int, height: int, width: int, axes: dict[str, int] | None = None) -> tuple[int, ...]:
        """Concrete shape of this tensor at the given batch and H/W (``axes``: sizes of other named dims)."""
        sizes = {**(axes or {}), "batch": batch, "height": height, "width": width}
        out = []
        for d in self.dims:
            if isinstance(d, str):
                if d not in sizes:
                    raise UsageError(f"tensor {self.name}: unknown symbolic dim {d!r}")
                out.append(sizes[d])
            else:
                out.append(int(d))
        return tuple(out)


@dataclass
class ModelSpec:
    """Everything later commands need to know about an exported denoiser."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    hw_multiple: int
    # Instance norm needs more than one position per channel at the deepest level.
    min_deep_positions: int = 1
    num_timesteps: int = 1000
    num_classes: int | None = None
    source: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    attention: str = "op"
    opset: int = 23
    precision: str = "fp32"
    export_shape: list[int] = field(default_factory=lambda: [2, 32, 32])
    tool_version: str = ""
    exporter: str = ""  # the PyTorch exporter that wrote the graph ("torchscript" | "dynamo"; "" for files from elsewhere)
    format: int = SPEC_FORMAT
    # Per-input data ranges [low, high] for make_inputs (files from elsewhere: sigma, conditioning scalars).
    input_ranges: dict[str, list[float]] = field(default_factory=dict)
    # Named dynamic dims of the extra inputs besides batch/height/width (a text length): [min, opt, max].
    axis_sizes: dict[str, list[int]] = field(default_factory=dict)

    def axes(self, which: str = "opt") -> dict[str, int]:
        """The size of each named extra axis at ``which`` ("min", "opt" or "max")."""
        i = ("min", "opt", "max").index(which)
        return {name: int(sizes[i]) for name, sizes in self.axis_sizes.items()}

    def shape_of(self, tensor: TensorSpec, batch: int, height: int, width: int, which: str = "opt") -> tuple[int, ...]:
        """``tensor``'s concrete shape at (batch, H, W), its other named axes at ``which`` of their range."""
        return tensor.shape_for(batch, height, width, self.axes(which))

    # ---- shapes ---------------------------------------------------------
    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def image_input(self) -> TensorSpec:
        """The (B, C, H, W) input."""
        return self.inputs[0]

    @property
    def fixed_hw(self) -> tuple[int, int] | None:
        """(height, width) when the image input's H and W are static, else None."""
        dims = self.image_input.dims
        if len(dims) == 4 and isinstance(dims[2], int) and isinstance(dims[3], int):
            return dims[2], dims[3]
        return None

    @property
    def in_channels(self) -> int:
        return int(self.image_input.dims[1])

    def check_shape(self, batch: int, height: int, width: int) -> None:
        """Raise ShapeError with the reason if (batch, H, W) cannot be served."""
        m = self.hw_multiple
        if batch < 1:
            raise ShapeError(f"batch must be at least 1 (got {batch})")
        dims = self.image_input.dims
        for value, dim, what in ((height, dims[2], "height"), (width, dims[3], "width")):
            if isinstance(dim, int) and value != dim:
                raise ShapeError(f"this model has a fixed {what} of {dim} (got {value})")
        if height < m or width < m or height % m or width % m:
            raise ShapeError(
                f"H and W must be positive multiples of {m} for this model (got {height}x{width})"
            )
        if (height // m) * (width // m) < self.min_deep_positions:
            raise ShapeError(
                f"{height}x{width} leaves {(height // m) * (width // m)} position(s) at the deepest level; this model's "
                f"instance norm needs at least {self.min_deep_positions} (e.g. {2 * m}x{2 * m})"
            )

    def make_inputs(self, batch: int, height: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded, realistic denoiser inputs: the image ~ N(0, 1), timesteps spread over the
        training range, random class labels where the model has classes, other float inputs
        uniform in [0, 1]; ``input_ranges`` overrides any input's range."""
        self.check_shape(batch, height, width)
        rng = np.random.default_rng(seed)
        feeds: dict[str, np.ndarray] = {}
        for i, t in enumerate(self.inputs):
            shape = self.shape_of(t, batch, height, width)
            floating = np.issubdtype(np.dtype(t.dtype), np.floating)
            if t.name in self.input_ranges:
                low, high = self.input_ranges[t.name]
                value = rng.uniform(low, high, size=shape)
                feeds[t.name] = (value if floating else np.floor(value)).astype(t.dtype)
            elif t.dtype == "bool":
                feeds[t.name] = padding_mask(rng, shape)
            elif floating and i > 0:
                feeds[t.name] = rng.uniform(0.0, 1.0, size=shape).astype(t.dtype)  # sigma, conditioning scalars
            elif floating:
                feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
            elif t.name == "y":
                feeds[t.name] = rng.integers(0, self.num_classes or 1, size=shape).astype(t.dtype)
            else:
                # Spread over [0, T): evenly spaced with jitter, so batch > 1 covers early and late steps.
                n = int(np.prod(shape)) if shape else 1
                base = (np.arange(n) + rng.random(n)) * (self.num_timesteps / max(n, 1))
                feeds[t.name] = np.clip(base, 0, self.num_timesteps - 1).astype(t.dtype).reshape(shape)
        return feeds

    # ---- serialization ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> "ModelSpec":
        """Build from a dict read from an artifact, after checking it against the schema (SchemaError)."""
        from .schema import SchemaError, model_spec

        if not isinstance(data, dict):
            raise SchemaError(f"description must be a JSON object (got {type(data).__name__})")
        fmt = data.get("format", SPEC_FORMAT)
        if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > SPEC_FORMAT:
            raise UsageError(
                f"artifact description format {fmt} is newer than this attn-export understands; upgrade attn-export"
            )
        model_spec(SPEC_FORMAT)(data, "description")
        data = dict(data)
        data["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
        data["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
        data["input_ranges"] = {k: [float(v[0]), float(v[1])] for k, v in (data.get("input_ranges") or {}).items()}
        data["axis_sizes"] = {k: [int(x) for x in v] for k, v in (data.get("axis_sizes") or {}).items()}
        spec = cls(**data)
        named = {d for t in spec.inputs for d in t.dims if isinstance(d, str)} - set(DYNAMIC_DIMS)
        if named - set(spec.axis_sizes):
            raise SchemaError(f"description: input dim {sorted(named - set(spec.axis_sizes))[0]!r} has no axis_sizes entry")
        unknown = sorted(set(spec.input_ranges) - {t.name for t in spec.inputs})
        if unknown:
            raise SchemaError(f"description.input_ranges names {', '.join(unknown)[:80]}, which are not inputs")
        return spec

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        """Parse and check a description stored as JSON (UsageError for bad JSON or a bad schema)."""
        if len(text) > 16 << 20:
            raise UsageError(f"description is {len(text) >> 20} MiB of JSON; a real one is a few KiB")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise UsageError(f"description is not valid JSON ({str(exc).splitlines()[0][:80]})") from None
        return cls.from_dict(data)


TRUST_FLAG = "--trust-artifact"


@dataclass(frozen=True)
class ReferenceOptions:
    """What the user said on the command line about an artifact's PyTorch reference model.

    Everything here is trusted (it came from the user); what the artifact
    records about its reference is data, used only as far as these allow:
    a factory or a checkpoint path named inside a file is imported or read
    only with ``trust_artifact``.
    """

    preset: str | None = None
    config: str | Path | None = None
    model: str | None = None
    model_kwargs: dict[str, Any] | None = None
    checkpoint: str | Path | None = None
    checkpoint_key: str | None = None
    allow_checkpoint_mismatch: bool = False
    trust_artifact: bool = False

    @property
    def names_model(self) -> bool:
        """True when the user named the reference model (preset, config, factory or checkpoint)."""
        return any(v is not None for v in (self.preset, self.config, self.model, self.checkpoint))


def padding_mask(rng: np.random.Generator, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """A boolean mask like a key-padding mask: along the last axis, True for a random prefix of at least one.

    Never all False in a row (a fully masked softmax row is NaN in PyTorch), and
    not all True either, so a mask the export dropped or inverted shows.
    """
    shape = tuple(int(d) for d in shape)
    if not shape:
        return np.array(True)
    keys = shape[-1]
    lengths = rng.integers(1, keys + 1, size=shape[:-1])
    if keys > 1 and lengths.size:
        lengths.flat[0] = max(1, keys // 2)  # at least one row is really padded
    return np.arange(keys) < lengths[..., None]


def parse_shape(text: str) -> tuple[int, int, int]:
    """Parse 'BxHxW' (e.g. '2x64x96') into (batch, height, width)."""
    parts = text.lower().strip().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"bad shape {text!r}: expected BATCHxHEIGHTxWIDTH, e.g. 2x64x96")
    b, h, w = (int(p) for p in parts)
    return b, h, w


def parse_shapes(text: str | Iterable[str]) -> list[tuple[int, int, int]]:
    """Parse a comma-separated list of 'BxHxW' shapes."""
    items = text.split(",") if isinstance(text, str) else list(text)
    shapes = [parse_shape(s) for s in items if s.strip()]
    if not shapes:
        raise UsageError("no shapes given")
    return shapes


def format_shape(shape: Iterable[int]) -> str:
    return "x".join(str(int(s)) for s in shape)
