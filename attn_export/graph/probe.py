"""Concrete-shape probe: shapes of every tensor with the dynamic input dims pinned to numbers.

Symbolic shape inference loses the attention sequence length (it becomes an
anonymous dim); pinning H = 2P and W = P turns it into a number, and
S = H*W / 4**level then gives the resolution level and an expression in
height and width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from .index import TypedIndex, weightless_copy

DEFAULT_P = 64


def pinned_shape(vi: onnx.ValueInfoProto, *, height: int, width: int, sizes: dict[str, int] | None = None) -> list[int]:
    """A graph input's dims with the dynamic ones pinned: by name (``batch`` 1, ``height``, ``width``, or
    ``sizes``), else by position for a 4-D input read as (batch, channels, height, width), else 1."""
    named = {"batch": 1, "height": height, "width": width, **(sizes or {})}
    dims = vi.type.tensor_type.shape.dim
    out = []
    for k, d in enumerate(dims):
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.dim_param in named:
            out.append(named[d.dim_param])
        else:
            out.append((1, 1, height, width)[k] if len(dims) == 4 else 1)
    return out


def probe_index(model: onnx.ModelProto, *, p: int = DEFAULT_P, sizes: dict[str, int] | None = None) -> TypedIndex | None:
    """A :class:`TypedIndex` of ``model`` with batch 1, height 2p, width p (None when inference fails).

    ``sizes`` pins dims by name (e.g. {"batch": 2}); other dynamic dims of a
    4-D input are read as (batch, channels, height, width), and of any other
    input as 1.
    """
    light = weightless_copy(model)
    inits = {i.name for i in light.graph.initializer}
    for vi in light.graph.input:
        if vi.name in inits:
            continue
        shape = pinned_shape(vi, height=2 * p, width=p, sizes=sizes)
        for d, value in zip(vi.type.tensor_type.shape.dim, shape):
            d.Clear()
            d.dim_value = value
    del light.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort: figures that need it are reported as unknown
        return None
    return TypedIndex(inferred, infer=False)


def level_of(seq: int | None, p: int = DEFAULT_P) -> int | None:
    """The resolution level whose H*W/4**level equals ``seq`` at the probe size (None if none does)."""
    if not isinstance(seq, int) or seq <= 0:
        return None
    full = 2 * p * p
    if full % seq:
        return None
    factor = full // seq
    level = (factor.bit_length() - 1) // 2
    return level if 4 ** level == factor else None


def level_at(seq: int | None, height: int, width: int) -> int | None:
    """The resolution level whose ceil(H/2**level)*ceil(W/2**level) equals ``seq`` at an image of ``height`` x
    ``width`` (None if none does, or if two levels give the same length there and the size cannot tell them apart)."""
    if not isinstance(seq, int) or seq <= 0:
        return None
    lengths = [-(-height // (1 << level)) * -(-width // (1 << level)) for level in range(16)]
    if seq not in lengths:
        return None
    level = lengths.index(seq)
    return level if lengths.count(seq) == 1 else None


def seq_expression(level: int) -> str:
    """The sequence length at ``level`` as an expression in the image's height and width."""
    return "height*width" if level == 0 else f"(height/{2 ** level})*(width/{2 ** level})"


def eval_dim_expression(expr: str, sizes: dict[str, int]) -> int | None:
    """The value of a symbolic dim such as ``((width - 1)//2 + 1)*height`` (dynamo's names), or None.

    Only integers, the names in ``sizes`` and + - * // are allowed: the text
    comes from a file and is never handed to ``eval``.
    """
    import ast

    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError):
        return None

    def walk(node: ast.AST) -> int | None:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return sizes.get(node.id)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv)):
            a, b = walk(node.left), walk(node.right)
            if a is None or b is None or (isinstance(node.op, ast.FloorDiv) and b == 0):
                return None
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}.get(type(node.op), a // b if b else 0)
        return None

    return walk(tree)


# ONNX Runtime's session option for a model loaded from memory whose initializers are in data files: the folder
# they are read from (onnxruntime_session_options_config_keys.h in the onnxruntime repository).
EXTERNAL_DATA_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def read_external_data_from(opts: Any, folder: Path) -> None:
    """Let a session built from model bytes (``opts``: onnxruntime.SessionOptions) read its data files from ``folder``."""
    opts.add_session_config_entry(EXTERNAL_DATA_FOLDER_KEY, str(Path(folder).resolve()))


def run_probe(model: onnx.ModelProto, names: list[str], *, height: int, width: int,
              weights_folder: Path | None = None) -> dict[str, Any] | None:
    """Run ``model`` once in ONNX Runtime (CPU) at batch 1 and height x width, returning the named tensors.

    Inputs get deterministic data of their dtype (the image a normal sample,
    other floats 0.5, integers 1); only used to learn shapes and run-time
    scalars that shape inference cannot. None when the model cannot run here
    (weights not loaded, an op ORT lacks, ...). ``weights_folder``: where
    the data files of external initializers are, when they are not loaded.
    """
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    external = any(i.data_location == TensorProto.EXTERNAL and not i.raw_data for i in model.graph.initializer)
    if external and weights_folder is None:
        return None
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(names):
        if name not in known:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    inits = {i.name for i in model.graph.initializer}
    feeds: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = pinned_shape(vi, height=height, width=width)
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            value = rng.standard_normal(shape) if len(shape) == 4 else np.full(shape, 0.5)
        elif dtype == np.bool_:
            value = np.ones(shape, dtype=bool)
        else:
            value = np.ones(shape)
        feeds[vi.name] = value.astype(dtype)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if external:
            assert weights_folder is not None
            read_external_data_from(opts, weights_folder)
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        wanted = list(dict.fromkeys(names))
        return dict(zip(wanted, sess.run(wanted, feeds)))
    except Exception:  # noqa: BLE001 - a probe that cannot run leaves the figures unknown
        return None
