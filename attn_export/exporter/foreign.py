"""ONNX files this tool did not export: a model description read off the graph, and Polygraphy-style shapes.

An attn-export file carries its :class:`ModelSpec`. A file from elsewhere does
not, so one is made from the graph alone: input names, dtypes and static dims;
the dynamic dims of the image input (the first 4-D float input) become
``batch``, ``height`` and ``width``, and other inputs' dims that share those
names (or their first axis) follow them. Nothing in the file is executed or
trusted as a path: the description only says how to feed the model.

Data for the inputs (:meth:`ModelSpec.make_inputs`): the image ~ N(0, 1);
other float inputs (sigma, a conditioning scalar) uniform in [0, 1]; integer
inputs (timesteps) spread over [0, 1000); each overridable with
``--input-range name:LOW:HIGH``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import onnx
from onnx import TensorProto

from ..version import __version__
from ..errors import UsageError
from ..graph.index import dtype_name
from ..spec import ModelSpec, TensorSpec

FOREIGN_KIND = "onnx"
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)

Shape = tuple[int, int, int]


def is_foreign(spec: ModelSpec) -> bool:
    """True for a description made from the graph of a file this tool did not export."""
    return (spec.source or {}).get("kind") == FOREIGN_KIND


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in vi.type.tensor_type.shape.dim]


def describe_graph(model: onnx.ModelProto, *, origin: str = "model",
                   input_ranges: dict[str, tuple[float, float]] | None = None) -> ModelSpec:
    """A :class:`ModelSpec` for ``model`` made from its graph alone (see the module docstring)."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    if not inputs:
        raise UsageError(f"{origin} has no graph inputs")
    image = next((vi for vi in inputs if len(_dims(vi)) == 4 and vi.type.tensor_type.elem_type in _FLOATS), None)
    if image is None:
        raise UsageError(f"{origin} has no 4-D float input (B, C, H, W) to treat as the image")
    img = _dims(image)
    if not isinstance(img[1], int):
        raise UsageError(f"{origin}: the channel dim of input {image.name} is not static")
    names: dict[str, str] = {}  # the file's dim_param -> batch/height/width
    for axis, role in ((0, "batch"), (2, "height"), (3, "width")):
        if isinstance(img[axis], str):
            names[str(img[axis])] = role

    def spec_dims(vi: onnx.ValueInfoProto, is_image: bool) -> list[int | str]:
        out: list[int | str] = []
        dims = _dims(vi)
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                out.append(d)
            elif isinstance(d, str) and d in names:
                out.append(names[d])
            elif (is_image or len(dims) == 4) and axis in (0, 2, 3):
                out.append(("batch", "", "height", "width")[axis])
            elif axis == 0:
                out.append("batch")
            else:
                raise UsageError(f"{origin}: input {vi.name} has a dynamic dim {axis} ({d or 'unnamed'}) that is not "
                                 "its batch, height or width; attn-export cannot make data for it")
        return out

    def tensor(vi: onnx.ValueInfoProto, is_image: bool = False) -> TensorSpec:
        dt = dtype_name(vi.type.tensor_type.elem_type) or "float32"
        try:
            dims = spec_dims(vi, is_image)
        except UsageError:
            if vi in inputs:
                raise
            dims = [d if isinstance(d, int) else "?" for d in _dims(vi)]  # outputs: informative only
        return TensorSpec(vi.name, dt, dims)

    ordered = [image] + [vi for vi in inputs if vi.name != image.name]
    spec_inputs = [tensor(vi, vi.name == image.name) for vi in ordered]
    spec_outputs = [tensor(vi) for vi in model.graph.output]
    ranges = {k: [float(v[0]), float(v[1])] for k, v in (input_ranges or {}).items()}
    unknown = sorted(set(ranges) - {t.name for t in spec_inputs})
    if unknown:
        raise UsageError(f"--input-range names {', '.join(unknown)}, which {origin} has no input called")
    half = any(i.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16) for i in model.graph.initializer)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ModelSpec(
        inputs=spec_inputs, outputs=spec_outputs, hw_multiple=1, source={"kind": FOREIGN_KIND, "origin": origin},
        attention="op" if any(n.op_type == "Attention" for n in model.graph.node) else "decomposed",
        opset=opset, precision="fp16" if half else "fp32", tool_version=__version__, input_ranges=ranges,
        export_shape=[],
    )


def spec_of(model: onnx.ModelProto | str | Path, *, origin: str | Path | None = None,
            input_ranges: dict[str, tuple[float, float]] | None = None, foreign: bool = True) -> ModelSpec:
    """The description of an ONNX graph or file (read without its weights), by one rule: the embedded attn-export
    description, else (``foreign``) one read off the graph of a file from elsewhere; UsageError when it has none
    and ``foreign`` is False, or when it breaks the schema. ``input_ranges`` replace the recorded ones.

    Engines are described by their sidecar: :func:`attn_export.engines.sidecar.artifact_spec` reads either.
    """
    from .metadata import find_spec, load_onnx

    if not isinstance(model, onnx.ModelProto):
        origin = origin or str(model)
        model = load_onnx(model, load_external_data=False)
    origin = origin or "model"
    spec = find_spec(model, origin)
    if spec is None:
        if not foreign:
            raise UsageError(f"{origin} carries no attn-export description; export it with `attn-export onnx`")
        return describe_graph(model, origin=str(origin), input_ranges=input_ranges)
    if input_ranges:
        spec.input_ranges = {k: [float(v[0]), float(v[1])] for k, v in input_ranges.items()}
    return spec


def parse_input_shapes(texts: str | Iterable[str], spec: ModelSpec) -> list[Shape]:
    """Polygraphy/trtexec-style ``name:1x3x64x64,other:1`` sets (one per text) as (batch, H, W) triples.

    The image input's entry gives batch, H and W; every other entry must be
    what the model's description says that input is at that size.
    """
    items = [texts] if isinstance(texts, str) else list(texts)
    out: list[Shape] = []
    image = spec.image_input
    for text in items:
        given: dict[str, tuple[int, ...]] = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            name, sep, dims = part.rpartition(":")
            if not sep or not name:
                raise UsageError(f"bad --shapes entry {part!r}: expected name:DIMxDIM..., e.g. x:1x3x64x64")
            try:
                value = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
            except ValueError:
                raise UsageError(f"bad --shapes entry {part!r}: dims must be integers joined by x") from None
            if any(v < 1 for v in value):
                raise UsageError(f"bad --shapes entry {part!r}: dims must be positive")
            given[name] = value
        unknown = sorted(set(given) - {t.name for t in spec.inputs})
        if unknown:
            raise UsageError(f"--shapes names {', '.join(unknown)}; the model's inputs are "
                             f"{', '.join(t.name for t in spec.inputs)}")
        if image.name not in given:
            raise UsageError(f"--shapes {text!r} has no entry for the image input {image.name}")
        image_dims = given[image.name]
        if len(image_dims) != 4:
            raise UsageError(f"--shapes: {image.name} is 4-D (B, C, H, W); got {'x'.join(map(str, image_dims))}")
        b, h, w = image_dims[0], image_dims[2], image_dims[3]
        for t in spec.inputs:
            want = spec.shape_of(t, b, h, w)
            if t.name in given and tuple(given[t.name]) != tuple(want):
                raise UsageError(f"--shapes: {t.name} must be {'x'.join(map(str, want)) or 'a scalar'} "
                                 f"when {image.name} is {'x'.join(map(str, image_dims))} (got {'x'.join(map(str, given[t.name]))})")
        out.append((b, h, w))
    return out


def parse_input_ranges(texts: Sequence[str] | None) -> dict[str, tuple[float, float]]:
    """``name:LOW:HIGH`` entries (repeatable) as {name: (low, high)}."""
    out: dict[str, tuple[float, float]] = {}
    for text in texts or ():
        parts = text.rsplit(":", 2)
        try:
            low, high = float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            raise UsageError(f"bad --input-range {text!r}: expected name:LOW:HIGH, e.g. sigma:0.002:80") from None
        if not parts[0] or not low <= high:
            raise UsageError(f"bad --input-range {text!r}: needs a name and LOW <= HIGH")
        out[parts[0]] = (low, high)
    return out


def static_shapes(spec: ModelSpec) -> list[Shape] | None:
    """The shapes a foreign model with a static H and W serves (None when H or W is dynamic)."""
    dims = spec.image_input.dims
    if isinstance(dims[2], int) and isinstance(dims[3], int):
        return [(1, dims[2], dims[3])] + ([(2, dims[2], dims[3])] if isinstance(dims[0], str) else [])
    return None


def need_shapes(spec: ModelSpec, what: str) -> list[Shape]:
    """Shapes for a foreign model without user shapes: its static size, else a one-line error."""
    shapes = static_shapes(spec)
    if shapes is None:
        raise UsageError(f"{spec.source.get('origin', 'the model')} has no attn-export description and a dynamic height/"
                         f"width: give the shapes for {what} with --shapes "
                         f"{spec.image_input.name}:1x{spec.in_channels}x64x64 (repeatable)")
    return shapes


def resolve_shapes(spec: ModelSpec, shapes: Sequence[Shape] | None, input_shapes: str | Sequence[str] | None, *,
                   what: str, option: str) -> list[Shape] | None:
    """The shapes to use: ``option``'s BxHxW list or ``--shapes`` (not both), else a foreign model's own.

    None means "the caller's default" (an attn-export file knows its sizes).
    """
    if input_shapes:
        if shapes:
            raise UsageError(f"give either {option} or --shapes, not both")
        return parse_input_shapes(input_shapes, spec)
    if shapes:
        return list(shapes)
    return need_shapes(spec, what) if is_foreign(spec) else None
