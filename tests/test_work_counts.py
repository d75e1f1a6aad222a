"""One ``trt --fp16`` opens each file once and analyses it once: parses, shape inferences and attention analyses
are counted while a real engine is built (TensorRT-RTX builds on the CPU)."""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Any, Callable

import onnx
import onnx.shape_inference
import pytest

from attn_export.graph import attention


def _counting(counts: collections.Counter[str], key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        counts[key] += 1
        return fn(*args, **kwargs)
    return wrapped


def test_trt_fp16_parses_infers_and_analyses_each_file_at_most_as_the_issue_allows(
        tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (the test extra) builds the engine on the CPU")
    from attn_export.pipeline import build_engine

    counts: collections.Counter[str] = collections.Counter()
    parsed: list[str] = []

    def load(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(f: Any, *args: Any, **kwargs: Any) -> Any:
            parsed.append(Path(str(f)).name)
            return fn(f, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(onnx, "load_model", load(onnx.load_model))
    monkeypatch.setattr(onnx, "load", load(onnx.load))
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes",
                        _counting(counts, "infer", onnx.shape_inference.infer_shapes))
    counted = _counting(counts, "attention", attention.find_attention)
    # Every module that bound the function by name calls it through its own reference.
    for name, module in list(sys.modules.items()):
        if name.startswith("attn_export") and getattr(module, "find_attention", None) is attention.find_attention:
            monkeypatch.setattr(module, "find_attention", counted)

    src = tmp_path / "tiny.onnx"
    src.write_bytes(tiny_onnx.read_bytes())
    result = build_engine(src, tmp_path / "tiny.plan", fp16=True, runtime="rtx")

    assert result.fp16 is not None and (tmp_path / "tiny.plan").is_file()
    by_file = collections.Counter(parsed)
    assert by_file["tiny.onnx"] == 1 and all(n <= 2 for n in by_file.values()), by_file
    assert counts["infer"] <= 3, counts
    assert counts["attention"] <= 2, counts
    # The engine's fusion report reads the FP16 analysis the conversion made: every site is there.
    assert len(result.readiness.attention) == len(result.fp16.analysis) == 4
