"""FP16 conversion: range audit, FP32 islands, agreement with PyTorch, planted overflow, `fp16` and `trt --fp16` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from attn_export.exporter.audit import FP16_MAX, audit_fp16, default_calibration_shapes, emulate_fp16, value_types
from attn_export import convert_fp16
from attn_export.exporter.foreign import spec_of
from attn_export.exporter.onnx_export import export_onnx
from attn_export.models.loader import ModelSource, load_model
from attn_export.spec import ReferenceOptions
from attn_export.verify import verify

CLI = [sys.executable, "-m", "attn_export.cli"]
NORM_OPS = {"InstanceNormalization", "GroupNormalization", "BatchNormalization", "LayerNormalization"}
# Shapes for the comparison with PyTorch: square, non-square with batch > 1, off-grid with batch 3.
TINY_SHAPES = [(1, 8, 8), (2, 16, 24), (3, 32, 20)]
PLANTED = "/mids.1/conv_1/Conv"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("ATTN_EXPORT_DEBUG", None)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> str:
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def _types(path: Path) -> tuple[onnx.ModelProto, dict[str, int]]:
    m = onnx.load(str(path))
    return m, value_types(m)


def check_fp16_file(path: Path, source: Path) -> onnx.ModelProto:
    """Structure of a converted file: checker, opset, FP32 I/O, Resize scales, attention FP16, spec copied."""
    onnx.checker.check_model(str(path), full_check=True)
    m, types = _types(path)
    onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True)
    src = onnx.load(str(source))
    assert [(o.domain, o.version) for o in m.opset_import] == [(o.domain, o.version) for o in src.opset_import]
    assert all(vi.type.tensor_type.elem_type == TensorProto.FLOAT for vi in m.graph.output)
    assert {vi.name: vi.type.tensor_type.elem_type for vi in m.graph.input} == {"x": TensorProto.FLOAT, "t": TensorProto.INT64}
    for n in m.graph.node:
        if n.op_type == "Resize":
            assert types[n.input[2]] == TensorProto.FLOAT  # scales stay FP32 (the schema fixes tensor(float))
            assert types[n.input[0]] == TensorProto.FLOAT16
        if n.op_type == "Attention":
            assert [types[i] for i in n.input[:3]] == [TensorProto.FLOAT16] * 3
        if n.op_type in NORM_OPS:
            assert types[n.input[0]] == TensorProto.FLOAT
        if n.op_type == "Cast":
            # Every added Cast changes the type (no fp16 -> fp16 no-ops).
            assert types.get(n.input[0]) != types.get(n.output[0])
    spec, src_spec = spec_of(path), spec_of(source)
    assert spec.precision == "fp16"
    assert {**spec.to_dict(), "precision": "fp32"} == src_spec.to_dict()
    return m


# ---------------------------------------------------------------------------------------------------------------------
# audit
# ---------------------------------------------------------------------------------------------------------------------
def test_default_calibration_shapes_vary(tiny_onnx: Path) -> None:
    spec = spec_of(tiny_onnx)
    shapes = default_calibration_shapes(spec)
    assert len(shapes) >= 3
    assert any(b > 1 for b, _, _ in shapes) and any(h != w for _, h, w in shapes)
    assert len({h * w for _, h, w in shapes}) >= 3  # several resolutions, not one
    for s in shapes:
        spec.check_shape(*s)


def test_default_calibration_shapes_too_costly_are_scaled_down(tiny_onnx: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Default calibration shapes whose activations pass the cap are scaled down, with a note; the user's are kept."""
    import attn_export.graph.memory as memory
    from attn_export.graph.memory import SizeModel

    spec = spec_of(tiny_onnx)
    shapes = default_calibration_shapes(spec)
    sizes = SizeModel(onnx.load(str(tiny_onnx), load_external_data=False), spec)
    need = {s: sizes.need(s) for s in shapes}
    cap = sorted(need.values())[-2]  # only the costliest shape passes it
    monkeypatch.setattr(memory, "DEFAULT_SHAPE_ACTIVATIONS", cap)
    result = convert_fp16(tiny_onnx, tmp_path / "t16.onnx")
    costliest = max(shapes, key=lambda s: need[s])
    used = [tuple(s) for s in result.audit.calibration_shapes]
    assert costliest not in used and all(sizes.need(s) <= cap for s in used)
    text = "x".join(map(str, costliest))
    note = next(n for n in result.notes if n.startswith(f"default calibration shape {text} "))
    assert "scaled down to" in note or "left out" in note
    assert f"--calibration-shapes {text} uses it" in note
    mine = convert_fp16(tiny_onnx, tmp_path / "mine.onnx", calibration_shapes=[costliest], check=False)
    assert [tuple(s) for s in mine.audit.calibration_shapes] == [costliest] and not mine.notes


@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_decomposed_onnx"])
def test_audit_tiny_islands(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    report = audit_fp16(path)
    model = onnx.load(str(path))
    norms = {n.name for n in model.graph.node if n.op_type in NORM_OPS}
    fp32 = set(report.fp32_node_names())
    assert norms and norms <= fp32
    assert {i.kind for i in report.fp32_nodes} == {"normalization", "time-embedding"}  # nothing out of range
    assert {report.island(n).kind for n in norms} == {"normalization"}
    trig = {n.name for n in model.graph.node if n.op_type in ("Sin", "Cos")}
    assert trig <= fp32
    attention_nodes = {n.name for n in model.graph.node if n.op_type in ("Attention", "Softmax", "MatMul")}
    assert attention_nodes and not attention_nodes & fp32  # attention runs in FP16
    assert len(report.attention) == 4
    for a in report.attention:
        assert 0 < a.logits_absmax < 100 and a.keys > 0
        assert a.logits_absmax == pytest.approx(a.raw_absmax * a.scale)
    assert not report.flagged and report.max_activation.absmax < 4096
    d = report.to_dict()
    json.dumps(d)
    assert d["fp32_nodes_by_kind"]["normalization"] == len(norms)
    assert len(d["calibration_shapes"]) >= 3


def test_audit_logits_match_decomposed_tensor(tiny_decomposed_onnx: Path) -> None:
    """In the decomposed form the logits exist as a tensor: the computed value must equal its absmax."""
    report = audit_fp16(tiny_decomposed_onnx, calibration_shapes=[(2, 16, 24)])
    model = onnx.load(str(tiny_decomposed_onnx))
    softmax_in = {n.name: n.input[0] for n in model.graph.node if n.op_type == "Softmax"}
    stats = {t.name: t.absmax for t in report.tensors}
    for a in report.attention:
        sm = next(n for n in a.nodes if n in softmax_in)
        assert a.logits_absmax == pytest.approx(stats[softmax_in[sm]], rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_decomposed_onnx"])
def test_convert_tiny_matches_pytorch(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    src = request.getfixturevalue(fixture)
    out = tmp_path / "tiny.fp16.onnx"
    r = convert_fp16(src, out)
    check_fp16_file(out, src)
    assert r.check and r.check["passed"] and r.emulation and r.emulation.ok
    assert r.nodes_fp16 > 5 * r.nodes_fp32 and r.casts_added > 0
    assert all(a["q"] == a["k"] == a["v"] == "float16" for a in r.attention)
    assert {i.node for i in r.fp32_nodes} == set(r.audit.fp32_node_names())
    rep = verify(out)  # the default sweep, at the FP16 default tolerances
    assert rep.precision == "fp16" and rep.passed, rep.failures()
    assert len(rep.shapes) >= 5
    for s in rep.shapes:
        assert max(o.max_abs for o in s.outputs) < 1e-2, s.shape
    json.dumps(r.to_dict())


def test_convert_fp16_io(tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "io16.onnx"
    convert_fp16(tiny_onnx, out, keep_io_types=False, check=False)
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert m.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    spec = spec_of(out)
    feeds = spec.make_inputs(2, 16, 24)
    assert feeds["x"].dtype == np.float16
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    loaded = load_model(ModelSource(preset="tiny"))
    with torch.no_grad():
        ref = loaded.module(torch.from_numpy(feeds["x"].astype(np.float32)), torch.from_numpy(feeds["t"])).numpy()
    assert got.dtype == np.float16 and np.abs(got.astype(np.float32) - ref).max() < 2e-2


def test_convert_refuses(tiny_onnx: Path, tmp_path: Path) -> None:
    from attn_export.errors import UsageError

    out = tmp_path / "a.onnx"
    out.write_bytes(b"keep")
    with pytest.raises(UsageError, match="exists"):
        convert_fp16(tiny_onnx, out)
    assert out.read_bytes() == b"keep"
    with pytest.raises(UsageError, match="threshold"):
        convert_fp16(tiny_onnx, tmp_path / "b.onnx", threshold=1e6)
    done = tmp_path / "c.onnx"
    convert_fp16(tiny_onnx, done, check=False)
    with pytest.raises(UsageError, match="already fp16"):
        convert_fp16(done, tmp_path / "d.onnx")
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave nothing behind


# ---------------------------------------------------------------------------------------------------------------------
# planted overflow
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny UNet whose mids.1.conv_1 outputs ~3e4 at 1x8x8 but ~9e4 (> 65504) at 32x32 and 64x64.

    All weights positive with the centre tap zeroed: at 8x8 the deepest level is 2x2, where each
    position sees 3 of the 8 live taps; larger maps have interior positions that see all 8. So
    the overflow appears only at larger H/W, and a one-small-shape calibration would miss it.
    """
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("planted")
    sd = {k: v.clone().contiguous() for k, v in load_model(ModelSource(preset="tiny")).module.state_dict().items()}
    w = sd["mids.1.conv_1.weight"].abs()
    w[:, :, 1, 1] = 0
    sd["mids.1.conv_1.weight"] = (w * 30000.0).contiguous()
    ckpt = folder / "planted.safetensors"
    save_file(sd, str(ckpt))
    path = folder / "planted.onnx"
    export_onnx(ModelSource(preset="tiny", checkpoint=ckpt), path, check=False)
    return path


def test_planted_overflow_audit(planted_onnx: Path) -> None:
    conv_out = PLANTED + "_output_0"
    small = audit_fp16(planted_onnx, calibration_shapes=[(1, 8, 8)])
    stat = next(t for t in small.tensors if t.name == conv_out)
    assert 4096 < stat.absmax < FP16_MAX  # one small shape: over the margin, but no overflow seen

    report = audit_fp16(planted_onnx)
    stat = next(t for t in report.tensors if t.name == conv_out)
    assert stat.overflows and stat.producer == PLANTED and stat.op_type == "Conv"
    assert stat.shape[1] * stat.shape[2] > 8 * 8 and stat.per_shape["1x8x8"] < FP16_MAX
    assert conv_out in {t.name for t in report.overflowing}
    island = report.island(PLANTED)
    assert island is not None and island.kind == "range"
    assert "overflows FP16" in island.reason and "x".join(map(str, stat.shape)) in island.reason
    # The consumer of the overflowing tensor stays FP32 too, so it never passes through FP16.
    assert report.island("/mids.1/Add") is not None
    d = report.to_dict()
    assert any(f["node"] == PLANTED and f["overflows_fp16"] for f in d["flagged"])


def test_planted_overflow_convert_and_force(planted_onnx: Path, tmp_path: Path) -> None:
    safe = tmp_path / "safe.onnx"
    ref = ReferenceOptions(checkpoint=planted_onnx.with_name("planted.safetensors"))
    r = convert_fp16(planted_onnx, safe, reference_model=ref)  # checks: verify vs PyTorch + emulation at the largest calibration shape
    assert PLANTED in {i.node for i in r.fp32_nodes}
    assert r.emulation is not None and r.emulation.ok
    _, types = _types(safe)
    assert types[PLANTED + "_output_0"] == TensorProto.FLOAT
    emu = emulate_fp16(safe, [(1, 64, 64), (2, 32, 32)])
    assert emu.ok, emu.to_dict()
    rep = verify(safe, shapes=[(1, 64, 64), (2, 32, 48)], reference_model=ref)
    assert rep.passed, rep.failures()
    assert all(o.nan_cand == 0 and o.inf_cand == 0 for s in rep.shapes for o in s.outputs)

    forced = tmp_path / "forced.onnx"
    rf = convert_fp16(planted_onnx, forced, force_fp16_nodes=[PLANTED], check=False)
    assert PLANTED not in {i.node for i in rf.fp32_nodes}
    emu = emulate_fp16(forced, [(1, 64, 64)])
    assert not emu.ok
    first = emu.first()
    assert first.node == PLANTED and first.tensor == PLANTED + "_output_0" and first.shape == (1, 64, 64)
    # At the small shape the forced node still fits FP16.
    assert emulate_fp16(forced, [(1, 8, 8)]).ok
    # And checking with emulation refuses to write it.
    from attn_export.errors import AttnExportError

    with pytest.raises(AttnExportError, match="overflows"):
        convert_fp16(planted_onnx, tmp_path / "refused.onnx", force_fp16_nodes=[PLANTED],
                     calibration_shapes=[(1, 8, 8), (1, 64, 64)], reference_model=ref)
    assert not (tmp_path / "refused.onnx").exists()


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
def test_cli_fp16(tiny_onnx: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "cli.fp16.onnx", tmp_path / "r.json"
    proc = run_cli("fp16", str(tiny_onnx), "-o", str(out), "--calibration-shapes", "1x8x8,2x16x24,1x32x32",
                   "--threshold", "2048", "--fp32-op", "Sigmoid", "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    assert "FP32 islands" in proc.stdout and "normalization" in proc.stdout and "vs PyTorch" in proc.stdout
    assert "attention logits" in proc.stdout and "casts added" in proc.stdout
    data = json.loads(report.read_text())
    assert data["audit"]["threshold"] == 2048 and data["audit"]["calibration_shapes"] == ["1x8x8", "2x16x24", "1x32x32"]
    assert data["audit"]["fp32_nodes_by_kind"]["op-type"] > 0
    m, types = _types(out)
    assert all(types[n.output[0]] == TensorProto.FLOAT for n in m.graph.node if n.op_type == "Sigmoid")
    assert_one_line_error(run_cli("fp16", str(tiny_onnx), "-o", str(out)), "exists")


def test_cli_fp16_bad_input(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("fp16", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx")), "not found")
    plain = tmp_path / "plain.onnx"
    x = onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(g), str(plain))
    # No attn-export description and no image-like input: nothing to calibrate with.
    assert_one_line_error(run_cli("fp16", str(plain), "-o", str(tmp_path / "o.onnx")), "no 4-D float input")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx at all")
    assert_one_line_error(run_cli("fp16", str(junk), "-o", str(tmp_path / "o.onnx")), "junk.onnx")


def _has_trt() -> bool:
    import importlib.util

    from attn_export.engines.trt_build import gpu_info

    return importlib.util.find_spec("tensorrt") is not None and gpu_info() is not None


@pytest.mark.skipif(_has_trt(), reason="TensorRT and a GPU are present: the build would run")
def test_cli_trt_fp16_without_tensorrt(tiny_onnx: Path, tmp_path: Path) -> None:
    engine = tmp_path / "unet.plan"
    proc = run_cli("trt", str(tiny_onnx), "--fp16", "-o", str(engine))
    line = assert_one_line_error(proc, "TensorRT")
    assert 'pip install ".[trt-cu12]"' in line
    assert "FP32 islands" in proc.stdout  # the conversion ran and was reported before the build step
    fp16 = tmp_path / "unet.fp16.onnx"
    assert fp16.is_file() and not engine.exists()
    check_fp16_file(fp16, tiny_onnx)
    rep = verify(fp16, shapes=[(1, 8, 8), (2, 16, 24)])
    assert rep.passed, rep.failures()
    # Run again: the FP16 file records the same source and settings, so it is reused, not converted again.
    before = fp16.stat().st_mtime_ns
    proc = run_cli("trt", str(tiny_onnx), "--fp16", "-o", str(engine))
    assert_one_line_error(proc, "TensorRT")
    assert "reusing" in proc.stdout and fp16.stat().st_mtime_ns == before
    # --fp16-onnx picks another place.
    other = tmp_path / "elsewhere.onnx"
    proc = run_cli("trt", str(tiny_onnx), "--fp16", "--fp16-onnx", str(other), "-o", str(engine),
                   "--calibration-shapes", "1x8x8,2x16x16")
    assert_one_line_error(proc, "TensorRT")
    assert other.is_file()


def test_cli_trt_profiles_checked_first(tiny_onnx: Path, tmp_path: Path) -> None:
    engine = tmp_path / "unet.plan"
    proc = run_cli("trt", str(tiny_onnx), "--fp16", "-o", str(engine), "--min", "1x30x32", "--opt", "1x32x32", "--max", "1x64x64")
    assert_one_line_error(proc, "multiple")
    assert not (tmp_path / "unet.fp16.onnx").exists()  # rejected before any conversion
    proc = run_cli("trt", str(tiny_onnx), "-o", str(engine), "--hardware-compat", "turing")
    assert_one_line_error(proc, "--hardware-compat")
    assert_one_line_error(run_cli("trt", str(tmp_path / "nope.onnx"), "-o", str(engine)), "not found")


# ---------------------------------------------------------------------------------------------------------------------
# larger presets
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddpm_cifar10_fp16(export_model, tmp_path: Path) -> None:
    src = export_model("ddpm-cifar10", "op")
    out = tmp_path / "c10.fp16.onnx"
    # Two calibration shapes (small square, batch 2 non-square) keep this under ~40 s on 2 cores.
    r = convert_fp16(src, out, calibration_shapes=[(1, 8, 8), (2, 32, 48)], check_shapes=[(2, 16, 24)])
    check_fp16_file(out, src)
    assert r.check["passed"] and r.emulation.ok and r.check["max_abs_err"] < 1e-2
    assert {i.kind for i in r.fp32_nodes} == {"normalization", "time-embedding"}
    assert r.audit.max_attention_logit.logits_absmax < 100
    rep = verify(out)  # the default sweep
    assert rep.passed, rep.failures()
    assert len(rep.shapes) >= 5
    assert max(o.max_abs for s in rep.shapes for o in s.outputs) < 1e-2
    print({"fp32_nodes": len(r.fp32_nodes), "check": r.check["shapes"],
           "verify": [(s.shape, max(o.max_abs for o in s.outputs)) for s in rep.shapes]})


@pytest.mark.slow
def test_ddpm_256_fp16(export_model, tmp_path: Path) -> None:
    src = export_model("ddpm-256", "op")
    out = tmp_path / "d256.fp16.onnx"
    r = convert_fp16(src, out, calibration_shapes=[(1, 32, 32), (2, 32, 64)], check_shapes=[(1, 32, 64)])
    check_fp16_file(out, src)
    assert r.check["passed"] and r.emulation.ok
    assert all(a["q"] == a["k"] == a["v"] == "float16" for a in r.attention)
    rep = verify(out)  # the default sweep
    assert rep.passed, rep.failures()
    assert max(o.max_abs for s in rep.shapes for o in s.outputs) < 1e-2


def test_audit_in_tensor_groups_matches_one_group(tiny_onnx: Path) -> None:
    # Each group of exposed tensors runs in a session of its own; splitting must not change a single figure.
    shapes = [(1, 16, 16), (2, 32, 32)]
    whole = audit_fp16(tiny_onnx, calibration_shapes=shapes, memory_budget=1 << 30)
    split = audit_fp16(tiny_onnx, calibration_shapes=shapes, memory_budget=2 << 20)
    assert split.runs > whole.runs == len(shapes)
    assert {t.name: t.absmax for t in split.tensors} == {t.name: t.absmax for t in whole.tensors}
    assert [(a.name, a.logits_absmax) for a in split.attention] == [(a.name, a.logits_absmax) for a in whole.attention]
    assert split.attention and split.fp32_node_names() == whole.fp32_node_names()


def test_groups_keep_units_together_and_under_budget() -> None:
    from attn_export.exporter.audit import _groups_of_units

    sizes = {"q": 100, "k": 100, "a": 50, "b": 50, "h": 100}
    types = {"q": TensorProto.FLOAT, "k": TensorProto.FLOAT, "a": TensorProto.FLOAT, "b": TensorProto.FLOAT,
             "h": TensorProto.FLOAT16}
    groups = _groups_of_units([["q", "k"], ["a"], ["b"], ["h"], ["a"]], sizes, 800, types)
    # q+k (800 bytes) fill one group; a and b (400) the next, with h (FP16: 200 bytes); a only once.
    assert groups == [["q", "k"], ["a", "b", "h"]]


def test_a_scalar_epsilon_does_not_flush_to_zero() -> None:
    # F.normalize exports as x / Clip(ReduceL2(x), min=1e-12): in FP16 1e-12 is 0 and a zero vector gives 0/0 = NaN.
    from onnx import TensorProto, helper, numpy_helper

    from attn_export.exporter.fp16 import convert_graph

    eps = numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "eps")
    weights = numpy_helper.from_array(np.full((4,), 1e-9, dtype=np.float32), "w")  # a tensor: ordinary underflow
    g = helper.make_graph(
        [helper.make_node("Clip", ["x", "eps"], ["c"]), helper.make_node("Mul", ["c", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[eps, weights])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    counts = convert_graph(model, [])
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits["eps"].dtype == np.float16 and inits["eps"] == np.finfo(np.float16).tiny
    assert not inits["w"].any() and "eps" in counts["clamped"] and "w" not in counts["clamped"]
