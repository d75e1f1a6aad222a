"""Reading and writing the model description inside ONNX files."""

from __future__ import annotations

from pathlib import Path

import onnx

from .. import __version__
from ..errors import UsageError
from ..spec import METADATA_KEY, ModelSpec


def embed_spec(model: onnx.ModelProto, spec: ModelSpec) -> None:
    """Store ``spec`` as JSON in the model's metadata_props (replacing an older copy)."""
    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    prop = model.metadata_props.add()
    prop.key = METADATA_KEY
    prop.value = spec.to_json()
    model.producer_name = "attn-export"
    model.producer_version = __version__


def spec_from_model(model: onnx.ModelProto, origin: str = "model") -> ModelSpec:
    """The ModelSpec stored in ``model``; UsageError if it has none."""
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            try:
                return ModelSpec.from_json(p.value)
            except UsageError as exc:
                raise UsageError(f"{origin}: its attn-export {exc}") from None
    raise UsageError(f"{origin} carries no attn-export description; export it with `attn-export onnx`")


def load_onnx(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file with a one-line error for missing or corrupt files."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"ONNX file not found: {p}")
    try:
        return onnx.load(str(p), load_external_data=load_external_data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several unrelated types
        raise UsageError(f"{p} is not a readable ONNX file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def read_spec(path: str | Path) -> ModelSpec:
    """The ModelSpec inside an ONNX file, without loading its weights."""
    return spec_from_model(load_onnx(path, load_external_data=False), origin=str(path))
