"""Serving with the ONNX Runtime runner: several shapes in one process, refusals, concurrency, the DDPM sampler."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from attn_export.runners.ort_runner import OrtRunner
from attn_export.runners.torch_runner import TorchRunner
from attn_export.errors import ShapeError, UsageError
from attn_export.models.loader import source_from_spec

ROOT = Path(__file__).resolve().parents[1]
TINY_SHAPES = [(1, 32, 32), (2, 16, 24), (3, 12, 20), (1, 64, 48)]


def _torch_runner(spec) -> TorchRunner:
    return TorchRunner(source_from_spec(spec), spec=spec).activate()


def _check_against_torch(path: Path, shapes: list[tuple[int, int, int]]) -> None:
    with OrtRunner(path) as ort_runner:
        ref = _torch_runner(ort_runner.spec)
        for b, h, w in shapes:
            feeds = ort_runner.spec.make_inputs(b, h, w, seed=b * 1000 + h + w)
            got = ort_runner(feeds["x"], feeds["t"])
            want = ref(feeds["x"], feeds["t"])
            assert got.shape == (b, 3, h, w)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"shape {b}x{h}x{w}")


def test_ort_serves_tiny_at_several_shapes(tiny_onnx: Path) -> None:
    _check_against_torch(tiny_onnx, TINY_SHAPES)


def test_ort_serves_decomposed_export(tiny_decomposed_onnx: Path) -> None:
    _check_against_torch(tiny_decomposed_onnx, TINY_SHAPES[:2])


@pytest.mark.slow
def test_ort_serves_ddpm_cifar10(export_model) -> None:
    _check_against_torch(export_model("ddpm-cifar10", "op"), [(1, 32, 32), (2, 16, 24), (1, 64, 64)])


def test_call_takes_torch_tensors_and_returns_numpy(tiny_onnx: Path) -> None:
    with OrtRunner(tiny_onnx) as runner:
        feeds = runner.spec.make_inputs(2, 16, 16, seed=3)
        out = runner(torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["t"]))
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        np.testing.assert_array_equal(out, runner(feeds["x"], feeds["t"]))
        # infer() returns every output by name
        assert set(runner.infer(feeds)) == {o.name for o in runner.spec.outputs}


@pytest.mark.parametrize(
    ("x_shape", "t_shape", "reason"),
    [
        ((1, 3, 30, 32), (1,), "multiples of 4"),  # H not a multiple of the model's H/W multiple
        ((1, 3, 32, 18), (1,), "multiples of 4"),
        ((1, 3, 0, 32), (1,), "multiples"),
        ((1, 4, 32, 32), (1,), "3 channels"),  # wrong channel count
        ((3, 32, 32), (1,), "4-D"),  # wrong rank
        ((1, 1, 3, 32, 32), (1,), "4-D"),
        ((2, 3, 16, 16), (3,), "must have shape (2,)"),  # t does not match the batch
    ],
)
def test_invalid_shapes_are_refused_with_the_reason(tiny_onnx: Path, x_shape, t_shape, reason: str) -> None:
    runner = OrtRunner(tiny_onnx)
    with pytest.raises(ShapeError, match=None) as info:
        runner(np.zeros(x_shape, np.float32), np.zeros(t_shape, np.int64))
    assert reason in str(info.value)


def test_missing_and_unexpected_inputs_are_named(tiny_onnx: Path) -> None:
    runner = OrtRunner(tiny_onnx)
    x = np.zeros((1, 3, 16, 16), np.float32)
    with pytest.raises(UsageError, match=r"missing input\(s\) t"):
        runner.infer({"x": x})
    with pytest.raises(UsageError, match=r"unexpected input\(s\) y"):
        runner.infer({"x": x, "t": np.zeros(1, np.int64), "y": np.zeros(1, np.int64)})


def test_refusal_does_not_break_the_runner(tiny_onnx: Path) -> None:
    with OrtRunner(tiny_onnx) as runner:
        feeds = runner.spec.make_inputs(1, 16, 16)
        before = runner(feeds["x"], feeds["t"])
        with pytest.raises(ShapeError):
            runner(np.zeros((1, 3, 15, 16), np.float32), feeds["t"])
        np.testing.assert_array_equal(runner(feeds["x"], feeds["t"]), before)


def _jobs(spec, n: int) -> list[dict[str, np.ndarray]]:
    shapes = [(1, 16, 16), (2, 32, 24), (3, 8, 12), (1, 48, 32), (2, 20, 20)]
    return [spec.make_inputs(*shapes[i % len(shapes)], seed=i) for i in range(n)]


def test_concurrent_calls_equal_serial_runs(tiny_onnx: Path) -> None:
    """The OrtRunner docstring promises thread safety: many threads, different shapes, one runner."""
    with OrtRunner(tiny_onnx) as runner:
        jobs = _jobs(runner.spec, 24)
        serial = [runner(j["x"], j["t"]) for j in jobs]
        with ThreadPoolExecutor(max_workers=6) as pool:
            for _ in range(2):
                concurrent = list(pool.map(lambda j: runner(j["x"], j["t"]), jobs))
                for k, (a, b) in enumerate(zip(concurrent, serial)):
                    assert a.shape == b.shape
                    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=f"job {k}")


def test_concurrent_first_calls_activate_once(tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads that all find the runner inactive must not each build a session."""
    runner = OrtRunner(tiny_onnx)
    builds = []
    real = OrtRunner._activate

    def counting(self: OrtRunner) -> None:
        builds.append(1)
        real(self)

    monkeypatch.setattr(OrtRunner, "_activate", counting)
    jobs = _jobs(runner.spec, 8)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda j: runner(j["x"], j["t"]), jobs))
    assert len(builds) == 1
    for j, r in zip(jobs, results):
        np.testing.assert_allclose(r, runner(j["x"], j["t"]), rtol=0, atol=1e-6)
    runner.deactivate()


# ---------------------------------------------------------------------------------------------------------------------
# examples/sample_ddpm.py
# ---------------------------------------------------------------------------------------------------------------------
def _sampler_module():
    spec = importlib.util.spec_from_file_location("sample_ddpm", ROOT / "examples" / "sample_ddpm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_respaced_schedule_is_ddpm_at_full_length() -> None:
    mod = _sampler_module()
    t, betas = mod.respaced_schedule(1000)
    np.testing.assert_array_equal(t, np.arange(1000))
    np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-9)
    t, betas = mod.respaced_schedule(50)
    assert len(t) == 50 and t[0] == 0 and t[-1] == 999
    # Same cumulative noise level at the kept steps as the training schedule.
    np.testing.assert_allclose(np.cumprod(1 - betas), np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t], rtol=1e-9)


def test_sample_ddpm_cli_matches_pytorch(tiny_onnx: Path, tmp_path: Path) -> None:
    """End to end on CPU: the example with the ORT runner gives PyTorch's samples for the same seed."""
    out = tmp_path / "samples.npy"
    cmd = [sys.executable, str(ROOT / "examples" / "sample_ddpm.py"), str(tiny_onnx), "--steps", "12", "--batch", "2",
           "--size", "16", "--seed", "0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime" in proc.stdout
    got = np.load(out)
    assert got.shape == (2, 3, 16, 16) and got.dtype == np.float32 and np.isfinite(got).all()

    mod = _sampler_module()
    spec = OrtRunner(tiny_onnx).spec
    ref = mod.sample(_torch_runner(spec), batch=2, size=16, steps=12, seed=0, num_train_steps=spec.num_timesteps)
    # fp32 differences of ~1e-6 per call, accumulated over 12 steps.
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)
    # A different seed gives different samples (the noise really comes from the seed).
    other = mod.sample(_torch_runner(spec), batch=2, size=16, steps=12, seed=1, num_train_steps=spec.num_timesteps)
    assert np.abs(other - ref).max() > 0.1


def test_sample_ddpm_refuses_bad_size(tiny_onnx: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "examples" / "sample_ddpm.py"), str(tiny_onnx), "--steps", "2", "--size", "30",
           "--out", str(tmp_path / "x.npy")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "multiples of 4" in proc.stderr
    assert not (tmp_path / "x.npy").exists()
