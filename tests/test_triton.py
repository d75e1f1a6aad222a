"""`attn-export triton`: config.pbtxt parsed with tritonclient's ModelConfig, for ONNX files and engine sidecars."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from attn_export import cli
from attn_export.errors import UsageError
from attn_export.exporter.foreign import spec_of
from attn_export.exporter.onnx_export import export_onnx
from attn_export.models.loader import ModelSource
from attn_export.triton import model_config_pb2, write_model_repository



def _pb2():
    # tritonclient and protobuf are test dependencies: a missing one fails here rather than skipping.
    return model_config_pb2()


def _parse(path: Path):
    from google.protobuf import text_format

    pb2 = _pb2()
    return pb2, text_format.Parse(path.read_text(), pb2.ModelConfig())


def _io(cfg) -> dict[str, tuple[int, list[int], list[int] | None]]:
    out = {}
    for t in list(cfg.input) + list(cfg.output):
        out[t.name] = (t.data_type, list(t.dims), list(t.reshape.shape) if t.HasField("reshape") else None)
    return out


def test_onnx_repository(tiny_onnx: Path, tmp_path: Path) -> None:
    m = write_model_repository(tiny_onnx, tmp_path / "repo", name="ddpm_tiny", instances=2, form="serving")
    assert m.validated
    served = onnx.load(str(tmp_path / "repo" / "ddpm_tiny" / "1" / "model.onnx"))
    assert m.attention_rewritten == sum(n.op_type == "Attention" for n in onnx.load(str(tiny_onnx)).graph.node) > 0
    # CPU instances: every site as MultiHeadAttention or in query chunks (one Loop each), as OrtRunner serves it.
    assert sum(n.op_type == "Loop" and "/chunked/" in n.name or n.op_type == "MultiHeadAttention"
               for n in served.graph.node) == m.attention_rewritten
    assert m.attention_kind and m.attention_kind in m.config_text
    assert spec_of(tmp_path / "repo" / "ddpm_tiny" / "1" / "model.onnx") == spec_of(tiny_onnx)
    pb2, cfg = _parse(tmp_path / "repo" / "ddpm_tiny" / "config.pbtxt")
    assert cfg.name == "ddpm_tiny" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 8
    assert [t.name for t in cfg.input] == ["x", "t"] and [t.name for t in cfg.output] == ["out"]
    io = _io(cfg)
    # Batch dim omitted (max_batch_size > 0); H and W dynamic.
    assert io["x"] == (pb2.TYPE_FP32, [3, -1, -1], None)
    assert io["t"] == (pb2.TYPE_INT64, [1], [])  # batch-only tensor: [1] reshaped to a scalar per item
    assert io["out"] == (pb2.TYPE_FP32, [3, -1, -1], None)
    assert len(cfg.instance_group) == 1
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU
    assert cfg.HasField("dynamic_batching")
    # ONNX Runtime's memory pattern off on CPU instances, as OrtRunner does.
    assert cfg.parameters["enable_mem_pattern"].string_value == "0"


def test_onnx_without_batching_keeps_batch_dim(tiny_onnx: Path, tmp_path: Path) -> None:
    m = write_model_repository(tiny_onnx, tmp_path, name="m", max_batch=0, kind="gpu", version=3, form="serving")
    # GPU instances: ONNX Runtime's MultiHeadAttention (flash attention on CUDA).
    served = onnx.load(str(tmp_path / "m" / "3" / "model.onnx"))
    assert sum(n.op_type == "MultiHeadAttention" for n in served.graph.node) == m.attention_rewritten > 0
    pb2, cfg = _parse(tmp_path / "m" / "config.pbtxt")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    io = _io(cfg)
    assert io["x"] == (pb2.TYPE_FP32, [-1, 3, -1, -1], None)
    assert io["t"] == (pb2.TYPE_INT64, [-1], None)
    assert cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    assert "enable_mem_pattern" not in cfg.parameters
    assert (tmp_path / "m" / "3" / "model.onnx").is_file()


def test_onnx_external_data_is_copied_and_loads(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    export_onnx(ModelSource(preset="tiny"), src / "unet.onnx", check=False, external_data_threshold=1)
    assert (src / "unet.onnx.data").is_file()
    import onnxruntime as ort

    ref = ort.InferenceSession(str(src / "unet.onnx"), providers=["CPUExecutionProvider"])
    for attention in ("written", "serving"):
        m = write_model_repository(src / "unet.onnx", tmp_path / attention, form=attention)
        assert m.name == "unet"
        vdir = tmp_path / attention / "unet" / "1"
        assert sorted(p.name for p in vdir.iterdir()) == ["model.onnx", "unet.onnx.data"]
        # The copy runs on its own, from the repository folder (what Triton's ORT backend does).
        spec = spec_of(vdir / "model.onnx")
        feeds = spec.make_inputs(1, 16, 16)
        sess = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])
        got, want = sess.run(None, feeds)[0], ref.run(None, feeds)[0]
        ops = {n.op_type for n in onnx.load(str(vdir / "model.onnx"), load_external_data=False).graph.node}
        if attention == "written":
            np.testing.assert_array_equal(got, want)
            assert m.attention_rewritten == 0 and "MultiHeadAttention" not in ops
        else:
            # The serving form (CPU instances), the weights still in the copied data file.
            sites = sum(n.op_type == "Attention" for n in onnx.load(str(src / "unet.onnx"), load_external_data=False).graph.node)
            assert m.attention_rewritten == sites > 0 and ops & {"Loop", "MultiHeadAttention"} and "Attention" not in ops
            assert m.attention_kind in m.config_text
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def _fake_engine(folder: Path, spec_dict: dict, x_dtype: str = "float16") -> Path:
    """A dummy plan with a sidecar as `attn-export trt` writes it (two profiles, fp16 I/O)."""
    engine = folder / "unet.plan"
    engine.write_bytes(b"not a real plan, only its description is read")
    profiles = [{"min": [1, 16, 16], "opt": [2, 32, 32], "max": [4, 32, 32]},
                {"min": [1, 32, 32], "opt": [8, 64, 64], "max": [16, 64, 64]}]
    sidecar = {
        "format": "attn-export-engine/1", "engine_file": engine.name, "engine_sha256": "0" * 64,
        "tensorrt_version": "10.14.1.48", "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
        "hardware_compatibility": "none", "precision": "fp16",
        "profiles": [{**p, "shapes": {}} for p in profiles],
        "io": [
            {"name": "x", "mode": "input", "dtype": x_dtype, "shape": [-1, 3, -1, -1]},
            {"name": "t", "mode": "input", "dtype": "int64", "shape": [-1]},
            {"name": "out", "mode": "output", "dtype": x_dtype, "shape": [-1, 3, -1, -1]},
        ],
        "onnx": {"path": "unet.onnx", "sha256": "1" * 64}, "model": spec_dict, "fusion": {}, "build": {},
    }
    (folder / "unet.plan.json").write_text(json.dumps(sidecar))
    return engine


def test_engine_repository_from_sidecar(tiny_onnx: Path, tmp_path: Path) -> None:
    engine = _fake_engine(tmp_path, spec_of(tiny_onnx).to_dict())
    m = write_model_repository(engine, tmp_path / "repo", name="ddpm", instances=3)
    assert m.platform == "tensorrt_plan"
    assert (tmp_path / "repo" / "ddpm" / "1" / "model.plan").read_bytes() == engine.read_bytes()
    pb2, cfg = _parse(tmp_path / "repo" / "ddpm" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan"
    assert cfg.max_batch_size == 16  # the largest profile's max batch
    io = _io(cfg)
    assert io["x"] == (pb2.TYPE_FP16, [3, -1, -1], None)
    assert io["t"] == (pb2.TYPE_INT64, [1], [])
    assert io["out"] == (pb2.TYPE_FP16, [3, -1, -1], None)
    assert cfg.instance_group[0].count == 3 and cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    assert "10.14.1.48" in (tmp_path / "repo" / "ddpm" / "config.pbtxt").read_text()  # the TensorRT it needs


def test_engine_refusals(tiny_onnx: Path, tmp_path: Path) -> None:
    engine = _fake_engine(tmp_path, spec_of(tiny_onnx).to_dict(), x_dtype="float32")
    with pytest.raises(UsageError, match="GPU only"):
        write_model_repository(engine, tmp_path / "repo", kind="cpu")
    with pytest.raises(UsageError, match="exceeds the engine's largest profile batch 16"):
        write_model_repository(engine, tmp_path / "repo", max_batch=32)
    m = write_model_repository(engine, tmp_path / "repo", max_batch=4)
    assert m.max_batch_size == 4
    _, cfg = _parse(m.config_path)
    assert cfg.max_batch_size == 4


def test_refuses_overwrite_without_force(tiny_onnx: Path, tmp_path: Path) -> None:
    write_model_repository(tiny_onnx, tmp_path, name="m")
    with pytest.raises(UsageError, match="exists.*--force"):
        write_model_repository(tiny_onnx, tmp_path, name="m", instances=4)
    m = write_model_repository(tiny_onnx, tmp_path, name="m", instances=4, force=True)
    _, cfg = _parse(m.config_path)
    assert cfg.instance_group[0].count == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or old folders left


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "a/b"}, "bad model name"), ({"version": 0}, "--model-version"), ({"instances": 0}, "--instances"),
    ({"kind": "tpu"}, "--kind"), ({"max_batch": -1}, "--max-batch"),
])
def test_bad_options(tiny_onnx: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        write_model_repository(tiny_onnx, tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli(tiny_onnx: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["triton", str(tiny_onnx), "--repo", str(tmp_path / "repo"), "--name", "ddpm", "--max-batch", "4"]
    res = runner.invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    assert "onnxruntime_onnx" in res.output and "config.pbtxt" in res.output
    _, cfg = _parse(tmp_path / "repo" / "ddpm" / "config.pbtxt")
    assert cfg.max_batch_size == 4
    res = runner.invoke(cli.app, args)
    # The command turns this library error into one line and exit code 2.
    assert res.exit_code == 2 and "exists" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
    assert runner.invoke(cli.app, args + ["--force"]).exit_code == 0


def test_old_option_spelling_still_works_with_a_deprecation_line(tiny_onnx: Path, tmp_path: Path) -> None:
    # --version meant both "print the version" and Triton's version folder: the folder is --model-version now.
    runner = CliRunner()
    res = runner.invoke(cli.app, ["triton", str(tiny_onnx), "--repo", str(tmp_path / "r"), "--version", "3"])
    assert res.exit_code == 0, res.output
    assert "deprecated: --version is now --model-version" in res.output and (tmp_path / "r" / tiny_onnx.stem / "3").is_dir()
    res = runner.invoke(cli.app, ["triton", str(tiny_onnx), "--repo", str(tmp_path / "s"), "--model-version", "2"])
    assert res.exit_code == 0 and "deprecated" not in res.output and (tmp_path / "s" / tiny_onnx.stem / "2").is_dir()
    res = runner.invoke(cli.app, ["triton", str(tiny_onnx), "--repo", str(tmp_path / "t"), "--version", "2",
                                  "--model-version", "2"])
    assert res.exit_code != 0 and not (tmp_path / "t").exists()
