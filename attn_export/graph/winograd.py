"""3x3 convolutions as Winograd F(4x4, 3x3) in standard ONNX ops, for ONNX Runtime's CPU provider.

A 3x3 convolution (stride 1, padding 1) computes each 4x4 output tile from a 6x6 input tile with 36
multiply-adds per input/output channel pair instead of 144 (Lavin and Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016): ``Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A``. In ONNX ops:

1. input transform: one grouped Conv (a group per channel) with the 36 kernels ``Bᵀ[u] ⊗ Bᵀ[v]``
   (6x6, stride 4, padding 1) -> [N, C·36, H/4, W/4];
2. 36 products: MatMul of the transformed weights U [36, K, C] with V [N, 36, C, T] (T = tiles);
3. output transform: MatMul of ``Aᵀ ⊗ Aᵀ`` [16, 36] -> [N, 16·K, H/4, W/4], then DepthToSpace(4) and the bias.

The rewrite needs H and W divisible by 4 at the convolution for every input size the model accepts,
which it reads from the model's H/W multiple and each convolution's resolution level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from .index import Dim, GraphIndex, default_opset, drop_unused_initializers, node_attr
from .probe import probe_index, run_probe
from .rewrite import _Names, ensure_node_names

# F(4, 3): Bᵀ (6x6), G (6x3), Aᵀ (4x6), the matrices of Lavin and Gray's paper.
_BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=np.float64)
_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=np.float64)
_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
               dtype=np.float64)
TILE = 4          # output tile side
_A = 6            # input tile side
_XI = _A * _A     # points of the transformed tile

# With ``arrays``, constants over this many elements are handed over as arrays instead of written into the graph.
HANDED_OVER_ELEMENTS = 8192
HANDED_OVER = "<handed to the session as an array>"

# Largest transformed input (or products) of one image that a convolution takes the Winograd way. Measured on
# ddpm-cifar10 (2-core AMD EPYC): faster up to 38 MB (128 px input: level 0, 128 and 256 channels); with every
# convolution Winograd at 256 px (76-151 MB) no faster, and the peak memory growth nearly doubled (498 -> 948 MiB).
MAX_TRANSFORMED_BYTES = 64 * 2**20

# Below this many input channels the transforms cost more than the products save: one convolution at 64
# channels measured 1.13-1.31x the direct one, at 128 and 256 channels 0.52-0.98x (bench/winograd_layers.py).
MIN_CHANNELS = 128


@dataclass
class WinogradResult:
    """What :func:`winograd_convolutions` did: the convolutions rewritten, and those left with the reason."""

    rewritten: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def transformed_weights(w: np.ndarray) -> np.ndarray:
    """U = G g Gᵀ for every (output, input) channel pair of a [K, C, 3, 3] kernel, as [36, K, C]."""
    k, c = w.shape[:2]
    g = _G.astype(w.dtype)
    rows = np.tensordot(w, g, axes=([3], [1]))           # [K, C, 3, 6]
    u = np.tensordot(g, rows, axes=([1], [2]))           # [6, K, C, 6]
    return np.ascontiguousarray(u.transpose(0, 3, 1, 2)).reshape(_XI, k, c)


def _input_kernels(dtype: np.dtype) -> np.ndarray:
    return np.einsum("ur,vs->uvrs", _BT, _BT).reshape(_XI, 1, _A, _A).astype(dtype)


def _output_matrix(dtype: np.dtype) -> np.ndarray:
    # Row (r, c) of the 4x4 output tile; DepthToSpace (DCR) reads channel (r*4 + c)*K + k.
    return np.einsum("ru,cv->rcuv", _AT, _AT).reshape(TILE * TILE, _XI).astype(dtype)


def _plain_3x3(idx: GraphIndex, conv: onnx.NodeProto, min_channels: int) -> str | None:
    """Why ``conv`` is not a plain 3x3 stride-1 pad-1 FP32 convolution with constant weights (None if it is).

    An initializer's declared type and shape and the attributes are checked before its values are read: an
    external weight is read from disk only for a convolution it may serve.
    """
    if len(conv.input) < 2:
        return "weights are not a loaded constant"
    init = idx.inits.get(conv.input[1])
    if init is not None and (init.data_type != TensorProto.FLOAT or len(init.dims) != 4
                             or list(init.dims[2:]) != [3, 3]):
        return "not a float32 3x3 kernel"
    if node_attr(conv, "group", 1) != 1:
        return "grouped"
    if node_attr(conv, "strides", [1, 1]) != [1, 1] or node_attr(conv, "dilations", [1, 1]) != [1, 1]:
        return "strided or dilated"
    auto_pad = node_attr(conv, "auto_pad", b"NOTSET")
    if auto_pad not in (b"NOTSET", b"SAME_UPPER", b"SAME_LOWER"):
        return "padding is not 1"
    if auto_pad == b"NOTSET" and node_attr(conv, "pads", [0] * 4) != [1] * 4:
        return "padding is not 1"
    if init is not None and init.dims[1] < min_channels:
        return f"fewer than {min_channels} input channels"
    w = idx.const(conv.input[1])
    if w is None:
        return "weights are not a loaded constant"
    if w.dtype != np.float32 or w.ndim != 4 or w.shape[2:] != (3, 3):
        return "not a float32 3x3 kernel"
    if len(conv.input) > 2 and conv.input[2] and idx.const(conv.input[2]) is None:
        return "bias is not a loaded constant"
    if w.shape[1] < min_channels:
        return f"fewer than {min_channels} input channels"
    return None


def _downscale(small: list[Dim] | None, large: list[Dim] | None, p: int) -> int | None:
    """f where the tensor is [.., 2p/f, p/f] at input 2p x p and [.., 4p/f, 2p/f] at 4p x 2p (None otherwise)."""
    if small is None or large is None or len(small) != 4 or len(large) != 4:
        return None
    h, w, h2, w2 = small[2], small[3], large[2], large[3]
    if not (isinstance(h, int) and isinstance(w, int) and isinstance(h2, int) and isinstance(w2, int)):
        return None
    if h <= 0 or w <= 0 or p % w or h != 2 * w or (h2, w2) != (2 * h, 2 * w):
        return None
    return p // w


class _Emitter:
    """Nodes and initializers of one rewrite, under fresh names that start with the convolution's."""

    def __init__(self, model: onnx.ModelProto, prefix: str, names: _Names, shared: dict[str, str],
                 arrays: dict[str, np.ndarray] | None) -> None:
        self.model = model
        self.prefix = prefix
        self.names = names
        self.nodes: list[onnx.NodeProto] = []
        self.shared = shared
        self.arrays = arrays

    def const(self, what: str, array: np.ndarray, *, prefix: str | None = None) -> str:
        name = self.names.fresh(f"{prefix or self.prefix}/{what}")
        init = self.model.graph.initializer.add()  # built in place: the transformed weights are large
        init.name = name
        init.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        init.dims.extend(array.shape)
        if self.arrays is not None and array.size > HANDED_OVER_ELEMENTS:
            # Handed to the session apart from the graph; the stub names no file that could be read.
            init.data_location = onnx.TensorProto.EXTERNAL
            entry = init.external_data.add()
            entry.key, entry.value = "location", HANDED_OVER
            self.arrays[name] = np.ascontiguousarray(array)
        else:
            init.raw_data = np.ascontiguousarray(array).tobytes()
        return name

    def shared_const(self, key: str, make: Callable[[], np.ndarray]) -> str:
        """One initializer for every convolution that needs the same constant (the transforms)."""
        if key not in self.shared:
            self.shared[key] = self.const(key, make(), prefix="winograd")
        return self.shared[key]

    def node(self, op: str, inputs: list[str], what: str, *, output: str | None = None, **attrs: Any) -> str:
        """Append a node; its output is a fresh tensor unless ``output`` names one."""
        name = self.names.fresh(f"{self.prefix}/{what}")
        self.nodes.append(helper.make_node(op, inputs, [output or name], name=name, **attrs))
        return output or name


def _build(model: onnx.ModelProto, idx: GraphIndex, conv: onnx.NodeProto, names: _Names,
           shared: dict[str, str], arrays: dict[str, np.ndarray] | None, max_bytes: int | None) -> list[onnx.NodeProto]:
    """The nodes that replace ``conv`` (H and W at its input are multiples of 4).

    With ``max_bytes``, an If runs the Winograd nodes where the transformed input and products of one image
    take at most that many bytes, and the convolution as written above it.
    """
    w = idx.const(conv.input[1])
    assert w is not None
    k, c = int(w.shape[0]), int(w.shape[1])
    x, y = conv.input[0], conv.output[0]
    e = _Emitter(model, f"{conv.name}/winograd", names, shared, arrays)
    if max_bytes is None:
        _winograd_nodes(e, idx, conv, y)
        return e.nodes
    # Per image, the 36 transformed values of every 4x4 tile: 36/16 floats per pixel and channel.
    max_pixels = max_bytes * TILE * TILE // (_XI * max(c, k) * w.itemsize)
    pixels = e.node("ReduceProd", [e.node("Shape", [x], "hw", start=2, end=4)], "pixels", keepdims=0)
    fits = e.node("LessOrEqual", [pixels, e.const("max_pixels", np.array(max_pixels, np.int64))], "fits")
    outer = e.nodes
    e.nodes = []
    w_out = _winograd_nodes(e, idx, conv, None)
    then_graph = helper.make_graph(e.nodes, f"{conv.name}_winograd", [],
                                   [helper.make_empty_tensor_value_info(w_out)])
    direct_out = names.fresh(f"{conv.name}/direct")
    direct = onnx.NodeProto()
    direct.CopyFrom(conv)
    direct.name, direct.output[0] = direct_out, direct_out
    else_graph = helper.make_graph([direct], f"{conv.name}_direct", [], [helper.make_empty_tensor_value_info(direct_out)])
    choice = helper.make_node("If", [fits], [y], name=names.fresh(f"{conv.name}/winograd_if_small"),
                              then_branch=then_graph, else_branch=else_graph)
    return [*outer, choice]


def _winograd_nodes(e: _Emitter, idx: GraphIndex, conv: onnx.NodeProto, y: str | None) -> str:
    """Append the Winograd nodes of ``conv`` to ``e``; returns their output (``y``, or a fresh name for None)."""
    w = idx.const(conv.input[1])
    assert w is not None
    k, c = int(w.shape[0]), int(w.shape[1])
    x = conv.input[0]
    i64 = np.int64
    # Input transform: a grouped Conv, the 36 kernels for every channel -> [N, C*36, H/4, W/4], channel-major.
    v = e.node("Conv", [x, e.shared_const(f"input_kernels_{c}", lambda: np.tile(_input_kernels(w.dtype), (c, 1, 1, 1)))],
               "transformed_input", kernel_shape=[_A, _A], strides=[TILE, TILE], pads=[1, 1, 1, 1], group=c)
    # -> [N, C, 36, T] -> [N, 36, C, T]: the 36 products batch over the transformed point.
    v4 = e.node("Reshape", [v, e.const("tiles_shape", np.array([0, c, _XI, -1], i64))], "tiles")
    vt = e.node("Transpose", [v4], "tiles_by_point", perm=[0, 2, 1, 3])
    m = e.node("MatMul", [e.const("transformed_weights", transformed_weights(w)), vt], "products")  # [N, 36, K, T]
    m3 = e.node("Reshape", [m, e.const("points_rows", np.array([0, _XI, -1], i64))], "products_by_point")
    o = e.node("MatMul", [e.shared_const("output_transform", lambda: _output_matrix(w.dtype)), m3], "output_tiles")  # [N, 16, K*T]
    tiles_hw = e.node("Shape", [v], "tile_grid", start=2, end=4)
    o_shape = e.node("Concat", [e.const("tile_channels", np.array([0, TILE * TILE * k], i64)), tiles_hw],
                     "output_tiles_shape", axis=0)
    o4 = e.node("Reshape", [o, o_shape], "output_tiles_4d")
    bias = idx.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    result = e.node("DepthToSpace", [o4], "output", output=None if bias is not None else y, blocksize=TILE, mode="DCR")
    if bias is not None:
        result = e.node("Add", [result, e.const("bias", bias.reshape(1, k, 1, 1))], "bias", output=y)
    return result


def _shapes_at(model: onnx.ModelProto, names: list[str], p: int, weights_folder: Path | None) -> dict[str, list[Dim]]:
    """Shapes of ``names`` at batch 1, height 2p, width p: from shape inference, else from one run."""
    probe = probe_index(model, p=p)
    shapes: dict[str, list[Dim]] = {n: probe.shapes.get(n) or [] for n in names} if probe else {n: [] for n in names}
    unknown = [n for n, s in shapes.items() if not s or not all(isinstance(d, int) for d in s)]
    if unknown:
        ran = run_probe(model, unknown, height=2 * p, width=p, weights_folder=weights_folder) or {}
        shapes.update({n: list(value.shape) for n, value in ran.items()})
    return shapes


def _tile_reasons(model: onnx.ModelProto, convs: list[onnx.NodeProto], hw_multiple: int,
                  weights_folder: Path | None) -> dict[str, str | None]:
    """For each convolution, why its H and W are not multiples of 4 for every accepted input (None: they are).

    Its input is probed at two input sizes: it must scale with the image, at some 1/f, and every accepted
    size (a multiple of ``hw_multiple``) divided by f must be a multiple of 4.
    """
    if hw_multiple % TILE:
        return {c.name: f"the model's H/W multiple ({hw_multiple}) is not a multiple of {TILE}" for c in convs}
    names = list(dict.fromkeys(c.input[0] for c in convs))
    # The smallest accepted input keeps the probes cheap; every level is a whole number of pixels there.
    small = _shapes_at(model, names, hw_multiple, weights_folder)
    large = _shapes_at(model, names, 2 * hw_multiple, weights_folder)
    reasons: dict[str, str | None] = {}
    for conv in convs:
        f = _downscale(small.get(conv.input[0]), large.get(conv.input[0]), hw_multiple)
        if f is None:
            reasons[conv.name] = "its input does not scale with the image's height and width"
        elif hw_multiple % (TILE * f):
            reasons[conv.name] = f"H/{f} and W/{f} are not always multiples of {TILE} (H/W multiple {hw_multiple})"
        else:
            reasons[conv.name] = None
    return reasons


def added_bytes(w: np.ndarray) -> int:
    """Initializer bytes the rewrite of a convolution with weights ``w`` adds (transformed weights are 4x)."""
    k, c = w.shape[:2]
    return (_XI - 9) * k * c * w.itemsize


def winograd_convolutions(model: onnx.ModelProto, hw_multiple: int, *, weights_folder: Path | None = None,
                          min_channels: int = MIN_CHANNELS, max_added_bytes: int | None = None,
                          arrays: dict[str, np.ndarray] | None = None,
                          max_transformed_bytes: int | None = MAX_TRANSFORMED_BYTES) -> WinogradResult:
    """Rewrite (in place) every eligible 3x3 convolution of ``model`` into Winograd F(4x4, 3x3).

    Eligible: stride 1, padding 1, no groups or dilation, float32 constant weights with at least
    ``min_channels`` input channels, and H and W multiples of 4 at the convolution for every input size
    the model accepts (``hw_multiple``: every accepted height and width is a multiple of it). Exact up
    to float rounding: the transforms' constants are not powers of two, about 1e-5 relative in float32.
    ``weights_folder``: where the data files are, for a model loaded without them (the weights of the 3x3
    convolutions that qualify by their declared shape are read from there). ``max_added_bytes``:
    convolutions whose transformed weights would take the model past this many more bytes are left.
    ``arrays``: where given, the large new constants (the transformed weights) go into it, name -> array,
    and the graph holds external-data stubs for them, for ONNX Runtime's ``add_external_initializers``:
    the session gets them without a protobuf copy. ``max_transformed_bytes``: each rewritten convolution
    chooses at run time, by an If on its input's height and width, between its Winograd form (where the
    transformed input and products of one image fit in this many bytes) and itself as written (above);
    None: always Winograd.
    """
    result = WinogradResult()
    if default_opset(model) < 15:  # Shape's start/end attributes
        result.skipped["*"] = "opset below 15"
        return result
    ensure_node_names(model)
    idx = GraphIndex(model.graph, weights_folder=weights_folder)
    plain: list[onnx.NodeProto] = []
    for conv in model.graph.node:
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            continue
        reason = _plain_3x3(idx, conv, min_channels)
        if reason:
            result.skipped[conv.name] = reason
        else:
            plain.append(conv)
    tiles = _tile_reasons(model, plain, hw_multiple, weights_folder) if plain else {}
    replaced: dict[str, list[onnx.NodeProto]] = {}
    shared: dict[str, str] = {}
    names = _Names.of(model)
    budget = max_added_bytes
    for conv in plain:
        reason = tiles[conv.name]
        w = idx.const(conv.input[1])
        assert w is not None
        if reason is None and budget is not None:
            cost = added_bytes(w) + (0 if f"input_kernels_{w.shape[1]}" in shared else _XI * _XI * w.shape[1] * 4)
            if cost > budget:
                reason = "its transformed weights would take the model past the size allowed"
            else:
                budget -= cost
        if reason:
            result.skipped[conv.name] = reason
            continue
        replaced[conv.name] = _build(model, idx, conv, names, shared, arrays, max_transformed_bytes)
        result.rewritten.append(conv.name)
    if replaced:
        nodes: list[onnx.NodeProto] = []
        for n in model.graph.node:
            nodes.extend(replaced.get(n.name, [n]) if n.op_type == "Conv" else [n])
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        drop_unused_initializers(model)
    return result


__all__ = ["HANDED_OVER", "MAX_TRANSFORMED_BYTES", "MIN_CHANNELS", "TILE", "WinogradResult", "added_bytes",
           "transformed_weights", "winograd_convolutions"]
