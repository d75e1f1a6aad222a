"""Reading and writing the model description inside ONNX files."""

from __future__ import annotations

import json
from typing import Any

from pathlib import Path

import onnx

from ..version import __version__
from ..errors import UsageError
from ..graph.index import leaves_folder
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


def set_record(model: onnx.ModelProto, key: str, value: dict[str, Any]) -> None:
    """Store ``value`` as JSON under ``key`` in the model's metadata_props, replacing an older copy."""
    keep = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    prop = model.metadata_props.add()
    prop.key, prop.value = key, json.dumps(value, sort_keys=True)


def read_record(model: onnx.ModelProto, key: str) -> dict[str, Any] | None:
    """The JSON object stored under ``key``; None when absent or not a JSON object (records are data)."""
    for prop in model.metadata_props:
        if prop.key == key:
            try:
                value = json.loads(prop.value)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


def find_spec(model: onnx.ModelProto, origin: str | Path = "model") -> ModelSpec | None:
    """The ModelSpec stored in ``model``, None if it has none; UsageError if it breaks the schema."""
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            try:
                return ModelSpec.from_json(p.value)
            except UsageError as exc:
                raise UsageError(f"{origin}: its attn-export {exc}") from None
    return None


def external_data_locations(model: onnx.ModelProto, origin: str | Path = "model") -> list[str]:
    """The external data files a model names, each checked to be a plain relative path.

    A location is data from the file: an absolute path or one with ``..``
    would make a command read (or a Triton repository copy) a file outside
    the model's folder, so it is refused (UsageError).
    """
    out: list[str] = []
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in init.external_data:
            if entry.key != "location" or entry.value in out:
                continue
            loc = entry.value
            if leaves_folder(loc):
                raise UsageError(f"{origin}: initializer {init.name[:60]} names external data {loc[:80]!r}, outside the "
                                 "model's folder; refusing to read it")
            out.append(loc)
    return out


def load_onnx(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file with a one-line error for missing, empty, corrupt or graph-less files.

    External data locations are checked before any is read.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"ONNX file not found: {p}")
    if p.stat().st_size == 0:
        raise UsageError(f"{p} is not an ONNX model (the file is empty)")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several unrelated types
        raise UsageError(f"{p} is not a readable ONNX file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    # Protobuf parses many byte strings as an empty message: a model has an IR version, an opset and a graph with output.
    if model.ir_version < 1 or not model.opset_import or not model.graph.output or not model.graph.node:
        raise UsageError(f"{p} is not an ONNX model (no graph with nodes and outputs in it)")
    locations = external_data_locations(model, p)
    if load_external_data and locations:
        missing = [loc for loc in locations if not (p.parent / loc).is_file()]
        if missing:
            raise UsageError(f"{p} keeps its weights in {missing[0]}, which is not next to it")
        try:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, str(p.parent))
        except Exception as exc:  # noqa: BLE001 - truncated or unreadable data files
            raise UsageError(f"{p}: its external data cannot be read ({str(exc).splitlines()[0][:120]})") from None
    return model
