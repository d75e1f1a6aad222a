"""Attention in query chunks (graph/chunked.py): the CPU serving form's attention, exact and bounded in memory."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import attention_zoo
from attn_export.graph import find_attention, onnxruntime_serving_form, to_chunked_form
from attn_export.graph.chunked import MIN_ROWS
from attn_export.runners.ort_runner import OrtRunner
from attn_export.verify import verify


def _run(model: onnx.ModelProto | Path, feeds: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(outputs, feeds)


def _attention_graph(rank: int, scale: float, opset: int = 17) -> onnx.ModelProto:
    """softmax(scale·q·kᵀ)·v on inputs of dynamic batch, heads and length, written the canonical way."""
    dims = ["b", "h", "s", 8][4 - rank:]
    kv_dims = ["b", "h", "skv", 8][4 - rank:]
    nodes = [
        helper.make_node("Mul", ["q", "scale"], ["qs"], name="mul"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=list(range(rank - 2)) + [rank - 1, rank - 2]),
        helper.make_node("MatMul", ["qs", "kt"], ["logits"], name="qk"),
        helper.make_node("Softmax", ["logits"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"], name="pv"),
    ]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, dims),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, kv_dims),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, kv_dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * rank)],
        [numpy_helper.from_array(np.array(scale, np.float32), "scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def _reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    logits = (q.astype(np.float64) * scale) @ np.swapaxes(k, -1, -2)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _rows_tensor(model: onnx.ModelProto) -> str:
    return next(o for n in model.graph.node for o in n.output if o.endswith("/rows"))


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("budget", [1, 100, 5000, 10**9])
def test_exact_at_every_length_and_budget(rank: int, budget: int) -> None:
    """Lengths that are and are not multiples of the chunk, one chunk or many, queries and keys of other lengths."""
    model = _attention_graph(rank, 0.3)
    result = to_chunked_form(model, budget=budget)
    assert result.rewritten and not result.unfused
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Loop"] == 1 and ops["Softmax"] == 0
    rows = _rows_tensor(model)
    model.graph.output.append(helper.make_tensor_value_info(rows, TensorProto.INT64, None))
    rng = np.random.default_rng(rank * 7 + budget % 97)
    for lead, s, skv in (((2, 3), 1, 1), ((1, 1), 5, 9), ((2, 2), 17, 17), ((1, 3), 70, 33), ((3, 1), 129, 129)):
        lead = lead[2 - (rank - 2):]
        q = rng.standard_normal((*lead, s, 8)).astype(np.float32)
        k, v = (rng.standard_normal((*lead, skv, 8)).astype(np.float32) for _ in range(2))
        got, got_rows = _run(model, {"q": q, "k": k, "v": v})
        assert got.shape == (*lead, s, 8)
        np.testing.assert_allclose(got, _reference(q, k, v, 0.3), rtol=1e-5, atol=1e-5)
        # Rows per chunk: what the budget allows over batch x heads x S_q, at least MIN_ROWS, at most S_q.
        want = min(max(budget // (int(np.prod(lead)) * s), MIN_ROWS), s)
        assert int(got_rows.reshape(-1)[0]) == want


@pytest.mark.parametrize("form", ["seed_bmm", "einsum_channel_first_mh", "sdpa_mh", "einsum_mh", "logits_div"])
def test_files_as_pytorch_writes_them(tmp_path: Path, form: str) -> None:
    """Foreign layouts (K as [B, C, S], channel-first Einsum, several heads, scale on the logits), never canonicalized."""
    module = attention_zoo.make(form)
    path = tmp_path / f"{form}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 3, 8, 12), torch.tensor([1, 2])), str(path), dynamo=False,
                          opset_version=17, input_names=["x", "t"], output_names=["y"],
                          dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "t": {0: "b"}})
    model = onnx.load(str(path))
    result = to_chunked_form(model, budget=700)
    assert len(result.rewritten) == 2 and not result.unfused
    for b, h, w in ((1, 8, 8), (3, 32, 16), (2, 24, 40)):
        x = np.random.default_rng(b * h + w).standard_normal((b, 3, h, w)).astype(np.float32)
        t = (np.arange(b) * 250 + 7).astype(np.int64)
        with torch.no_grad():
            ref = module(torch.from_numpy(x), torch.from_numpy(t)).numpy()
        assert np.abs(_run(model, {"x": x, "t": t})[0] - ref).max() < 1e-4


def test_serving_form_per_provider_and_choice(tiny_onnx: Path) -> None:
    def ops(provider: str, attention: str = "auto", l2: int | None = None) -> Counter:
        model = onnx.load(str(tiny_onnx))
        onnxruntime_serving_form(model, provider=provider, winograd=False, attention=attention, l2_bytes=l2)
        return Counter(n.op_type for n in model.graph.node)

    # tiny's head size is 32: MultiHeadAttention's CPU kernel takes L2 / 2048 keys per block, so chunks from a
    # 64 KiB L2 down (64 keys), the kernel above.
    assert ops("CPUExecutionProvider", l2=2**16)["Loop"] == 4
    assert ops("CPUExecutionProvider", l2=2**17)["MultiHeadAttention"] == 4
    assert ops("CPUExecutionProvider", l2=2**17)["Loop"] == 0
    assert ops("CPUExecutionProvider", "chunked", l2=2**30)["Loop"] == 4
    assert ops("CPUExecutionProvider", "multiheadattention", l2=2**10)["MultiHeadAttention"] == 4
    assert ops("CUDAExecutionProvider", l2=2**10)["MultiHeadAttention"] == 4
    assert ops("CUDAExecutionProvider", "chunked")["Loop"] == 0  # no chunks off the CPU
    with pytest.raises(ValueError):
        ops("CPUExecutionProvider", "flash")


def _two_head_sizes() -> onnx.ModelProto:
    """Two attention sites in a row: 2 heads of size 8, then 2 heads of size 64 (heads static, as in exports)."""
    first, second = _attention_graph(4, 8 ** -0.5), _attention_graph(4, 64 ** -0.5)
    nodes = list(first.graph.node)
    # The second site reads y (the first's output, [b, 2, s, 8]) through a 1x1 projection to 64 channels.
    proj = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32) * 0.3, "proj")
    nodes.append(helper.make_node("MatMul", ["y", "proj"], ["qkv2"], name="proj"))
    for n in second.graph.node:
        n.name += "_2"
        n.input[:] = ["qkv2" if i in "qkv" else (i + "_2" if i != "scale" else "scale_2") for i in n.input]
        n.output[:] = [o + "_2" for o in n.output]
        nodes.append(n)
    scale2 = numpy_helper.from_array(np.array(64 ** -0.5, np.float32), "scale_2")
    static = [1, 2, "s", 8]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info(n, TensorProto.FLOAT, static) for n in "qkv"],
                              [helper.make_tensor_value_info("y_2", TensorProto.FLOAT, [1, 2, "s", 64])],
                              [first.graph.initializer[0], proj, scale2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_the_choice_is_per_site() -> None:
    model = _two_head_sizes()
    reference = model.SerializeToString()
    sites = {s.head_size: s for s in find_attention(model)}
    assert set(sites) == {8, 64} and all(s.heads == 2 for s in sites.values())
    # With a 128 KiB L2 the kernel would take 64 keys per block at head size 64 (chunks), 512 at head size 8.
    form = onnxruntime_serving_form(model, winograd=False, l2_bytes=2**17)
    assert (form.chunked_sites, form.mha_sites) == (1, 1)
    assert form.parts() == ["1 x query-chunked attention", "1 x MultiHeadAttention"]
    assert form.attention_kind == "query-chunked attention and MultiHeadAttention"
    onnx.checker.check_model(model)
    rng = np.random.default_rng(2)
    feeds = {n: rng.standard_normal((1, 2, 37, 8)).astype(np.float32) for n in "qkv"}
    want = _run(onnx.load_from_string(reference), feeds)[0]
    assert np.abs(_run(model, feeds)[0] - want).max() < 1e-5


def test_runner_and_verify(tiny_onnx: Path, export_model, monkeypatch: pytest.MonkeyPatch) -> None:
    chunked = OrtRunner(tiny_onnx, attention="chunked").activate()
    mha = OrtRunner(tiny_onnx, attention="multiheadattention").activate()
    plain = OrtRunner(tiny_onnx, attention="as-is").activate()
    assert (chunked.attention_rewritten, mha.attention_rewritten, plain.attention_rewritten) == (4, 4, 0)
    assert chunked.serving_form_parts() == ["4 x query-chunked attention"]
    assert mha.serving_form_parts() == ["4 x MultiHeadAttention"]
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 3, 16, 24)).astype(np.float32),
             "t": np.array([10, 700])}
    want = plain.infer(feeds)["out"]
    for runner in (chunked, mha):
        assert np.abs(runner.infer(feeds)["out"] - want).max() < 1e-5
    # verify --form serving checks the serving form: with a 512 KiB L2, head size 256 goes to chunks (64 keys per
    # kernel block); by default it runs the file as written, and says so.
    from attn_export.graph import serving

    monkeypatch.setattr(serving, "l2_cache_bytes", lambda: 2**19)
    report = verify(export_model("tiny", "op", base_channels=128), shapes="1x16x16,2x32x24", form="serving")
    assert report.passed and "4 x query-chunked attention" in report.candidate
    report = verify(export_model("tiny", "op", base_channels=128), shapes="1x16x16")
    assert report.passed and "the file as written, 4 x Attention op" in report.candidate
    assert "chunked" not in report.candidate
