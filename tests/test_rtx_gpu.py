"""TensorRT-RTX engines run on an RTX-class GPU: built here, loaded by the Python runner, verified against PyTorch.

Skipped unless tensorrt-rtx is installed and an NVIDIA GPU of a compute capability TensorRT-RTX targets is
present (7.5, 8.0, 8.6, 8.9, 12.x: data-center Hopper, 9.0, is not one of them). Each step runs as its own
`attn-export` process: one process uses one TensorRT runtime (Polygraphy picks its module once per process), so
these can share a session with the TensorRT GPU tests.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest


def _rtx_gpu() -> str | None:
    """The GPU's compute capability when TensorRT-RTX can run on it, else None."""
    if importlib.util.find_spec("tensorrt_rtx") is None:
        return None
    from attn_export.engines.runtime import RTX
    from attn_export.engines.trt_build import gpu_info

    gpu = gpu_info()
    return gpu.compute_capability if gpu is not None and gpu.compute_capability in RTX.compute_capabilities else None


CC = _rtx_gpu()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CC is None, reason="needs TensorRT-RTX and an NVIDIA GPU it targets (compute capability 7.5, 8.x or 12.x)"),
]


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "attn_export.cli", *[str(a) for a in args]], capture_output=True, text=True)


def test_rtx_engine_runs_and_matches_pytorch(export_model, tmp_path: Path) -> None:
    engine = tmp_path / "tiny.engine"
    built = _cli("trt", export_model("tiny", "op"), "--fp16", "--runtime", "rtx", "-o", engine, "--compute-capability", CC,
                 "--min", "1x32x32", "--opt", "2x64x64", "--max", "4x96x96")
    assert built.returncode == 0, built.stdout + built.stderr
    data = json.loads((tmp_path / "tiny.engine.json").read_text())
    # On a GPU the report comes from the engine inspector, and every site of the tiny preset fuses at batch 2-4.
    assert data["fusion"]["source"] == "inspector" and data["fusion"]["all_fused"] is True, data["fusion"]["summary"]
    verified = _cli("verify", engine, "--report", tmp_path / "verify.json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads((tmp_path / "verify.json").read_text())
    assert report["passed"] is True and "tensorrt-rtx" in json.dumps(report)
