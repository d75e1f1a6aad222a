"""Producer/consumer index over an ONNX graph, with constants, dtypes and inferred shapes."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Dim = int | str | None

_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def node_attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """The value of a node attribute, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def dtype_name(elem_type: int | None) -> str | None:
    """numpy-style name of an ONNX element type ("float32", "float16", "bfloat16"), None when unknown."""
    if not elem_type:
        return None
    try:
        return str(helper.tensor_dtype_to_np_dtype(elem_type).name)
    except Exception:  # noqa: BLE001 - bfloat16 and friends have no exact numpy type
        return TensorProto.DataType.Name(elem_type).lower()


def swap_last_two(rank: int) -> list[int]:
    """The permutation that transposes the last two axes of a rank-``rank`` tensor."""
    return list(range(rank - 2)) + [rank - 1, rank - 2]


def read_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of ``graph`` reads, in its subgraphs (If, Loop, Scan bodies) too: a subgraph may
    read the outer graph's tensors by name."""
    names: set[str] = set()
    for n in graph.node:
        names.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names |= read_names(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    names |= read_names(sub)
    return names


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers no node (of the graph or a subgraph) and no graph output reads."""
    g = model.graph
    used = read_names(g) | {o.name for o in g.output}
    keep = [init for init in g.initializer if init.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)


def external_info(init: TensorProto) -> tuple[str, int, int]:
    """(location, offset, length) of an external initializer."""
    info = {e.key: e.value for e in init.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"])


def leaves_folder(location: str) -> bool:
    """True for an external-data location that would name a file outside the model's folder: empty, absolute
    (POSIX or Windows, a drive), with ``..`` or a NUL. A location is data from the file, never a path to follow."""
    parts = PurePosixPath(location.replace("\\", "/")).parts
    return (not location or PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute()
            or ":" in location or ".." in parts or "\x00" in location)


def read_external(init: TensorProto, folder: Path) -> np.ndarray:
    """The values of an external initializer, from its data file in ``folder`` (ValueError for a location
    outside it)."""
    loc, offset, length = external_info(init)
    if leaves_folder(loc):
        raise ValueError(f"initializer {init.name[:60]} names external data {loc[:80]!r}, outside the model's folder")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).newbyteorder("<")
    with open(folder / loc, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OSError(f"external data file {loc} is shorter than its references")
    return np.frombuffer(data, dtype=dtype).reshape(tuple(init.dims)).astype(dtype.newbyteorder("="))


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


class GraphIndex:
    """Producer/consumer index over a GraphProto, with constant lookup.

    ``weights_folder``: where the data files of a graph loaded without its external data are; where given,
    :meth:`const` reads an external initializer from there (once: it is kept for the next lookup).
    """

    def __init__(self, graph: onnx.GraphProto, weights_folder: Path | None = None) -> None:
        self.graph = graph
        self.weights_folder = weights_folder
        self._read: dict[str, np.ndarray] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
        self.inits = {i.name: i for i in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.inputs = {i.name for i in graph.input if i.name not in self.inits}

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output (None for anything computed, or data not loaded)."""
        if name in self.inits:
            init = self.inits[name]
            if init.data_location == TensorProto.EXTERNAL:
                if self.weights_folder is None:
                    return None
                if name not in self._read:
                    self._read[name] = read_external(init, self.weights_folder)
                return self._read[name]
            return numpy_helper.to_array(init)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_float", "value_int"):
                    return np.array(helper.get_attribute_value(a))
                if a.name in ("value_floats", "value_ints"):
                    return np.array(list(helper.get_attribute_value(a)))
        return None

    def is_const(self, name: str) -> bool:
        """True for initializers and Constant outputs, loaded or not."""
        node = self.producer.get(name)
        return name in self.inits or (node is not None and node.op_type == "Constant")

    def scalar(self, name: str) -> float | None:
        value = self.const(name)
        if value is not None and value.size == 1:
            return float(value.reshape(()))
        return None

    def users(self, tensor: str) -> list[onnx.NodeProto]:
        return self.consumers.get(tensor, [])

    def behind(self, tensor: str, *, through_shape: bool = True, limit: int = 20000) -> set[str]:
        """``tensor`` and every tensor it is computed from, back to the graph's inputs and weights.

        ``through_shape=False`` stops at Shape and Size, which read only their
        input's dims: a reshape of K sized from the image is still K.
        """
        seen: set[str] = set()
        todo = [tensor]
        while todo and len(seen) < limit:
            t = todo.pop()
            if not t or t in seen:
                continue
            seen.add(t)
            node = self.producer.get(t)
            if node is not None and (through_shape or node.op_type not in ("Shape", "Size")):
                todo.extend(node.input)
        return seen

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and tensor not in self.outputs:
            return users[0]
        return None


def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the bytes of large float initializers (dims kept): enough for shape inference."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.metadata_props.extend(model.metadata_props)
    g = light.graph
    src = model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    for init in src.initializer:
        small = len(init.raw_data) <= 64 and len(init.float_data) <= 16 and init.data_location != TensorProto.EXTERNAL
        if small or init.data_type not in _FLOAT_TYPES:
            g.initializer.append(init)
            continue
        stub = g.initializer.add()
        stub.name = init.name
        stub.data_type = init.data_type
        stub.dims.extend(init.dims)
        stub.data_location = TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", "weights-not-loaded"
    light.functions.extend(model.functions)
    return light


class TypedIndex(GraphIndex):
    """A :class:`GraphIndex` with element types and shapes from ONNX shape inference (best effort).

    Shape inference runs on a weightless copy, so large models cost little;
    ``shapes`` holds ints for static dims, dim_param names for symbolic ones
    and None where inference could not tell.
    """

    def __init__(self, model: onnx.ModelProto, *, infer: bool = True) -> None:
        super().__init__(model.graph)
        self.model = model
        self.opset = default_opset(model)
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list[Dim]] = {}
        typed = model
        if infer:
            try:
                typed = onnx.shape_inference.infer_shapes(weightless_copy(model), data_prop=True)
            except Exception:  # noqa: BLE001 - inference is best effort; types stay partly unknown
                typed = model
        g = typed.graph
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
                ]
        for name, init in self.inits.items():
            self.types[name] = init.data_type
            self.shapes[name] = list(init.dims)
        for node in model.graph.node:
            if node.op_type == "Constant" and node.output:
                value = self.const(node.output[0])
                if value is not None:
                    self.shapes[node.output[0]] = list(value.shape)

    def dtype(self, name: str) -> str | None:
        return dtype_name(self.types.get(name))

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return len(shape) if shape is not None else None

    def dim(self, name: str, axis: int) -> Dim:
        shape = self.shapes.get(name)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        return shape[axis]
