"""Real TensorRT builds and runs. Skipped unless TensorRT and an NVIDIA GPU are present.

Nothing is mocked: where these tests are skipped, nothing about the engine
path has been verified on hardware.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest

from attn_export.engines.profiles import Profile


def _have_trt_and_gpu() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    from attn_export.engines.trt_build import gpu_info

    return gpu_info() is not None


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _have_trt_and_gpu(), reason="needs TensorRT and an NVIDIA GPU"),
]

PROFILE = Profile((1, 32, 32), (2, 64, 64), (4, 96, 96))


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory, export_model):
    from attn_export import build_engine

    onnx_path = export_model("tiny", "op")
    out = tmp_path_factory.mktemp("engines") / "tiny.engine"
    result = build_engine(onnx_path, out, [PROFILE]).build
    return onnx_path, result


def test_build_writes_engine_and_sidecar(tiny_engine):
    from attn_export.engines.sidecar import read_sidecar

    _, result = tiny_engine
    assert result.engine_path.is_file() and result.size_bytes > 0
    data = read_sidecar(result.engine_path)
    assert data["engine_file"] == "tiny.engine"
    assert data["tensorrt_version"] == result.tensorrt_version
    assert data["gpu"]["compute_capability"] == result.gpu.compute_capability
    assert data["profiles"][0]["min"] == [1, 32, 32] and data["profiles"][0]["max"] == [4, 96, 96]
    io = {t["name"]: t for t in data["io"]}
    assert io["x"]["mode"] == "input" and io["x"]["shape"] == [-1, 3, -1, -1]
    assert io["out"]["mode"] == "output" and io["out"]["dtype"] == "float32"
    assert data["build"]["strongly_typed"] is True


def test_fusion_report_covers_every_block(tiny_engine):
    _, result = tiny_engine
    report = result.fusion
    assert report.verbosity == "detailed"
    assert len(report.blocks) == len(result.readiness.attention) > 0
    # An FP32 export: fused FP16 kernels do not apply; the report must say why, not guess.
    for b in report.blocks:
        assert b.fused is not None or b.reason
    json.dumps(result.sidecar["fusion"])


def test_runner_matches_onnxruntime(tiny_engine):
    from attn_export.runners.ort_runner import OrtRunner
    from attn_export.runners.trt_runner import TrtRunner

    onnx_path, result = tiny_engine
    with TrtRunner(result.engine_path) as trt_runner, OrtRunner(onnx_path) as ort_runner:
        for shape in [(1, 32, 32), (2, 64, 64), (3, 96, 64)]:
            feeds = trt_runner.spec.make_inputs(*shape, seed=1)
            got = trt_runner.infer(feeds)["out"]
            ref = ort_runner.infer(feeds)["out"]
            assert got.shape == ref.shape
            assert np.isfinite(got).all()
            diff = np.abs(got - ref)
            # FP16-level tolerance (the Polygraphy quickstart's rule): mean abs diff small, max bounded.
            assert diff.mean() <= 1e-2 and diff.max() <= 5e-2, (shape, diff.mean(), diff.max())


def test_runner_torch_path_and_cuda_graph(tiny_engine):
    import torch

    from attn_export.runners.trt_runner import TrtRunner

    _, result = tiny_engine
    plain = TrtRunner(result.engine_path).activate()
    graphed = TrtRunner(result.engine_path, use_cuda_graph=True).activate()
    try:
        feeds = {k: torch.from_numpy(v).cuda() for k, v in plain.spec.make_inputs(2, 64, 64, seed=3).items()}
        ref = plain.infer_torch(feeds)["out"].clone()
        assert ref.is_cuda
        for _ in range(3):  # warm-up, capture, replay
            out = graphed(feeds["x"], feeds["t"])
            assert out.is_cuda
            torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
        # Same-shape calls reuse the output buffer.
        a = plain.infer_torch(feeds)["out"]
        b = plain.infer_torch(feeds)["out"]
        assert a.data_ptr() == b.data_ptr()
    finally:
        plain.deactivate()
        graphed.deactivate()


def test_runner_refuses_shape_outside_profile(tiny_engine):
    from attn_export.runners.trt_runner import TrtRunner
    from attn_export.errors import ShapeError

    _, result = tiny_engine
    with TrtRunner(result.engine_path) as runner:
        with pytest.raises(ShapeError, match="outside this engine's optimization profiles"):
            runner.infer(runner.spec.make_inputs(8, 64, 64))


def test_fp16_attention_graph_builds(tmp_path):
    """A hand-made FP16 single-head attention block (head size 32): builds, and fusion gets a verdict."""
    from test_trt_logic import _attention_model

    from attn_export import build_engine

    path = tmp_path / "attn16.onnx"
    onnx.save(_attention_model(channels=32, fp16=True, use_t=True), str(path))
    result = build_engine(path, tmp_path / "attn16.engine", [Profile((1, 16, 16), (1, 32, 32), (2, 64, 64))]).build
    (block,) = result.fusion.blocks
    assert block.fused is not None, block.reason
