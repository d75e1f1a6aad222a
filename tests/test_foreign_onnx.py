"""ONNX files this tool did not export: inspect, optimize, fp16 and verify with --shapes and --reference."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

import attention_zoo
from attn_export.errors import UsageError
from attn_export.exporter.foreign import describe_graph, parse_input_shapes
from attn_export.graph import find_attention
from conftest import run_cli_in_process as run

SHAPES = ["noisy:1x1x32x32,sigma:1,difficulty:1", "noisy:2x1x16x40"]


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sigma-conditioned UNet exported by plain torch.onnx.export at opset 18: Einsum and MatMul attention."""
    path = tmp_path_factory.mktemp("foreign") / "denoiser.onnx"
    attention_zoo.foreign_onnx(str(path))
    model = onnx.load(str(path))
    assert not model.metadata_props and model.opset_import[0].version == 18
    return path


def _cli(*args: object) -> tuple[int, str]:
    r = run(*args)
    text = r.output + (str(r.exception) if r.exception and not isinstance(r.exception, SystemExit) else "")
    return r.exit_code, text


def test_description_from_the_graph(foreign: Path) -> None:
    spec = describe_graph(onnx.load(str(foreign)), origin="f")
    assert [(t.name, t.dtype, t.dims) for t in spec.inputs] == [
        ("noisy", "float32", ["batch", 1, "height", "width"]), ("sigma", "float32", ["batch"]),
        ("difficulty", "float32", ["batch"])]
    assert parse_input_shapes(SHAPES, spec) == [(1, 32, 32), (2, 16, 40)]
    with pytest.raises(UsageError, match="sigma must be 2"):
        parse_input_shapes(["noisy:2x1x16x16,sigma:3"], spec)
    with pytest.raises(UsageError, match="names nope"):
        parse_input_shapes(["noisy:1x1x8x8,nope:1"], spec)
    feeds = spec.make_inputs(4, 8, 8)
    assert feeds["sigma"].shape == (4,) and 0 <= feeds["sigma"].min() and feeds["sigma"].max() <= 1


def test_inspect_finds_every_site(foreign: Path, wide_console) -> None:
    code, out = _cli("inspect", foreign, "--json")
    assert code == 0, out
    d = json.loads(out)
    assert d["spec"] is None and d["attention_summary"]["count"] == 3
    assert d["attention_summary"]["forms"] == {"einsum": 2, "decomposed": 1}
    code, out = _cli("inspect", foreign, "--trt")
    assert "3 of 3 attention site(s) will not fuse" in out


def test_optimize_fp16_verify(foreign: Path, tmp_path: Path, wide_console) -> None:
    opt = tmp_path / "opt.onnx"
    code, out = _cli("optimize", foreign, "-o", opt, *[a for s in SHAPES for a in ("--shapes", s)])
    assert code == 0, out
    model = onnx.load(str(opt))
    assert model.opset_import[0].version == 23
    sites = find_attention(model)
    assert len(sites) == 3 and all(s.form == "op" for s in sites)
    # The optimized file matches the input under verify's pass rule, at shapes the check never saw.
    code, out = _cli("verify", opt, "--reference", foreign, "--shapes", "noisy:3x1x24x8",
                     "--input-range", "sigma:0.002:80")
    assert code == 0 and "PASSED" in out, out
    half = tmp_path / "half.onnx"
    code, out = _cli("fp16", opt, "-o", half, "--shapes", "noisy:1x1x32x32", "--shapes", "noisy:2x1x48x32")
    assert code == 0, out
    code, out = _cli("inspect", half, "--json")
    assert json.loads(out)["attention_summary"]["fusion"] == {"fusable": 3}
    code, out = _cli("verify", half, "--reference", foreign, "--shapes", "noisy:1x1x40x24")
    assert code == 0 and "PASSED" in out, out
    # A reference that is another model: the same pass rule fails it, exit 1.
    other = tmp_path / "other.onnx"
    attention_zoo.foreign_onnx(str(other), opset=17)
    m = onnx.load(str(other))
    for init in m.graph.initializer:
        if init.name.endswith("out.weight"):
            arr = onnx.numpy_helper.to_array(init) * 1.5
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(other))
    code, out = _cli("verify", opt, "--reference", other, "--shapes", "noisy:1x1x16x16")
    assert code == 1 and "FAIL" in out, out


def test_foreign_needs_shapes_and_reference(foreign: Path, tmp_path: Path) -> None:
    code, out = _cli("verify", foreign)
    assert code == 2 and "--reference" in out
    code, out = _cli("verify", foreign, "--reference", foreign)
    assert code == 2 and "--shapes noisy:1x1x64x64" in out
    code, out = _cli("fp16", foreign, "-o", tmp_path / "h.onnx")
    assert code == 2 and "--shapes" in out and not (tmp_path / "h.onnx").exists()
    code, out = _cli("optimize", foreign, "-o", tmp_path / "o.onnx", "--shapes", "noisy:1x1x8")
    assert code == 2 and "4-D" in out


def test_optimize_keeps_external_data(foreign: Path, tmp_path: Path) -> None:
    src = tmp_path / "ext.onnx"
    model = onnx.load(str(foreign))
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
                    size_threshold=256)
    out = tmp_path / "out" / "ext.opt.onnx"
    out.parent.mkdir()
    code, text = _cli("optimize", src, "-o", out, "--attention", "decomposed", "--shapes", SHAPES[0])
    assert code == 0, text
    assert (out.parent / "ext.opt.onnx.data").is_file() and out.stat().st_size < 64 * 1024
    assert sorted(p.name for p in out.parent.iterdir()) == ["ext.opt.onnx", "ext.opt.onnx.data"]
    sites = find_attention(onnx.load(str(out)))
    assert len(sites) == 3 and all(s.canonical for s in sites)
