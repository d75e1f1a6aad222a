"""What a new user meets in the first hour: the Python API's names and trt --fp16 next to a file of their own."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import attn_export
import attn_export.errors
from attn_export.exporter.fp16 import FP16_KEY, fp16_settings, recorded_fp16_settings
from attn_export.pipeline import _fp16_destination


def test_dir_lists_the_public_api_before_first_use() -> None:
    code = "import attn_export; print(' '.join(n for n in dir(attn_export) if not n.startswith('_')))"
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(names) == set(attn_export.__all__) - {"__version__"}
    for name in ("export_onnx", "verify", "convert_fp16", "build_engine", "OrtRunner", "run_bench"):
        assert name in names
        assert inspect.getdoc(getattr(attn_export, name)), f"{name} has no docstring"


@pytest.fixture(scope="module")
def fp16_file(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "unet.fp16.onnx"
    res = subprocess.run([sys.executable, "-m", "attn_export", "fp16", str(tiny_onnx), "-o", str(out),
                          "--calibration-shapes", "1x16x16"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return out


def test_the_fp16_file_records_what_it_was_made_from(fp16_file: Path, tiny_onnx: Path) -> None:
    record = recorded_fp16_settings(fp16_file)
    assert record == fp16_settings(tiny_onnx, threshold=4096.0, calibration_shapes=[(1, 16, 16)])
    assert record != fp16_settings(tiny_onnx, threshold=2048.0, calibration_shapes=[(1, 16, 16)])
    model = onnx.load(str(fp16_file), load_external_data=False)
    assert json.loads(next(p.value for p in model.metadata_props if p.key == FP16_KEY))["source_sha256"]


def test_trt_fp16_reuses_a_matching_file_and_never_takes_the_users(fp16_file: Path, tiny_onnx: Path) -> None:
    folder = fp16_file.parent
    engine = folder / "unet.plan"
    same = fp16_settings(tiny_onnx, threshold=4096.0, calibration_shapes=[(1, 16, 16)])
    other = fp16_settings(tiny_onnx, threshold=1000.0, calibration_shapes=[(1, 16, 16)])
    # The README's order: `fp16 -o unet.fp16.onnx`, then `trt --fp16 -o unet.plan` with the same settings.
    assert _fp16_destination(engine, None, same, force=False) == (fp16_file, True)
    assert _fp16_destination(engine, None, same, force=True) == (fp16_file, True)
    # Other settings: an intermediate of its own, next to the engine; the user's file is left alone, --force or not.
    for force in (False, True):
        assert _fp16_destination(engine, None, other, force=force) == (folder / "unet.plan.fp16.onnx", False)
    # A name the user gives is replaced only with --force.
    with pytest.raises(attn_export.errors.UsageError, match="exists"):
        _fp16_destination(engine, fp16_file, other, force=False)
    assert _fp16_destination(engine, fp16_file, other, force=True) == (fp16_file, False)
    assert _fp16_destination(engine, fp16_file, same, force=False) == (fp16_file, True)
    # A file that was not checked against PyTorch is never reused.
    unchecked = fp16_settings(tiny_onnx, threshold=4096.0, calibration_shapes=[(1, 16, 16)], checked=False)
    assert _fp16_destination(engine, None, unchecked, force=False) == (folder / "unet.plan.fp16.onnx", False)


def test_trt_fp16_after_fp16_runs_as_the_readme_says(fp16_file: Path, tiny_onnx: Path) -> None:
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX wheels (test extra) not installed")
    before = fp16_file.stat().st_mtime_ns
    res = subprocess.run([sys.executable, "-m", "attn_export", "trt", str(tiny_onnx), "--fp16", "--runtime", "rtx",
                          "--calibration-shapes", "1x16x16", "-o", str(fp16_file.parent / "unet.plan")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "reusing" in res.stdout and fp16_file.stat().st_mtime_ns == before


def test_localize_refuses_what_it_would_not_run(tiny_onnx: Path, tmp_path: Path) -> None:
    """--localize runs the file as written on the CPU: asked for another form, it says so before verifying."""
    for extra in (["--form", "serving"], ["--provider", "cuda"]):
        res = subprocess.run([sys.executable, "-m", "attn_export", "verify", str(tiny_onnx), "--localize", *extra],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "--localize runs the file as written" in res.stderr, res.stderr
        assert "PASSED" not in res.stdout and "FAILED" not in res.stdout


def test_a_serving_form_that_changes_nothing_is_not_written(fp16_file: Path, tmp_path: Path) -> None:
    # FP16 attention sites stay as they are in the serving form, and tiny has no eligible 3x3 convolution.
    out = tmp_path / "s.onnx"
    res = subprocess.run([sys.executable, "-m", "attn_export", "optimize", str(fp16_file), "--for", "onnxruntime",
                          "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "serve it as it is" in res.stderr, res.stderr
    assert not out.exists()


def test_trt_fp16_options_need_fp16(tiny_onnx: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "attn_export", "trt", str(tiny_onnx), "--runtime", "rtx",
                          "--calibration-shapes", "1x16x16", "-o", str(tmp_path / "e.plan")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "add --fp16" in res.stderr and not list(tmp_path.iterdir())


def test_verify_saves_the_inputs_it_ran_and_runs_them_again(tiny_onnx: Path, tmp_path: Path) -> None:
    import numpy as np

    from attn_export.inputs import load_inputs
    from attn_export.pipeline import verify_artifact
    from attn_export.exporter.foreign import spec_of

    saved = tmp_path / "in.npz"
    first = verify_artifact(tiny_onnx, shapes=[(2, 16, 24)], seed=3, save_inputs=saved)
    assert first.report.passed and first.inputs_saved == saved
    spec = spec_of(tiny_onnx)
    feeds = load_inputs(saved, spec)
    want = spec.make_inputs(2, 16, 24, seed=3)  # the sweep's first shape draws with seed + 0
    for name, value in want.items():
        np.testing.assert_array_equal(feeds[name], value)
    again = verify_artifact(tiny_onnx, load_inputs=saved)
    assert again.report.passed and again.report.shape_source == "given inputs"
    assert [list(s.shape) for s in again.report.shapes] == [[2, 16, 24]]
