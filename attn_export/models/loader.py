"""Build the PyTorch model an export or a verification starts from.

A :class:`ModelSource` says where the model comes from (a preset, a JSON
config, or ``package.module:factory``), which checkpoint to load and which
seed initializes it when there is none. :func:`load_model` returns the model
wrapped to the ``(x, t[, y]) -> tensor`` signature together with its
:class:`~attn_export.spec.ModelSpec`. :func:`source_from_spec` reverses it:
the spec stored in an artifact rebuilds the same reference model.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..version import __version__
from ..errors import CheckpointError, OptionNeeded, UsageError
from ..spec import TRUST_FLAG, ModelSpec, ReferenceOptions, TensorSpec
from .attention import AttentionImpl, set_attention_impl
from ..files import file_sha256
from .checkpoint import load_state_dict_strict, read_checkpoint
from .diffusers_map import DiffusersCheckpoint, checked_against, config_from_diffusers, find_diffusers, map_state_dict
from .key_maps import adapt_state_dict
from .presets import PRESETS, preset_config
from .unet import UNet, UNetConfig

DEFAULT_SEED = 0


@dataclass
class ModelSource:
    """Where a model comes from. Exactly one of preset, config and model is set
    (preset 'tiny' when none is)."""

    preset: str | None = None
    config: str | Path | dict[str, Any] | None = None
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | Path | None = None
    checkpoint_key: str | None = None
    seed: int = DEFAULT_SEED
    overrides: dict[str, Any] = field(default_factory=dict)
    # For imported models, which cannot always be introspected:
    num_classes: int | None = None
    hw_multiple: int | None = None
    # (height, width) for a model that serves one size: H and W become static in the export (batch stays dynamic).
    static_hw: tuple[int, int] | None = None
    # More inputs of an imported model's forward (a text context, a mask), passed by keyword after x, t[, y].
    extra_inputs: list[TensorSpec] = field(default_factory=list)
    # Sizes [min, opt, max] of the extra inputs' named axes besides batch (a text length "seq").
    extra_axes: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        given = [n for n in ("preset", "config", "model") if getattr(self, n) is not None]
        if len(given) > 1:
            raise UsageError(f"give only one of --preset, --config and --model (got {', '.join(given)})")
        if not given:
            self.preset = "tiny"
        if self.preset is not None and self.preset not in PRESETS:
            raise UsageError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.model_kwargs and self.model is None:
            raise UsageError("--model-kwargs needs --model")
        if self.extra_inputs and self.model is None:
            raise UsageError("--extra-input needs --model (the built-in UNets take x, t and y only)")
        taken = {"x", "t", "y"}
        for extra in self.extra_inputs:
            if extra.name in taken:
                raise UsageError(f"--extra-input {extra.name}: the name is taken (x, t, y and each extra input once)")
            taken.add(extra.name)
            for d in extra.dims:
                if isinstance(d, str) and d != "batch" and d not in self.extra_axes:
                    raise UsageError(f"--extra-input {extra.name}: axis {d!r} has no size (write {d}=SIZE)")
        if self.static_hw is not None:
            h, w = (int(v) for v in self.static_hw)
            if h < 1 or w < 1 or h > 65536 or w > 65536:
                raise UsageError(f"--static-hw must be HEIGHTxWIDTH, each 1..65536 (got {h}x{w})")
            self.static_hw = (h, w)


@dataclass
class LoadedModel:
    """A model ready for export or reference runs, with its description."""

    module: nn.Module
    spec: ModelSpec
    config: UNetConfig | None

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


class DenoiserAdapter(nn.Module):
    """Gives any denoiser the ``(x, t[, y]) -> tensor`` signature.

    The wrapped model may return a tensor, or a tuple, list, dict or
    dataclass holding it (the first tensor found, or ``output_key``).
    """

    def __init__(self, inner: nn.Module, takes_y: bool, output_key: str | None = None,
                 extra_names: Sequence[str] = ()) -> None:
        super().__init__()
        self.inner = inner
        self.takes_y = takes_y
        self.output_key = output_key
        self.extra_names = list(extra_names)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
        """``(x, t[, y], *extras)`` in the spec's input order; the extra inputs reach the model by keyword."""
        y, extras = (rest[0], rest[1:]) if self.takes_y else (None, rest)
        by_name = dict(zip(self.extra_names, extras))
        out = self.inner(x, t, y, **by_name) if self.takes_y else self.inner(x, t, **by_name)
        return _first_tensor(out, self.output_key)


def _first_tensor(out: Any, key: str | None = None) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        out = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    if isinstance(out, Mapping):
        if key is not None:
            if key not in out:
                raise UsageError(f"model output has no key {key!r} (keys: {', '.join(map(str, out))})")
            return _first_tensor(out[key])
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    raise UsageError(f"model output holds no tensor (got {type(out).__name__})")


def _import_factory(target: str) -> Any:
    if ":" not in target:
        raise UsageError(f"--model must look like package.module:factory (got {target!r})")
    mod_name, _, attr = target.partition(":")
    # Models living next to the user's scripts import like they do in the user's own code.
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {mod_name!r} for --model: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--model {target!r} is not callable")
    return obj


def _unet_spec(config: UNetConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    dims_x: list[int | str] = ["batch", config.in_channels, "height", "width"]
    inputs = [TensorSpec("x", "float32", dims_x), TensorSpec("t", "int64", ["batch"])]
    if config.num_classes is not None:
        inputs.append(TensorSpec("y", "int64", ["batch"]))
    outputs = [TensorSpec("out", "float32", ["batch", config.out_channels, "height", "width"])]
    return inputs, outputs


def _extras_at(extra_inputs: Sequence[TensorSpec], batch: int, height: int, width: int,
               axes: dict[str, int] | None = None) -> list[torch.Tensor]:
    """Zero-filled extra inputs (float) or ones (bool, int: masks attend everywhere) for a probe call."""
    out = []
    for t in extra_inputs:
        shape = t.shape_for(batch, height, width, axes)
        dtype = getattr(torch, t.dtype)
        out.append(torch.zeros(shape, dtype=dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype))
    return out


def _call_probe(module: nn.Module, x: torch.Tensor, takes_y: bool, extra_inputs: Sequence[TensorSpec]) -> torch.Tensor:
    b, _, h, w = x.shape
    t = torch.zeros(b, dtype=torch.int64)
    y = [torch.zeros(b, dtype=torch.int64)] if takes_y else []
    axes = {d: 1 for e in extra_inputs for d in e.dims if isinstance(d, str)}  # other named axes: any size serves
    return module(x, t, *y, *_extras_at(extra_inputs, b, h, w, axes))


def _probe_imported(module: nn.Module, in_channels: int, takes_y: bool, num_classes: int | None,
                    extra_inputs: Sequence[TensorSpec] = ()) -> tuple[int, int]:
    """Find the smallest H/W multiple the model serves, and its output channels, by running it."""
    last = ""
    with torch.no_grad():
        for m in (1, 2, 4, 8, 16, 32, 64):
            size = 3 * m  # an odd multiple of m fails whenever m is too small
            x = torch.zeros(1, in_channels, size, size)
            try:
                out = _call_probe(module, x, takes_y, extra_inputs)
            except Exception as exc:  # noqa: BLE001 - a failing probe size just means "not this multiple"
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                last = f"; at {size}x{size} (x:1x{in_channels}x{size}x{size}) the model raised {type(exc).__name__}: {first}"
                continue
            if out.dim() == 4 and tuple(out.shape[2:]) == (size, size):
                return m, int(out.shape[1])
            last = f"; at {size}x{size} it returned {tuple(out.shape)}"
    raise UsageError(f"could not find an H/W size the imported model serves (tried 3, 6, 12 ... 192 px){last}; "
                     "pass --hw-multiple, or --static-hw HxW for a model that serves one size only")


def _in_channels_of(module: nn.Module) -> int:
    for attr in ("in_channels", "img_channels"):
        value = getattr(module, attr, None) or getattr(getattr(module, "config", None), attr, None)
        if isinstance(value, int):
            return value
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            return sub.in_channels
    raise UsageError("cannot tell the imported model's input channels (no Conv2d found)")


def load_model(source: ModelSource, attention_impl: AttentionImpl = "reference") -> LoadedModel:
    """Build the model described by ``source`` in eval mode, with its checkpoint loaded."""
    description: dict[str, Any]
    config: UNetConfig | None = None
    diffusers: DiffusersCheckpoint | None = None
    torch.manual_seed(source.seed)
    if source.model is not None:
        factory = _import_factory(source.model)
        try:
            inner = factory(**source.model_kwargs)
        except TypeError as exc:
            raise UsageError(f"calling {source.model} with --model-kwargs failed: {exc}") from None
        if not isinstance(inner, nn.Module):
            raise UsageError(f"{source.model} returned a {type(inner).__name__}, not a torch.nn.Module")
        inner.eval()
        num_classes = source.num_classes if source.num_classes is not None else getattr(inner, "num_classes", None)
        takes_y = num_classes is not None
        module: nn.Module = DenoiserAdapter(inner, takes_y, extra_names=[t.name for t in source.extra_inputs])
        description = {"kind": "import", "model": source.model, "model_kwargs": dict(source.model_kwargs), "seed": source.seed}
    else:
        if source.preset is not None:
            config = preset_config(source.preset, **source.overrides)
            description = {"kind": "preset", "preset": source.preset, "seed": source.seed}
        else:
            cfg = source.config
            if isinstance(cfg, dict):
                config = UNetConfig.from_dict({**cfg, **source.overrides})
            elif (theirs := find_diffusers(Path(str(cfg)))) is not None:
                config = config_from_diffusers(theirs.config, origin=str(cfg))
                if source.overrides:
                    config = dataclasses.replace(config, **source.overrides)
            else:
                # A path: with preset and model None, ModelSource.__post_init__ leaves config set.
                assert cfg is not None
                config = UNetConfig.from_json(cfg)
                if source.overrides:
                    config = dataclasses.replace(config, **source.overrides)
            description = {"kind": "config", "seed": source.seed}
        diffusers = find_diffusers(source.checkpoint) if source.checkpoint is not None else None
        if diffusers is not None:
            # The weights' own config decides how they were trained; the preset or config decides the shape.
            config = checked_against(config, config_from_diffusers(diffusers.config, origin=str(diffusers.config_path)),
                                     source.preset or "of --config")
        description["config"] = config.to_dict()
        module = UNet(config)
        inner = module
    ckpt_info = None
    if source.checkpoint is not None:
        layout = None
        if config is not None and diffusers is not None:
            state, used_key = read_checkpoint(diffusers.weights, source.checkpoint_key)
            state, layout = map_state_dict(state, config), "diffusers UNet2DModel"
        else:
            state, used_key = read_checkpoint(source.checkpoint, source.checkpoint_key)
        if config is not None and layout is None:  # our UNet: state dicts of the same layout saved by other code
            state, layout = adapt_state_dict(state, set(inner.state_dict()))
        load_state_dict_strict(inner, state, source=f"checkpoint {Path(source.checkpoint).name}")
        weights = diffusers.weights if diffusers is not None else Path(source.checkpoint)
        ckpt_info = {
            "path": str(weights.resolve()),
            "sha256": file_sha256(weights),
            "key": used_key,
            "layout": layout,
        }
    module.eval()
    set_attention_impl(module, attention_impl)

    if config is not None:
        inputs, outputs = _unet_spec(config)
        spec = ModelSpec(
            inputs=inputs, outputs=outputs, hw_multiple=config.hw_multiple,
            min_deep_positions=config.min_deep_positions,
            num_timesteps=config.num_timesteps, num_classes=config.num_classes,
            source=description, checkpoint=ckpt_info, tool_version=__version__,
            axis_sizes={k: list(v) for k, v in source.extra_axes.items()},
        )
    else:
        in_ch = _in_channels_of(inner)
        takes_y = isinstance(module, DenoiserAdapter) and module.takes_y
        if source.hw_multiple is not None or source.static_hw is not None:
            multiple = source.hw_multiple or 1
            h, w = source.static_hw or (multiple * 2, multiple * 2)
            out_ch = _output_channels(module, in_ch, takes_y, h, w, source.extra_inputs)
        else:
            multiple, out_ch = _probe_imported(module, in_ch, takes_y, num_classes, source.extra_inputs)
        inputs = [TensorSpec("x", "float32", ["batch", in_ch, "height", "width"]), TensorSpec("t", "int64", ["batch"])]
        if takes_y:
            inputs.append(TensorSpec("y", "int64", ["batch"]))
        inputs += [TensorSpec(t.name, t.dtype, list(t.dims)) for t in source.extra_inputs]
        outputs = [TensorSpec("out", "float32", ["batch", out_ch, "height", "width"])]
        if source.extra_inputs:
            description["extra_inputs"] = [dataclasses.asdict(t) for t in source.extra_inputs]
        if source.extra_axes:
            description["extra_axes"] = {k: list(v) for k, v in source.extra_axes.items()}
        description["hw_multiple"] = multiple
        description["num_classes"] = num_classes
        if source.static_hw is not None:
            description["static_hw"] = list(source.static_hw)
        spec = ModelSpec(
            inputs=inputs, outputs=outputs, hw_multiple=multiple, num_classes=num_classes,
            source=description, checkpoint=ckpt_info, tool_version=__version__,
            axis_sizes={k: list(v) for k, v in source.extra_axes.items()},
        )
    if source.static_hw is not None:
        if config is not None:
            description["static_hw"] = list(source.static_hw)
        spec = with_static_hw(spec, *source.static_hw)
    return LoadedModel(module=module, spec=spec, config=config)


def model_raised(exc: BaseException, inputs: str) -> UsageError:
    """The one-line error for an exception raised by the user's own forward, called with ``inputs`` (exit 2)."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return UsageError(f"the model raised {type(exc).__name__} when called with {inputs}: {first}")


def _output_channels(module: nn.Module, in_ch: int, takes_y: bool, h: int, w: int,
                     extra_inputs: Sequence[TensorSpec] = ()) -> int:
    """Run the imported model once at 1 x in_ch x h x w; its output channels. Its own error is reported as its own."""
    try:
        with torch.no_grad():
            out = _call_probe(module, torch.zeros(1, in_ch, h, w), takes_y, extra_inputs)
    except Exception as exc:  # noqa: BLE001 - the user's forward can raise anything
        raise model_raised(exc, f"x:1x{in_ch}x{h}x{w}, t:1") from None
    if out.dim() != 4 or tuple(out.shape[2:]) != (h, w):
        raise UsageError(f"the model returned {tuple(out.shape)} for a 1x{in_ch}x{h}x{w} input; "
                         "a denoiser returns an image of its input's height and width")
    return int(out.shape[1])


def with_static_hw(spec: ModelSpec, height: int, width: int) -> ModelSpec:
    """``spec`` with its height and width dims fixed at ``height`` x ``width`` (batch stays dynamic).

    UsageError when the size is not one the model's H/W multiple allows.
    """
    m = spec.hw_multiple
    if height % m or width % m:
        raise UsageError(f"--static-hw {height}x{width}: H and W must be multiples of {m} for this model")
    fixed = {"height": height, "width": width}
    for t in spec.inputs + spec.outputs:
        t.dims = [fixed.get(d, d) if isinstance(d, str) else d for d in t.dims]
    return spec


def check_reference_fits(spec: ModelSpec, ref_spec: ModelSpec) -> None:
    """UsageError when the reference model (``ref_spec``) does not take the artifact's inputs (``spec``)."""
    want = [t.name for t in spec.inputs]
    got = [t.name for t in ref_spec.inputs]
    if want != got or ref_spec.in_channels != spec.in_channels:
        raise UsageError(
            f"the reference model takes {', '.join(got)} with {ref_spec.in_channels} channels but the artifact takes "
            f"{', '.join(want)} with {spec.in_channels}; check --preset/--config/--model")


def source_from_spec(spec: ModelSpec, options: ReferenceOptions | None = None) -> ModelSource:
    """The ModelSource that rebuilds an artifact's reference model, with the user's choices applied.

    A checkpoint whose SHA-256 differs from the one recorded at export is refused
    unless ``allow_checkpoint_mismatch`` is set. What the artifact names is data:
    a factory recorded as an import (``--model pkg.mod:factory`` at export), its
    keyword arguments and a recorded checkpoint path are used only when the
    user names them again (``model``, ``checkpoint``) or passes
    ``trust_artifact``; presets and configs are data and need neither.
    """
    o = options or ReferenceOptions()
    src = spec.source or {}
    recorded = spec.checkpoint
    if o.checkpoint is not None and not recorded and not o.allow_checkpoint_mismatch:
        # The artifact was made from seeded random weights: any checkpoint is a different model.
        raise CheckpointError(
            f"the artifact was exported without a checkpoint (seeded initialization), so {o.checkpoint} is not "
            "the model it came from; pass --allow-checkpoint-mismatch to compare anyway")
    seed = int(src.get("seed", DEFAULT_SEED))
    if o.preset is not None or o.config is not None or o.model is not None:
        # The size the artifact was exported for stays its size, whichever model the user names to rebuild it.
        source = ModelSource(preset=o.preset, config=o.config, model=o.model, model_kwargs=o.model_kwargs or {},
                             seed=seed, static_hw=_static_hw_of(src),
                             hw_multiple=src.get("hw_multiple") if o.model is not None else None,
                             num_classes=src.get("num_classes") if o.model is not None else None,
                             extra_inputs=_extras_of(src) if o.model is not None else [],
                             extra_axes=_axes_of(src) if o.model is not None else {})
    elif src.get("kind") == "import":
        if not o.trust_artifact:
            raise UsageError(
                f"the artifact's reference model is the factory {str(src.get('model'))[:80]!r} named inside the file; "
                "an artifact is data, so it is not imported: name it yourself with --model (and --model-kwargs), or "
                f"pass {TRUST_FLAG} to run what the file names")
        source = ModelSource(model=src["model"], model_kwargs=dict(src.get("model_kwargs") or {}), seed=seed,
                             num_classes=src.get("num_classes"), hw_multiple=src.get("hw_multiple"),
                             static_hw=_static_hw_of(src), extra_inputs=_extras_of(src), extra_axes=_axes_of(src))
    elif src.get("kind") in ("preset", "config") and "config" in src:
        # The full config is recorded, so a preset changed in a later version still rebuilds the same model.
        source = ModelSource(config=dict(src["config"]), seed=seed, static_hw=_static_hw_of(src))
    else:
        raise UsageError("the artifact does not say how to rebuild its PyTorch model; pass --preset, --config or --model")

    if o.checkpoint is not None:
        checkpoint = o.checkpoint
        source.checkpoint = checkpoint
        source.checkpoint_key = o.checkpoint_key
        if recorded and not o.allow_checkpoint_mismatch:
            actual = file_sha256(checkpoint) if Path(checkpoint).is_file() else None
            if actual is not None and actual != recorded.get("sha256"):
                raise CheckpointError(
                    f"checkpoint {checkpoint} (sha256 {actual[:12]}) is not the one this artifact was exported from "
                    f"(sha256 {str(recorded.get('sha256'))[:12]}); pass --allow-checkpoint-mismatch to compare anyway"
                )
    elif recorded:
        if not o.trust_artifact:
            raise OptionNeeded(
                f"the artifact was exported from checkpoint {str(recorded.get('path'))[:160]} (sha256 "
                f"{str(recorded.get('sha256'))[:12]}); a path inside a file is data, so it is not read: pass "
                f"--checkpoint PATH (checked against that sha256), or {TRUST_FLAG} to read the recorded path",
                ["--checkpoint", str(recorded.get("path"))[:400]])
        allow_checkpoint_mismatch = o.allow_checkpoint_mismatch
        path = Path(str(recorded.get("path")))
        if not path.is_file():
            raise CheckpointError(f"the artifact was exported from checkpoint {path}, which is not there; pass --checkpoint")
        actual = file_sha256(path)
        if actual != recorded.get("sha256") and not allow_checkpoint_mismatch:
            raise CheckpointError(
                f"checkpoint {path} changed since export (sha256 {actual[:12]}, recorded {str(recorded.get('sha256'))[:12]}); "
                "pass --allow-checkpoint-mismatch to compare anyway"
            )
        source.checkpoint = path
        source.checkpoint_key = recorded.get("key")
    return source


def _extras_of(src: dict[str, Any]) -> list[TensorSpec]:
    return [TensorSpec(str(t["name"]), str(t["dtype"]), list(t["dims"])) for t in src.get("extra_inputs") or []]


def _axes_of(src: dict[str, Any]) -> dict[str, list[int]]:
    return {str(k): [int(x) for x in v] for k, v in (src.get("extra_axes") or {}).items()}


def parse_extra_inputs(texts: Sequence[str]) -> tuple[list[TensorSpec], dict[str, list[int]]]:
    """Each ``--extra-input`` (see :func:`parse_extra_input`), and the [min, opt, max] of every named axis."""
    inputs: list[TensorSpec] = []
    axes: dict[str, list[int]] = {}
    for text in texts:
        spec, sizes = _parse_extra(text, axes)
        for name, size in sizes.items():
            if name in axes and axes[name] != size:
                raise UsageError(f"--extra-input {text!r}: axis {name!r} is given two sizes ({axes[name]} and {size})")
            axes[name] = size
        inputs.append(spec)
    return inputs, axes


def parse_extra_input(text: str) -> TensorSpec:
    """``NAME:DTYPE:DIMS`` (DIMS comma-separated: ``batch``, a size, or a named dynamic axis with its size:
    ``seq=77`` or ``seq=1-77-154`` for min-opt-max), e.g. ``encoder_hidden_states:float32:batch,77,768``."""
    return _parse_extra(text)[0]


def _parse_extra(text: str, known: dict[str, list[int]] | None = None) -> tuple[TensorSpec, dict[str, list[int]]]:
    parts = text.strip().split(":")
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise UsageError(f"--extra-input {text!r}: expected NAME:DTYPE:DIMS such as context:float32:batch,77,768")
    name, dtype, dims_text = parts
    if not re.fullmatch(r"[A-Za-z_][\w.-]{0,127}", name):
        raise UsageError(f"--extra-input {text!r}: {name!r} is not an input name")
    if dtype not in EXTRA_DTYPES:
        raise UsageError(f"--extra-input {text!r}: dtype must be one of {', '.join(EXTRA_DTYPES)}")
    dims: list[int | str] = []
    axes: dict[str, list[int]] = {}
    for d in dims_text.split(","):
        d = d.strip()
        named = re.fullmatch(r"([A-Za-z_]\w{0,63})=(\d+)(?:-(\d+)-(\d+))?", d)
        if d == "batch":
            dims.append(d)
        elif d.isdigit() and int(d) > 0:
            dims.append(int(d))
        elif named:
            axis = named.group(1)
            sizes = [int(named.group(2))] * 3 if named.group(3) is None else [int(named.group(i)) for i in (2, 3, 4)]
            if sizes[0] == sizes[2] and named.group(3) is None:
                sizes[0] = 1  # seq=77: any length up to 77, 77 the usual one
            if axis in ("batch", "height", "width") or axis in axes or not 1 <= sizes[0] <= sizes[1] <= sizes[2] <= 1 << 20:
                raise UsageError(f"--extra-input {text!r}: axis {d!r} must be a new name with sizes "
                                 "min <= opt <= max (seq=77 or seq=1-77-154)")
            axes[axis] = sizes
            dims.append(axis)
        elif d in (known or {}) or d in axes:
            dims.append(d)  # an axis an earlier --extra-input sized (a mask as long as its context)
        elif re.fullmatch(r"[A-Za-z_]\w*", d):
            raise UsageError(f"--extra-input {text!r}: the dynamic axis {d!r} needs its size: write {d}=77 "
                             f"(any length up to 77) or {d}=1-77-154 (min-opt-max)")
        else:
            raise UsageError(f"--extra-input {text!r}: bad dim {d!r} (batch, a positive size, or NAME=SIZE)")
    if "batch" in dims and dims[0] != "batch":
        raise UsageError(f"--extra-input {text!r}: batch must be the first dim")
    return TensorSpec(name, dtype, dims), axes


EXTRA_DTYPES = ("float32", "float16", "int64", "int32", "bool")


def _static_hw_of(src: dict[str, Any]) -> tuple[int, int] | None:
    fixed = src.get("static_hw")
    return (int(fixed[0]), int(fixed[1])) if fixed else None


def describe_presets() -> str:
    """One line per preset, for --help texts."""
    return ", ".join(PRESETS)


def dump_config(config: UNetConfig) -> str:
    return json.dumps(config.to_dict(), indent=2)
