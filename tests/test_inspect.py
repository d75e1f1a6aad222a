"""`attn-export inspect`: ONNX structure, attention sites, precision shares, engine sidecars."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from attn_export.errors import UsageError
from attn_export.exporter.foreign import spec_of
from attn_export.inspection import inspect_artifact


from conftest import run_cli_in_process as run


@pytest.mark.parametrize("fixture,form,description", [
    ("tiny_onnx", "op", "ONNX Attention op"),
    ("tiny_decomposed_onnx", "decomposed", "MatMul/Softmax/MatMul"),
])
def test_tiny_attention_sites(request, fixture: str, form: str, description: str) -> None:
    path = request.getfixturevalue(fixture)
    d = inspect_artifact(path).to_dict()
    assert d["kind"] == "onnx" and d["opset"] == 23
    assert d["attention_summary"]["count"] == 4 and d["attention_summary"]["forms"] == {form: 4}
    sites = d["attention"]
    assert [a["form_description"] for a in sites] == [description] * 4
    # tiny: attention at level 1 (down, two up blocks) and the middle block at level 2; C = 32 everywhere.
    assert [a["seq_len"] for a in sites] == ["(height/2)*(width/2)", "(height/4)*(width/4)", "(height/2)*(width/2)",
                                             "(height/2)*(width/2)"]
    assert [a["level"] for a in sites] == [1, 2, 1, 1] and all(a["heads"] == 1 for a in sites)
    assert all(a["head_size"] == 32 and a["scale_before_product"] and a["dtype"] == "float32" for a in sites)
    assert all(a["trt_fusion"] == "fusable once FP16" for a in sites)
    hist = d["op_histogram"]
    if form == "op":
        assert hist["Attention"] == 4 and "Softmax" not in hist
    else:
        assert hist["Softmax"] == 4 and hist["MatMul"] == 8 and "Attention" not in hist


def test_io_metadata_size_and_precision(tiny_onnx: Path) -> None:
    d = inspect_artifact(tiny_onnx).to_dict()
    assert d["inputs"] == [
        {"name": "x", "dtype": "float32", "dims": ["batch", 3, "height", "width"]},
        {"name": "t", "dtype": "int64", "dims": ["batch"]},
    ]
    assert d["outputs"] == [{"name": "out", "dtype": "float32", "dims": ["batch", 3, "height", "width"]}]
    assert d["file_size"] == tiny_onnx.stat().st_size and d["external_data"] == []
    assert d["spec"] == spec_of(tiny_onnx).to_dict()
    for part in ("initializers", "activations"):
        shares = d["precision"][part]
        assert "float16" not in shares
        assert shares["float32"]["element_share"] > 0.99
        assert sum(v["tensor_share"] for v in shares.values()) == pytest.approx(1.0)
    assert d["precision"]["initializers"]["float32"]["elements"] >= d["num_parameters"] - 100


def test_fp16_share_and_fusable_verdict(tiny_onnx: Path, tmp_path: Path) -> None:
    """Weights stored in FP16 (cast back to FP32 in the graph) show up in the initializer share."""
    model = onnx.load(str(tiny_onnx))
    g = model.graph
    big = [i for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4]
    for init in big:
        arr = numpy_helper.to_array(init).astype(np.float16)
        old = init.name
        init.CopyFrom(numpy_helper.from_array(arr, old + "_fp16"))
        g.node.insert(0, helper.make_node("Cast", [old + "_fp16"], [old], to=onnx.TensorProto.FLOAT))
    path = tmp_path / "half_weights.onnx"
    onnx.save(model, str(path))
    shares = inspect_artifact(path).to_dict()["precision"]["initializers"]
    assert shares["float16"]["tensors"] == len(big)
    assert 0.5 < shares["float16"]["element_share"] < 1.0


def test_external_data_counts_in_size(tiny_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=1024)
    d = inspect_artifact(path).to_dict()
    assert d["external_data"] == [str(tmp_path / "ext.onnx.data")]
    assert d["file_size"] == path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    assert d["attention_summary"]["count"] == 4 and d["attention"][0]["head_size"] == 32


def test_cli_table_and_json(tiny_decomposed_onnx: Path, wide_console) -> None:
    result = run("inspect", tiny_decomposed_onnx)
    assert result.exit_code == 0, result.output
    for needle in ("opset", "input x", "attention: 4 site(s)", "MatMul/Softmax/MatMul", "fusable", "float32"):
        assert needle in result.stdout, needle
    result = run("inspect", tiny_decomposed_onnx, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)  # JSON only: nothing else on stdout
    assert data["attention_summary"]["forms"] == {"decomposed": 4}


def test_trt_readiness_flag(tiny_onnx: Path, tmp_path: Path, wide_console) -> None:
    result = run("inspect", tiny_onnx, "--trt", "--target", "10.14")
    assert result.exit_code == 0, result.output
    assert "readiness" in result.stdout and "attention-fp32" in result.stdout
    # An FP32 file builds, but its attention will not fuse: never "ready".
    assert "ready" not in result.stdout.split()[-30:] and "will not fuse until FP16" in result.stdout
    data = json.loads(run("inspect", tiny_onnx, "--trt", "--json").stdout)
    assert data["trt_readiness"]["ok"] is True and data["trt_readiness"]["verdict"] != "ready"
    # The Attention op is unknown to TensorRT 10.12's parser: an error, exit 1.
    result = run("inspect", tiny_onnx, "--trt", "--target", "10.12")
    assert result.exit_code == 1, result.output
    assert "unsupported-op" in result.stdout


def test_engine_sidecar(tiny_onnx: Path, tmp_path: Path, wide_console) -> None:
    from attn_export.engines.profiles import Profile
    from attn_export.engines.sidecar import make_sidecar, sidecar_path, write_sidecar

    engine = tmp_path / "tiny.engine"
    engine.write_bytes(b"plan bytes")
    fusion = {"summary": "3/4 attention blocks fused; /mids.0/attention: not fused (head size)",
              "blocks": [{"name": "/downs.2/attention", "form": "op", "head_size": 32, "dtype": "float16", "fused": True,
                          "layers": [], "tactics": [], "reason": None}]}
    write_sidecar(sidecar_path(engine), make_sidecar(
        engine_path=engine, engine_sha256="0" * 64, tensorrt_version="10.14.1.48", gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0", profiles=[Profile((1, 32, 32), (1, 64, 64), (4, 128, 128))], spec=spec_of(tiny_onnx),
        io=[{"name": "x", "mode": "input", "dtype": "float16", "shape": [-1, 3, -1, -1]}], onnx_path=tiny_onnx,
        onnx_sha256="1" * 64, precision="fp16", fusion=fusion,
    ))
    d = inspect_artifact(engine).to_dict()
    assert d["kind"] == "engine" and d["tensorrt_version"] == "10.14.1.48" and d["precision"] == "fp16"
    assert d["profiles"][0]["max"] == [4, 128, 128] and d["gpu"]["compute_capability"] == "9.0"
    assert d["fusion"]["summary"].startswith("3/4") and d["file_size"] == len(b"plan bytes")
    result = run("inspect", engine)
    assert result.exit_code == 0, result.output
    for needle in ("10.14.1.48", "min 1x32x32, opt 1x64x64, max 4x128x128", "3/4 attention blocks fused", "fp16"):
        assert needle in result.stdout, needle
    assert json.loads(run("inspect", engine, "--json").stdout)["io"][0]["dtype"] == "float16"
    # --trt reads ONNX, not engines.
    assert run("inspect", engine, "--trt").exit_code == 2


def test_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        inspect_artifact(tmp_path / "missing.onnx")
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x00not onnx")
    result = run("inspect", bad)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "not a readable ONNX file" in result.stderr
    lonely = tmp_path / "x.plan"
    lonely.write_bytes(b"x")
    result = run("inspect", lonely)
    assert result.exit_code == 2 and "not found" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["op", "decomposed"])
def test_ddpm_cifar10_has_six_sites(export_model, attention: str) -> None:
    d = inspect_artifact(export_model("ddpm-cifar10", attention)).to_dict()
    assert d["attention_summary"] == {"count": 6, "forms": {attention: 6}, "rewritable": 6,
                                     "fusion": {"fusable once FP16": 6}}
    assert sorted(a["seq_len"] for a in d["attention"]) == ["(height/2)*(width/2)"] * 5 + ["(height/8)*(width/8)"]
    assert all(a["head_size"] == 256 for a in d["attention"])


def test_fp16_export_is_fusable(tiny_onnx: Path, tmp_path: Path) -> None:
    from attn_export.exporter.fp16 import convert_fp16

    half = tmp_path / "tiny_fp16.onnx"
    convert_fp16(tiny_onnx, half, check=False)
    d = inspect_artifact(half).to_dict()
    assert d["attention_summary"]["fusion"] == {"fusable": 4}
    assert all(a["dtype"] == "float16" for a in d["attention"])
    assert d["precision"]["initializers"]["float16"]["element_share"] > 0.5
