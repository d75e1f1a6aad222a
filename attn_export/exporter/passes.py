"""Graph passes over exported ONNX models.

* :func:`optimize` folds constants and removes dead nodes (onnxscript's optimizer).
* :func:`name_dynamic_dims` makes sure every graph input/output dim that is
  dynamic carries its intended name.
* :func:`name_nodes_by_module` names the dynamo exporter's nodes by module path,
  as the TorchScript exporter does (attention sites are named after them).

Attention is found and rewritten by :mod:`attn_export.graph`, the one
attention analysis every command shares.
"""

from __future__ import annotations

import ast
from typing import Iterable

import numpy as np
import onnx

from ..graph.index import drop_unused_initializers


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants, remove Identity/dead nodes and unused initializers."""
    import onnxscript.optimizer

    out = onnxscript.optimizer.optimize(model)
    drop_unused_initializers(out)
    return out


NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def name_nodes_by_module(model: onnx.ModelProto) -> int:
    """Rename nodes the dynamo exporter names by op (``node_softmax_1``) after the module path it records,
    ``/down.1/attn/softmax``, as the TorchScript exporter names them; returns the nodes renamed."""
    used = {n.name for n in model.graph.node}
    renamed = 0
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES_KEY), None)
        if scopes is None:
            continue
        try:
            parts = ast.literal_eval(scopes)  # a list of strings the exporter wrote; literal_eval evaluates nothing
        except (ValueError, SyntaxError):
            continue
        if not isinstance(parts, list) or len(parts) < 3 or not all(isinstance(x, str) for x in parts):
            continue  # a node of the top module keeps its own name
        # Module scopes are cumulative dotted paths ("inner", "inner.downs.1"); each level adds one component
        # ("downs.1", a ModuleList item, keeps its dot as in the tracer's names). The last entry is the op.
        components = []
        for prev, cur in zip(parts[:-2], parts[1:-1]):
            components.append(cur[len(prev) + 1:] if prev and cur.startswith(prev + ".") else cur)
        base = "/" + "/".join(c for c in components + [parts[-1]] if c)
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.discard(node.name)
        used.add(name)
        node.name = name
        renamed += 1
    return renamed


def keep_declared_inputs(model: onnx.ModelProto, declared: list[tuple[str, str, list[int | str]]]) -> list[str]:
    """Give back to the graph every declared input the exporter dropped because the forward never reads it.

    An exporter prunes an unused input (a denoiser that ignores ``t``); the
    file would then refuse the feed its description promises. The input is
    put back, unread, in its declared place; returns the names restored.
    """
    present = {vi.name for vi in model.graph.input}
    missing = [(n, dt, dims) for n, dt, dims in declared if n not in present]
    if not missing:
        return []
    inputs = list(model.graph.input)
    by_name = {vi.name: vi for vi in inputs}
    ordered = []
    for name, dtype, dims in declared:
        if name in by_name:
            ordered.append(by_name.pop(name))
        else:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            ordered.append(onnx.helper.make_tensor_value_info(name, elem, list(dims)))
    ordered += list(by_name.values())  # anything else the graph lists stays after them
    del model.graph.input[:]
    model.graph.input.extend(ordered)
    return [n for n, _, _ in missing]


def name_dynamic_dims(model: onnx.ModelProto, names: dict[str, Iterable[int | str]]) -> None:
    """Set each listed graph input/output's dims: strings become dim_param, ints dim_value."""
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name not in names:
            continue
        dims = list(names[vi.name])
        shape = vi.type.tensor_type.shape
        if len(shape.dim) != len(dims):
            raise ValueError(f"{vi.name}: expected rank {len(dims)}, graph says {len(shape.dim)}")
        for d, want in zip(shape.dim, dims):
            if isinstance(want, str):
                d.dim_param = want
            else:
                d.dim_value = int(want)


def dims_of(vi: onnx.ValueInfoProto) -> list[int | str]:
    """Dims of a graph input/output: ints, symbolic names, or '?' where unknown."""
    out: list[int | str] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append("?")
    return out


def foldable_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes whose inputs are all constants: clutter a clean export should not carry."""
    consts = {i.name for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "Constant" or (n.input and all((not i) or i in consts for i in n.input)):
            out.append(n.name or n.op_type)
    return out
