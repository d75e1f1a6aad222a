"""The graph rewrites the benchmark tries on the serving form compute the same function as the serving form."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from graph_variants import GRAPH_VARIANTS  # noqa: E402

from attn_export.exporter.foreign import spec_of
from attn_export.exporter.metadata import load_onnx  # noqa: E402
from attn_export.graph import to_onnxruntime_form  # noqa: E402


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def _served_with_random_affines(path: Path) -> onnx.ModelProto:
    """The serving form, every per-channel [C, 1, 1] constant drawn at random (fresh GroupNorms are 1 and 0)."""
    model = load_onnx(path)
    to_onnxruntime_form(model)
    rng = np.random.default_rng(0)
    for i, t in enumerate(model.graph.initializer):
        arr = numpy_helper.to_array(t)
        if arr.dtype == np.float32 and arr.ndim == 3 and arr.shape[1:] == (1, 1) and arr.shape[0] > 1:
            new = rng.normal(1.0, 0.5, arr.shape).astype(np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(new, t.name))
    return model


@pytest.mark.parametrize("variant", sorted(GRAPH_VARIANTS))
def test_variant_rewrites_and_keeps_the_function(tiny_onnx: Path, variant: str) -> None:
    base = _served_with_random_affines(tiny_onnx)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(base)
    sites = GRAPH_VARIANTS[variant](rewritten)
    assert sites > 0, f"{variant} found nothing to rewrite in the tiny preset"
    ops = [n.op_type for n in rewritten.graph.node]
    if variant == "gn_affine_bn":
        assert ops.count("BatchNormalization") == sites
    else:
        assert ops.count("ConvTranspose") == sites and "Resize" not in ops
    onnx.checker.check_model(rewritten)
    spec = spec_of(tiny_onnx)
    for i, (h, w) in enumerate(((16, 16), (24, 40))):
        feeds = spec.make_inputs(2, h, w, seed=i)
        want, got = _run(base, feeds), _run(rewritten, feeds)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
