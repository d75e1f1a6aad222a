"""Attention in query chunks, in standard ONNX ops: the CPU provider's attention where its own kernel's blocks are thin.

softmax(scale·Q·Kᵀ)·V computed ``rows`` query rows at a time inside a
``Loop``: each iteration is Slice(q) -> MatMul(., Kᵀ) -> Softmax -> MatMul(., V)
on one chunk, so the scores held at once are ``rows`` x S, never S x S.
``rows`` is chosen at run time from the sequence length, so that one
chunk's scores stay within ``budget`` elements whatever the input size.
Each product is one large GEMM, which ONNX Runtime's CPU provider runs
faster than the small blocks its MultiHeadAttention kernel uses at large
head sizes (measured in bench/chunked_attention.py; see docs/benchmarks.md).

Q is padded with zero rows to a whole number of chunks (every iteration
then yields the same shape, which ``Loop`` stacks); the padding rows are
sliced off the result. Exact up to float rounding: no row sees another's
keys differently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from .attention import AttentionSite, find_attention
from .index import TypedIndex, default_opset
from .rewrite import (RewriteResult, _Builder, _finish, _Names, _rewrite, ensure_node_names, scaled_operands,
                      softmax_product)

# Score elements of one chunk: 32 MiB in float32, a few cache-sized GEMM panels per thread.
SCORE_BUDGET = 8 * 2**20
# Fewer query rows than this make the products too thin to run at GEMM speed.
MIN_ROWS = 16
FORM = "chunked"
# Pad with a tensor of pads (opset 11), Softmax over one axis (13), ReduceProd/Squeeze semantics used here (13).
MIN_OPSET = 13


def _chunked_problem(site: AttentionSite) -> str | None:
    if site.problem:
        return site.problem
    if site.q is None:
        return "the site is not fully described"
    if site.mask is not None:
        return "a masked site keeps its written form in the serving form"
    if site.dtype not in ("float32", None) or site.q.compute_dtype not in ("float32", None):
        # Other element types keep the site as written, like the MultiHeadAttention form (float32 only).
        return f"the serving form's attention is float32 only (the site computes in {site.dtype})"
    if site.rank not in (3, 4):
        return "the rank of the attention is unknown"
    if site.scale is None or site.k is None or site.v is None:
        return "the site is not fully described"
    return None


def _i64(b: _Builder, values: list[int], what: str) -> str:
    return b.const(np.array(values, dtype=np.int64), what)


def build_chunked(model: onnx.ModelProto, site: AttentionSite, names: _Names, budget: int) -> list[onnx.NodeProto]:
    """The nodes that compute ``site`` in query chunks of at most ``budget`` score elements each."""
    assert site.q and site.k and site.v and site.rank and site.scale is not None
    b = _Builder(model, site, names)
    # One marker in every name, so that a profile can tell these nodes apart (ONNX Runtime keeps node names).
    b.prefix = f"{b.prefix}/{FORM}"
    r = site.rank
    qs, kt, v, t_elem = scaled_operands(b)

    # Rows per chunk: budget // (batch x heads x S), at least MIN_ROWS, at most S; then the chunk count and padding.
    shape = b.node("Shape", [qs], "q_shape")
    seq = b.node("Slice", [shape, _i64(b, [-2], "at_seq"), _i64(b, [-1], "at_dim")], "seq")
    lead = b.node("Slice", [shape, _i64(b, [0], "at_first"), _i64(b, [-1], "at_dim2")], "lead_dims")
    per_row = b.node("ReduceProd", [lead], "scores_per_row", keepdims=1)
    rows = b.node("Div", [_i64(b, [budget], "budget"), per_row], "rows_in_budget")
    rows = b.node("Min", [b.node("Max", [rows, _i64(b, [MIN_ROWS], "min_rows")], "rows_floor"), seq], "rows")
    one = _i64(b, [1], "one")
    count = b.node("Div", [b.node("Sub", [b.node("Add", [seq, rows], "seq_up"), one], "seq_up1"), rows], "chunks")
    pad = b.node("Sub", [b.node("Mul", [count, rows], "padded_seq"), seq], "pad_rows")
    zeros = _i64(b, [0] * (2 * r - 2), "pads_before")
    pads = b.node("Concat", [zeros, pad, _i64(b, [0], "pad_last")], "pads", axis=0)
    q_padded = b.node("Pad", [qs, pads], "q_padded")
    trips = b.node("Reshape", [count, _i64(b, [], "scalar")], "trips")

    # The loop body: one chunk of query rows against every key.
    it, cond = names.fresh(f"{b.prefix}/chunk_index"), names.fresh(f"{b.prefix}/chunk_cond")
    outer = b.nodes
    b.nodes = []
    start = b.node("Mul", [it, rows], "chunk_start")
    stop = b.node("Add", [start, rows], "chunk_stop")
    q_i = b.node("Slice", [q_padded, start, stop, _i64(b, [-2], "seq_axis")], "q_chunk")
    y_i = softmax_product(b, q_i, kt, v, t_elem, "chunk_")
    cond_out = b.node("Identity", [cond], "chunk_cond_out")
    body = helper.make_graph(
        b.nodes, names.fresh(f"{b.prefix}/chunk_body"),
        [helper.make_tensor_value_info(it, TensorProto.INT64, []), helper.make_tensor_value_info(cond, TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []), helper.make_tensor_value_info(y_i, t_elem, [None] * r)])
    b.nodes = outer

    stacked = b.node("Loop", [trips, ""], "chunks_y", body=body)
    # [chunks, lead..., rows, dv] -> [lead..., chunks * rows, dv] -> the first S rows.
    y = b.node("Transpose", [stacked], "chunks_y_t", perm=list(range(1, r - 1)) + [0, r - 1, r])
    dv = b.node("Slice", [b.node("Shape", [v], "v_shape"), _i64(b, [-1], "at_last"), _i64(b, [2**62], "to_end")], "dv")
    out_shape = b.node("Concat", [b.node("Slice", [shape, _i64(b, [0], "at_first2"), _i64(b, [-2], "at_seq2")], "lead"),
                                  _i64(b, [-1], "any_rows"), dv], "y_shape", axis=0)
    y = b.node("Reshape", [y, out_shape], "y_padded")
    y = b.node("Slice", [y, _i64(b, [0], "from_row"), seq, _i64(b, [-2], "seq_axis2")], "y")
    _finish(b, y, t_elem)
    return b.nodes


def to_chunked_form(model: onnx.ModelProto, *, budget: int = SCORE_BUDGET, weights_folder: Path | None = None,
                    select: Callable[[AttentionSite], bool] | None = None) -> RewriteResult:
    """Rewrite (in place) every attention site of ``model`` into query-chunked attention in standard ops.

    ``budget``: score elements one chunk may hold (memory linear in the
    sequence length, like flash attention). Models below opset 13 are left
    as they are, every site listed as unfused with the reason.
    ``weights_folder``: where the data files of a model loaded without its
    external data are (for a scale only a run can tell). ``select``: only
    the sites it accepts are considered (the result lists no other).
    """
    if budget < 1:
        raise ValueError(f"budget must be positive (got {budget})")
    ensure_node_names(model)
    found = find_attention(model, probe=False, index=TypedIndex(model), weights_folder=weights_folder)
    if select is not None:
        found = [site for site in found if select(site)]
    opset = default_opset(model)

    def problem(site: AttentionSite) -> str | None:
        if opset < MIN_OPSET:
            return f"query-chunked attention needs opset {MIN_OPSET} or later (model is at {opset})"
        return _chunked_problem(site)

    return _rewrite(model, FORM, lambda m, s, n: build_chunked(m, s, n, budget), problem, lambda site: False, found)
