"""The graph MAC counter against a second method: PyTorch's own FLOP counter, and hand counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.utils.flop_counter import FlopCounterMode

from attn_export.exporter.foreign import spec_of
from attn_export.graph.flops import count_macs
from attn_export.models.loader import load_model, source_from_spec


@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_decomposed_onnx"])
@pytest.mark.parametrize("shape", [(1, 32, 32), (2, 16, 24)])
def test_onnx_count_matches_torch_flop_counter(fixture: str, shape: tuple[int, int, int],
                                               request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    count = count_macs(onnx.load(str(path)), *shape)
    assert not count.unknown
    loaded = load_model(source_from_spec(spec_of(path)), attention_impl="decomposed")
    feeds = loaded.spec.make_inputs(*shape)
    # FlopCounterMode counts aten conv / mm / addmm / bmm at 2 FLOPs per MAC: the same ops, counted in PyTorch.
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        loaded.module(*[torch.from_numpy(feeds[t.name]) for t in loaded.spec.inputs])
    assert 2 * count.total == fc.get_total_flops()
    assert 0 < count.attention < count.total


def test_hand_count_of_each_op() -> None:
    # x [1, 4, 8, 8] -> Conv 3x3 (6 out, groups 2) -> Reshape [1, 6, 64] -> MatMul with [64, 5] -> Einsum with
    # [5, 7] -> Gemm on the flattened [6, 7] with B [7, 3] -> 4-D Attention (Q = K = V [1, 2, 6, 3]).
    w = numpy_helper.from_array(np.ones((6, 2, 3, 3), np.float32), "w")
    m = numpy_helper.from_array(np.ones((64, 5), np.float32), "m")
    e = numpy_helper.from_array(np.ones((5, 7), np.float32), "e")
    g = numpy_helper.from_array(np.ones((7, 3), np.float32), "g")
    shp = numpy_helper.from_array(np.array([1, 6, 64], np.int64), "shp")
    flat = numpy_helper.from_array(np.array([6, 7], np.int64), "flat")
    heads = numpy_helper.from_array(np.array([1, 2, 3, 3], np.int64), "heads")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], group=2, name="conv"),
        helper.make_node("Reshape", ["c", "shp"], ["r"]),
        helper.make_node("MatMul", ["r", "m"], ["mm"], name="matmul"),
        helper.make_node("Einsum", ["mm", "e"], ["es"], equation="bsk,kn->bsn", name="einsum"),
        helper.make_node("Reshape", ["es", "flat"], ["ef"]),
        helper.make_node("Gemm", ["ef", "g"], ["gm"], name="gemm"),
        helper.make_node("Reshape", ["gm", "heads"], ["q"]),
        helper.make_node("Attention", ["q", "q", "q"], ["y"], name="attention"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, "height", "width"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, m, e, g, shp, flat, heads])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    count = count_macs(model, 1, 8, 8)
    assert count.by_op == {
        "Conv": 1 * 6 * 8 * 8 * (2 * 3 * 3),
        "MatMul": 1 * 6 * 5 * 64,
        "Einsum": 1 * 6 * 5 * 7,
        "Gemm": 6 * 3 * 7,
        "Attention": 1 * 2 * 3 * 3 * (3 + 3),
    }
    assert count.attention == count.by_op["Attention"] and not count.unknown
