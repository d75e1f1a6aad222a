"""The ONNX Runtime serving form's attention (com.microsoft.MultiHeadAttention, query chunks), applied at session creation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from attn_export.runners.ort_runner import OrtRunner
from attn_export.exporter.onnx_export import export_onnx
from attn_export.graph import to_chunked_form, to_onnxruntime_form
from attn_export.models.loader import ModelSource


def _run(model: onnx.ModelProto | Path, feeds: dict) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_decomposed_onnx"])
@pytest.mark.parametrize("rewrite, op", [(to_onnxruntime_form, "MultiHeadAttention"),
                                         (lambda m: to_chunked_form(m, budget=3000), "Loop")])
def test_tiny_sites_take_each_serving_attention(request, fixture: str, rewrite, op: str) -> None:
    """Each attention form of the serving form, on both exports: every site rewritten, the function kept."""
    path = request.getfixturevalue(fixture)
    model = onnx.load(str(path))
    result = rewrite(model)
    assert len(result.rewritten) == 4 and not result.unfused
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops[op] == 4 and ops["Attention"] == 0 and ops["Softmax"] == 0
    onnx.checker.check_model(model)
    rng = np.random.default_rng(0)
    for b, h, w in ((1, 8, 8), (2, 32, 48), (3, 16, 12), (3, 24, 24)):
        feeds = {"x": rng.standard_normal((b, 3, h, w)).astype(np.float32), "t": np.arange(b, dtype=np.int64) * 300}
        assert np.abs(_run(model, feeds) - _run(path, feeds)).max() < 1e-5


def test_multi_head_and_fp16(tmp_path: Path) -> None:
    out = tmp_path / "mh.onnx"
    export_onnx(ModelSource(model="attention_zoo:sdpa_mh"), out)
    model = onnx.load(str(out))
    assert len(to_onnxruntime_form(model).rewritten) == 2
    heads = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    assert [onnx.helper.get_attribute_value(a) for n in heads for a in n.attribute if a.name == "num_heads"] == [4, 4]
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 24, 16)).astype(np.float32),
             "t": np.array([5, 900], dtype=np.int64)}
    assert np.abs(_run(model, feeds) - _run(out, feeds)).max() < 1e-5


@pytest.mark.parametrize("rewrite", [to_onnxruntime_form, to_chunked_form])
def test_fp16_sites_stay_as_they_are(tiny_onnx: Path, tmp_path: Path, rewrite) -> None:
    """Both attention forms of the serving form take float32 sites only: the others stay as written, with why."""
    from attn_export.exporter.fp16 import convert_fp16

    half = tmp_path / "half.onnx"
    convert_fp16(tiny_onnx, half, check=False)
    result = rewrite(onnx.load(str(half)))
    assert not result.rewritten and len(result.unfused) == 4
    assert all("float32 only" in (s.problem or "") for s in result.unfused)


def test_runner_and_verify_use_it_on_request(tiny_onnx: Path) -> None:
    runner = OrtRunner(tiny_onnx, attention="multiheadattention").activate()
    assert runner.attention_rewritten == 4
    plain = OrtRunner(tiny_onnx, attention="as-is").activate()
    assert plain.attention_rewritten == 0
    feeds = {"x": np.ones((1, 3, 16, 16), np.float32), "t": np.array([10])}
    assert np.abs(runner.infer(feeds)["out"] - plain.infer(feeds)["out"]).max() < 1e-5
    assert runner.serving_form_parts() == ["4 x MultiHeadAttention"]
