"""ONNX Runtime's serving form as an artifact of its own: written by `optimize --for onnxruntime`, self-described,
verified like any file, run as written by every runner, refused by the TensorRT and FP16 paths."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from attn_export.exporter.onnx_export import export_onnx
from attn_export.exporter.optimize import optimize_onnx
from attn_export.exporter.serving import SERVING_KEY, serving_description
from attn_export.models.loader import ModelSource
from attn_export.runners.ort_runner import OrtRunner

CLI = [sys.executable, "-m", "attn_export"]


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    # A wide console: the assertions read whole table cells, which 80 columns would wrap.
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "250"})


@pytest.fixture(scope="module")
def serving(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serving") / "tiny.serving.onnx"
    result = optimize_onnx(tiny_onnx, out, target="onnxruntime")
    assert result.check and all(c["passed"] for c in result.check)  # checked against its source before it was put in place
    return out


def test_the_file_describes_itself(serving: Path, tiny_onnx: Path) -> None:
    model = onnx.load(str(serving))
    made = serving_description(model)
    assert made is not None and made["form"] == "onnxruntime" and made["provider"] == "CPUExecutionProvider"
    assert made["source"] == tiny_onnx.name and made["tuned_on"]["cpu_count"] >= 1
    sites = sum(n.op_type == "Attention" for n in onnx.load(str(tiny_onnx)).graph.node)
    rewritten = sum(n.op_type == "MultiHeadAttention" or (n.op_type == "Loop" and "/chunked/" in n.name)
                    for n in model.graph.node)
    assert made["attention_sites"] == rewritten == sites > 0
    assert not any(n.op_type == "Attention" for n in model.graph.node)
    # The source's description travels with it: verify rebuilds the same reference.
    assert any(p.key == "attn_export.spec" for p in model.metadata_props)


def test_runners_run_it_as_written(serving: Path, tiny_onnx: Path) -> None:
    runner = OrtRunner(serving).activate()
    assert runner.attention_rewritten == 0 and runner.winograd_rewritten == 0  # nothing rebuilt on top of it
    assert runner.serving_form_parts() == serving_description(onnx.load(str(serving)))["parts"]
    feeds = runner.spec.make_inputs(2, 16, 24)
    want = OrtRunner(tiny_onnx, attention="as-is").activate().infer(feeds)
    got = runner.infer(feeds)
    np.testing.assert_allclose(got["out"], want["out"], atol=1e-4, rtol=1e-3)


def test_verify_and_inspect_say_what_ran(serving: Path, tmp_path: Path) -> None:
    res = _cli("verify", serving, "--shapes", "1x16x16,2x32x24", "--report", tmp_path / "v.json")
    assert res.returncode == 0, res.stderr
    assert "ONNX Runtime's serving form for CPUExecutionProvider" in " ".join(res.stdout.split())
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["passed"] and report["tool"] == "attn-export verify"
    # What ran, where, with what: the session's real providers, the host and every library's version.
    assert report["providers"] == ["CPUExecutionProvider"]
    assert {"attn_export", "torch", "onnx", "onnxruntime"} <= set(report["host"]["versions"])
    assert report["host"]["cpu_count"] >= 1 and report["host"]["simd"]
    res = _cli("inspect", serving)
    text = " ".join(res.stdout.split())
    assert res.returncode == 0 and "serving form" in text and "not for TensorRT" in text, res.stdout
    assert "by the rules on" in text and "tuned (--tune)" not in text


@pytest.mark.parametrize("command", [["trt", "--runtime", "rtx", "-o", "x.plan"], ["fp16", "-o", "x.onnx"],
                                     ["optimize", "-o", "x.onnx"]])
def test_engine_fp16_and_optimize_take_the_source(serving: Path, tmp_path: Path, command: list[str]) -> None:
    args = [command[0], serving, *[tmp_path / a if a.startswith("x.") else a for a in command[1:]]]
    res = _cli(*args)
    assert res.returncode == 2, res.stderr
    assert "serving form" in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.iterdir())


def test_external_data_stays_external(tmp_path: Path) -> None:
    src = tmp_path / "unet.onnx"
    export_onnx(ModelSource(preset="tiny"), src, check=False, external_data_threshold=1)
    out = tmp_path / "out" / "unet.serving.onnx"
    out.parent.mkdir()
    res = _cli("optimize", src, "--for", "onnxruntime", "-o", out)
    assert res.returncode == 0, res.stderr
    # Not tuned: the output says the rules chose, unmeasured here, and how to measure.
    assert re.search(r"chosen by +│ the rules", res.stdout) and "not measured on this machine: --tune" in res.stdout
    assert re.search(r"made on +│", res.stdout) and "tuned on" not in res.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["unet.serving.onnx", "unet.serving.onnx.data"]
    model = onnx.load(str(out), load_external_data=False)
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    assert SERVING_KEY in {p.key for p in model.metadata_props}
    res = _cli("verify", out, "--shapes", "1x16x16")
    assert res.returncode == 0, res.stderr


def test_bad_serving_options_are_one_line(tiny_onnx: Path, tmp_path: Path) -> None:
    for args, needle in ((["--for", "openvino"], "--for must be one of"),
                         (["--for", "onnxruntime", "--provider", "tpu"], "--provider must be one of"),
                         (["--for", "onnxruntime", "--serving-attention", "flash"], "serving attention must be one of")):
        res = _cli("optimize", tiny_onnx, "-o", tmp_path / "x.onnx", *args)
        assert res.returncode == 2 and needle in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_triton_repository_is_readable_by_another_user(tiny_onnx: Path, tmp_path: Path) -> None:
    """A server running as another user (as in many containers) must read the folder and its files."""
    old = os.umask(0o022)
    try:
        res = _cli("triton", tiny_onnx, "--repo", tmp_path / "repo", "--form", "serving")
    finally:
        os.umask(old)
    assert res.returncode == 0, res.stderr
    model_dir = tmp_path / "repo" / tiny_onnx.stem
    for path in [model_dir, *model_dir.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    ops = {n.op_type for n in onnx.load(str(model_dir / "1" / "model.onnx")).graph.node}
    assert "MultiHeadAttention" in ops or "Loop" in ops


def test_triton_old_attention_option_still_works(tiny_onnx: Path, tmp_path: Path) -> None:
    res = _cli("triton", tiny_onnx, "--repo", tmp_path / "repo", "--attention", "as-is")
    assert res.returncode == 0, res.stderr
    assert "deprecated: --attention is now --form" in res.stderr
    copied = onnx.load(str(tmp_path / "repo" / tiny_onnx.stem / "1" / "model.onnx"))
    assert any(n.op_type == "Attention" for n in copied.graph.node)


def test_the_in_memory_serving_form_leaves_no_staged_file(tiny_onnx: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving form built for a session is staged as a file ONNX Runtime maps, and gone once it has."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    runner = OrtRunner(tiny_onnx).activate()
    assert runner.attention_rewritten > 0 and runner._staged is None
    assert list(tmp_path.iterdir()) == []
    feeds = runner.spec.make_inputs(1, 16, 16)
    want = OrtRunner(tiny_onnx, attention="as-is").activate().infer(feeds)
    np.testing.assert_allclose(runner.infer(feeds)["out"], want["out"], atol=1e-4, rtol=1e-3)
    runner.deactivate()
    assert list(tmp_path.iterdir()) == []
