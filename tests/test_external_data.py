"""An export with its weights in an external data file, through every command's library call.

The threshold is lowered so the tiny preset takes the path models over 2 GB take.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import numpy as np

from attn_export import convert_fp16
from attn_export.exporter import weights
from attn_export.exporter.onnx_export import export_onnx
from attn_export.inspection import inspect_onnx
from attn_export.models.loader import ModelSource
from attn_export.runners.ort_runner import OrtRunner
from attn_export.triton import write_model_repository
from attn_export.verify import verify


@pytest.fixture(scope="module")
def external_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ext")
    r = export_onnx(ModelSource(preset="tiny"), folder / "unet.onnx", external_data_threshold=1024)
    assert r.external_data == folder / "unet.onnx.data" and r.check is not None
    return r.path


def test_export_writes_model_and_data_only(external_onnx: Path) -> None:
    assert sorted(p.name for p in external_onnx.parent.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    light = onnx.load(str(external_onnx), load_external_data=False)
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in light.graph.initializer)


def test_verify_reads_external_data(external_onnx: Path) -> None:
    assert verify(external_onnx, shapes=[(1, 16, 16)]).passed


def test_inspect_counts_the_data_file(external_onnx: Path) -> None:
    d = inspect_onnx(external_onnx).to_dict()
    assert d["external_data"] == [str(external_onnx.parent / "unet.onnx.data")]
    assert d["file_size"] == external_onnx.stat().st_size + (external_onnx.parent / "unet.onnx.data").stat().st_size


def test_triton_copies_the_data_file(external_onnx: Path, tmp_path: Path) -> None:
    write_model_repository(external_onnx, tmp_path / "repo")
    assert sorted(p.name for p in (tmp_path / "repo" / "unet" / "1").iterdir()) == ["model.onnx", "unet.onnx.data"]


def test_fp16_of_an_external_export(external_onnx: Path, tmp_path: Path) -> None:
    # Under 2 GB the FP16 result fits one protobuf and is written as one file.
    r = convert_fp16(external_onnx, tmp_path / "unet.fp16.onnx")
    assert r.check is not None and r.check["passed"] and r.emulation is not None and r.emulation.ok
    assert [p.name for p in tmp_path.iterdir()] == ["unet.fp16.onnx"]


def test_fp16_output_over_the_threshold_keeps_a_data_file(external_onnx: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The path an FP16 model over 2 GB takes: NAME.onnx + NAME.onnx.data, checked like any other output.
    monkeypatch.setattr(weights, "EXTERNAL_DATA_THRESHOLD", 1024)
    out = tmp_path / "unet.fp16.onnx"
    r = convert_fp16(external_onnx, out)
    assert r.check is not None and r.check["passed"]
    assert r.external_data == tmp_path / "unet.fp16.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.fp16.onnx", "unet.fp16.onnx.data"]
    assert r.size_bytes == out.stat().st_size + r.external_data.stat().st_size
    light = onnx.load(str(out), load_external_data=False)
    locations = {e.value for i in light.graph.initializer for e in i.external_data if e.key == "location"}
    assert locations == {"unet.fp16.onnx.data"}
    # Nothing but FP16 weights and the FP32 ones FP32 nodes read: the FP32 copies of converted weights are gone.
    assert r.external_data.stat().st_size < 0.75 * (external_onnx.parent / "unet.onnx.data").stat().st_size
    assert verify(out, shapes=[(1, 16, 16)]).passed
    assert inspect_onnx(out).to_dict()["external_data"] == [str(r.external_data)]


def test_serving_form_of_an_external_file(external_onnx: Path) -> None:
    # MultiHeadAttention without loading the weights: ONNX Runtime reads them from the file's folder.
    served = OrtRunner(external_onnx).activate()
    as_is = OrtRunner(external_onnx, attention="as-is").activate()
    assert served.attention_rewritten > 0 and as_is.attention_rewritten == 0
    feeds = served.spec.make_inputs(1, 16, 16, seed=3)
    a, b = served.infer(feeds), as_is.infer(feeds)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-4)
