"""FP32 islands under OpenVINO's low precisions: the sinusoidal embedding of a scalar input held in f32.

OpenVINO's CPU plugin runs a whole model at its INFERENCE_PRECISION_HINT; the
types the file states do not survive it. At bf16 (8 significant bits) a
timestep of 999 reaches sin/cos as 1000 and timestep x frequency keeps about
three significant digits, so the embedding of every t >= 256 is wrong: on
the presets this fails single-call verify at 2 of 5 shapes and makes 10-step
trajectories diverge (PSNR 14-16 dB, docs/benchmarks.md).

The plugin keeps a node in the original precision when the node carries the
``DisablePrecisionConversion`` run-time attribute. Two things make that hold, both measured on tiny at
t = 999 (mean error 1.3e-2 unmarked, 2.9e-3 marked, the same as at t < 256):

* every node of the island is marked (with the value OpenVINO's own FP16
  compression writes), the Convert from an integer timestep included; and
* the ops the plugin lowers to nodes of its own become ops it keeps, since
  the lowered node drops the attribute and runs at bf16, rounding t on its
  way to the Mul: Unsqueeze and Squeeze become Reshape, and a Broadcast of a
  single value (an ONNX Expand of t to the batch) becomes a Tile.

After compiling, the runner reads each island node's precision back from the
compiled model (``held_at_low_precision``): a node the plugin still runs at
bf16 is reported, never assumed held.

The attribute has no Python constructor in OpenVINO 2025-2026, so the marked
model goes through OpenVINO's own IR: it is saved to a private temporary
folder, the attribute is added to the island's layers in the XML that
OpenVINO just wrote, and the IR is read back. Nothing from the input file is
parsed as XML: the XML is OpenVINO's serialization of the model in memory.

What an island is: the nodes that depend on one model input alone (shape
queries of other inputs do not count: a timestep expanded to the batch stays
the timestep), from that input up to, not including, the first MatMul or
Convolution, when they include Sin or Cos. That is the sinusoidal or Fourier
embedding of a timestep or noise level; the linear layers after it run at the
asked precision, as intended.
"""

from __future__ import annotations

import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

# Where an island stops: its consumers run at the asked precision.
_STOP = frozenset({"MatMul", "Convolution", "GroupConvolution", "Result"})
_TRIG = frozenset({"Sin", "Cos"})
_SHAPE_ONLY = frozenset({"ShapeOf"})
_RESHAPED = frozenset({"Unsqueeze", "Squeeze"})
PREFIX = "attn_export_f32_island/"
ATTRIBUTE = "DisablePrecisionConversion"


@dataclass
class HeldIslands:
    """The islands kept in f32: per model input, the names of its marked nodes; and what could not be held."""

    nodes: dict[str, list[str]] = field(default_factory=dict)
    not_held: list[str] = field(default_factory=list)  # why, one line each
    checked: bool = False  # the compiled model's precisions have been read back

    @property
    def count(self) -> int:
        """Number of marked nodes over all islands."""
        return sum(len(v) for v in self.nodes.values())

    def describe(self) -> str:
        """'f32 islands: t embedding (6 nodes)', with the count of nodes not held; '' when there is no island."""
        if not self.nodes:
            return ""
        text = "f32 islands: " + ", ".join(f"{name} embedding ({len(v)} nodes)" for name, v in self.nodes.items())
        return text + (f", {len(self.not_held)} of their nodes NOT held" if self.not_held else "")


def _consumers(node: Any) -> list[Any]:
    return [ti.get_node() for out in node.outputs() for ti in out.get_target_inputs()]


def _reach(start: Any, cut: frozenset[str]) -> dict[int, Any]:
    """Nodes reachable downstream of ``start`` (itself excluded), not passing through ``cut`` op types, by their
    instance ids (stable for a graph node, unlike the identity of its Python wrappers)."""
    seen: dict[int, Any] = {}
    stack = [start]
    while stack:
        node = stack.pop()
        for d in _consumers(node):
            key = d.get_instance_id()
            if key in seen or d.get_type_name() in cut:
                continue
            seen[key] = d
            stack.append(d)
    return seen


def find_islands(model: Any) -> dict[str, list[Any]]:
    """Per model input name, the nodes of its sinusoidal embedding (see the module docstring); inputs with none left out."""
    params = list(model.get_parameters())
    data_of = [_reach(p, _SHAPE_ONLY | {"Result"}) for p in params]
    islands: dict[str, list[Any]] = {}
    for i, p in enumerate(params):
        others: set[int] = set().union(*(reach.keys() for j, reach in enumerate(data_of) if j != i))
        own = _reach(p, _STOP)
        nodes = [n for k, n in own.items() if k not in others and n.get_type_name() != "Constant"]
        if any(n.get_type_name() in _TRIG for n in nodes):
            islands[p.output(0).get_any_name()] = nodes
    return islands


def _as_reshape(ov: ModuleType, node: Any) -> Any | None:
    """A Reshape equal to this Unsqueeze/Squeeze, replacing it in the graph; None when its shape has two unknown dims."""
    shape = node.get_output_partial_shape(0)
    if shape.rank.is_dynamic:
        return None
    dims = [d.get_length() if d.is_static else -1 for d in shape]
    if dims.count(-1) > 1:
        return None
    import numpy as np

    opset = ov.opset13
    reshape = opset.reshape(node.input_value(0), opset.constant(np.array(dims, dtype=np.int64)), special_zero=False)
    for ti in list(node.output(0).get_target_inputs()):
        ti.replace_source_output(reshape.output(0))
    reshape.set_friendly_name(node.get_friendly_name())
    return reshape


def _as_tile(ov: ModuleType, node: Any) -> Any | None:
    """A Tile equal to this Broadcast of a tensor whose every dim is 1 (a timestep expanded to the batch), replacing
    it; None for any other Broadcast."""
    shape = node.get_input_partial_shape(0)
    target = node.get_input_partial_shape(1)
    if shape.is_dynamic or any(d != 1 for d in shape.to_shape()) or target.is_dynamic \
            or target.to_shape()[0] != len(shape.to_shape()):
        return None
    tile = ov.opset13.tile(node.input_value(0), node.input_value(1))
    for ti in list(node.output(0).get_target_inputs()):
        ti.replace_source_output(tile.output(0))
    tile.set_friendly_name(node.get_friendly_name())
    return tile


def _replace_lowered(ov: ModuleType, node: Any) -> Any | None:
    """The node, or its stand-in the plugin keeps (see the module docstring); None when there is none."""
    kind = node.get_type_name()
    if kind in _RESHAPED:
        return _as_reshape(ov, node)
    if kind == "Broadcast":
        return _as_tile(ov, node)
    return node


def held_at_low_precision(compiled: Any) -> list[str]:
    """Island nodes that the compiled model still runs below f32 (its runtime model's layer precisions)."""
    low = []
    for node in compiled.get_runtime_model().get_ordered_ops():
        rt = node.get_rt_info()
        name = node.get_friendly_name()
        if not name.startswith(PREFIX) or "layerType" not in rt or rt["layerType"].astype(str) == "Reorder":
            continue
        if rt["runtimePrecision"].astype(str) not in ("f32", "i64", "i32", "undefined"):
            low.append(name[len(PREFIX):].split("/", 1)[-1])
    return low


def write_held_ir(ov: ModuleType, model: Any, xml: Path, islands: dict[str, list[Any]] | None = None) -> HeldIslands:
    """``model`` saved as OpenVINO IR at ``xml`` (+ .bin, FP32 weights), its embedding islands marked to run in f32.

    The IR carries the marks, so any OpenVINO that reads it (Triton's OpenVINO backend included) keeps them.
    """
    islands = find_islands(model) if islands is None else islands
    held = HeldIslands()
    names: set[str] = set()
    for input_name, nodes in islands.items():
        marked: list[str] = []
        for node in nodes:
            replaced = _replace_lowered(ov, node)
            if replaced is None:
                held.not_held.append(f"{node.get_friendly_name()} ({node.get_type_name()}): no stand-in the plugin keeps")
                continue
            node = replaced
            marked.append(node.get_friendly_name())
            # A name of our own, so the IR's layer names find exactly these nodes whatever the file named them.
            node.set_friendly_name(f"{PREFIX}{len(names)}/{node.get_friendly_name()}")
            names.add(node.get_friendly_name())
        held.nodes[input_name] = marked
    if names:
        model.validate_nodes_and_infer_types()
    ov.save_model(model, str(xml), compress_to_fp16=False)
    if not names:
        return held
    tree = ET.parse(xml)
    found = 0
    for layer in tree.getroot().iter("layer"):
        if layer.get("name") in names:
            rt = layer.find("rt_info")
            if rt is None:
                rt = ET.Element("rt_info")
                layer.insert(0, rt)
            # The value OpenVINO's own FP16 compression writes (save_model(compress_to_fp16=True)); an empty value
            # is read back but not honoured.
            ET.SubElement(rt, "attribute", name=ATTRIBUTE, version="0", value="dynamic:f16")
            found += 1
    if found != len(names):
        raise RuntimeError(f"OpenVINO's IR holds {found} of the {len(names)} island layers marked")
    tree.write(xml)
    return held


def hold_islands(ov: ModuleType, core: Any, model: Any, folder: Path) -> tuple[Any, HeldIslands]:
    """``model`` with its embedding islands marked to run in f32, read back from an IR written in ``folder``.

    Returns the model unchanged (and nothing held) when it has no island. ``folder`` must outlive the returned
    model: OpenVINO maps the IR's weights from it.
    """
    islands = find_islands(model)
    if not islands:
        return model, HeldIslands()
    xml = folder / "model.xml"
    held = write_held_ir(ov, model, xml, islands)
    return core.read_model(str(xml)), held


def private_folder() -> tempfile.TemporaryDirectory[str]:
    """A temporary folder only this user can read, for the marked IR."""
    return tempfile.TemporaryDirectory(prefix="attn-export-ov-")
