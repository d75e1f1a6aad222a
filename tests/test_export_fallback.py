"""The default exporter takes what the TorchScript tracer cannot, and a model's own errors are reported as its own.

The models (tests/export_zoo.py) are written here in the style of released UNet code: attention run through a
``torch.autograd.Function`` (gradient checkpointing), a blur kernel built at run time for a strided convolution.
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import onnx
import pytest

from attn_export.errors import ExportFailed
from attn_export.exporter.metadata import find_spec
from attn_export.exporter.onnx_export import export_onnx
from attn_export.graph import find_attention
from attn_export.models.loader import ModelSource
from conftest import run_cli_in_process as run


def _logs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "attn-export-*.export.log")))


def test_autograd_function_falls_back_to_dynamo(tmp_path: Path) -> None:
    before = _logs()
    out = tmp_path / "g.onnx"
    r = export_onnx(ModelSource(model="export_zoo:guided"), out)
    assert r.exporter == "dynamo" and r.fallback and r.fallback.startswith("torchscript: RuntimeError")
    assert r.check is not None and r.check["passed"]
    model = onnx.load(str(out))
    assert find_spec(model, out).exporter == "dynamo"
    assert len(find_attention(model)) == 1
    assert _logs() == before  # the exporters' log goes once an exporter succeeds


def test_runtime_kernel_one_line_no_ir_dump(tmp_path: Path, wide_console) -> None:
    r = run("onnx", "--model", "export_zoo:runtime_kernel", "-o", tmp_path / "r.onnx")
    assert r.exit_code == 0, r.output
    assert "dynamo (torch.export), after the TorchScript tracer failed" in r.output and "SymbolicValueError" in r.output
    assert "graph(" not in r.output and len(r.output) < 6000  # no TorchScript IR on the console


def test_presets_keep_the_tracer(tmp_path: Path) -> None:
    r = export_onnx(ModelSource(preset="tiny"), tmp_path / "t.onnx", check=False)
    assert r.exporter == "torchscript" and r.fallback is None
    assert find_spec(onnx.load(str(tmp_path / "t.onnx")), "t").exporter == "torchscript"


def test_forced_exporter_failure_names_its_log(tmp_path: Path) -> None:
    before = _logs()
    with pytest.raises(ExportFailed) as exc:
        export_onnx(ModelSource(model="export_zoo:guided"), tmp_path / "g.onnx", exporter="torchscript")
    message = str(exc.value)
    assert exc.value.exit_code == 1 and "\n" not in message and "torchscript: RuntimeError" in message
    new = _logs() - before
    assert len(new) == 1 and next(iter(new)) in message
    log = Path(next(iter(new)))
    assert "the torchscript exporter failed" in log.read_text() and "Traceback" in log.read_text()
    log.unlink()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("factory, raised, says", [
    ("export_zoo:broken", "ValueError", "this model wants square images"),
    ("export_zoo:always_broken", "AttributeError", "no_such_method"),
])
def test_the_models_own_error(factory: str, raised: str, says: str, tmp_path: Path) -> None:
    r = run("onnx", "--model", factory, "-o", tmp_path / "m.onnx")
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and "internal error" not in line and raised in line and says in line
    assert "x:" in line  # the input shapes it was called with
    assert list(tmp_path.iterdir()) == []
