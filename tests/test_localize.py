"""localize: the first node where a candidate stops computing what its reference computes.

Every fault is planted in one node of a copy of the tiny export, so the
answer is known: the report must name that node (file against file) or the
module whose scope holds it (file against PyTorch), with clean inputs
upstream of it, and a fix that fits the fault.
"""

from __future__ import annotations

import importlib.util
import io
import json
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from attn_export.errors import UsageError
from attn_export.exporter.foreign import spec_of
from attn_export.inputs import load_inputs, save_inputs
from attn_export.localize import localize, module_path, node_scope

CONV = "/downs.2/conv_1/Conv"
CONV_WEIGHT = "downs.2.conv_1.weight"
SHAPE = "1x16x16"


def _plant_weight(src: Path, dst: Path, change: Callable[[np.ndarray], np.ndarray]) -> Path:
    """A copy of ``src`` with the Conv's weight (read by that node only) changed."""
    model = onnx.load(str(src))
    init = next(i for i in model.graph.initializer if i.name == CONV_WEIGHT)
    assert [n.name for n in model.graph.node if CONV_WEIGHT in n.input] == [CONV]
    init.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init).copy()), CONV_WEIGHT))
    onnx.save(model, str(dst))
    return dst


def _plant_constant(src: Path, dst: Path) -> tuple[Path, str]:
    """A copy of ``src`` where the time bias added in the first ResBlock's own forward is doubled by a new Mul."""
    model = onnx.load(str(src))
    nodes = list(model.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.name == "/downs.0/Add")
    add = nodes[at]
    model.graph.initializer.append(numpy_helper.from_array(np.array(2.0, np.float32), "planted_two"))
    planted = helper.make_node("Mul", [add.input[1], "planted_two"], ["/downs.0/Mul_planted_output_0"], name="/downs.0/Mul_planted")
    add.input[1] = planted.output[0]
    nodes.insert(at, planted)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return dst, planted.name


def _data_input(report):
    return next(i for i in report.first.inputs if i.kind in ("tensor", "module input"))


# ---------------------------------------------------------------------------------------------------------------------
# file against file
# ---------------------------------------------------------------------------------------------------------------------
def test_fp32_fault_is_named_with_clean_inputs(tiny_onnx: Path, tmp_path: Path) -> None:
    def nudge(w: np.ndarray) -> np.ndarray:
        w[0] += 0.5
        return w

    fault = _plant_weight(tiny_onnx, tmp_path / "fault.onnx", nudge)
    r = localize(fault, reference=tiny_onnx, shapes=SHAPE)
    assert r.mode == "onnx" and r.diverged
    assert r.first is not None and r.first.node == CONV and r.first.op_type == "Conv"
    assert not r.first.error.passed and r.first.error.max_abs > 1.0
    # Both files compute everything before it with the same ops on the same data: bit for bit equal.
    assert r.first.upstream_max_abs == 0.0
    assert _data_input(r).error.max_abs == 0.0
    weight = next(i for i in r.first.inputs if i.name == CONV_WEIGHT)
    assert weight.kind == "initializer" and not weight.error.passed
    assert r.fix is not None and r.fix.kind == "weights" and CONV_WEIGHT in r.fix.text
    assert r.path[-1].node == CONV and all(e.passed for e in r.path[:-1])
    assert r.outputs and not r.outputs[0].passed
    assert json.loads(r.to_json())["first"]["node"] == CONV


def test_rewired_node_is_named(tiny_onnx: Path, tmp_path: Path) -> None:
    fault, _ = _plant_constant(tiny_onnx, tmp_path / "rewired.onnx")
    r = localize(fault, reference=tiny_onnx, shapes=SHAPE)
    assert r.first is not None and r.first.node == "/downs.0/Add"
    assert r.first.upstream_max_abs == 0.0
    assert r.fix is not None and r.fix.kind == "graph" and "/downs.0/Mul_planted_output_0" in r.fix.text


def test_fp16_overflow_names_the_node_and_the_option(tiny_onnx: Path, tmp_path: Path) -> None:
    from attn_export.exporter.fp16 import convert_fp16

    # Weights stay inside FP16's range (|w| < 8400); the Conv's output reaches about 1.4e5 in FP32.
    planted = _plant_weight(tiny_onnx, tmp_path / "planted.onnx", lambda w: w * 1e5)
    fp16 = tmp_path / "planted.fp16.onnx"
    options = dict(check=False, force=True, threshold=65504.0, calibration_shapes=[(1, 16, 16)])
    audited = convert_fp16(planted, fp16, **options)
    flagged = [i.node for i in audited.fp32_nodes if i.kind == "range"]
    assert CONV in flagged  # the audit keeps it FP32 ...
    convert_fp16(planted, fp16, force_fp16_nodes=flagged, **options)  # ... so it is forced to FP16 to plant the fault

    r = localize(fp16, reference=planted, shapes=SHAPE)
    assert r.precision == "fp16" and r.tolerances.stat == "mean"
    assert r.first is not None and r.first.node == CONV
    assert r.first.error.nonfinite > 0 and r.first.error.candidate_dtype == "float16"
    assert r.first.error.reference_absmax > 65504
    assert _data_input(r).error.passed and r.first.upstream_max_abs < 0.05
    assert r.fix is not None and r.fix.kind == "fp16-overflow"
    assert r.fix.nodes == [CONV] and r.fix.python == f"convert_fp16(..., extra_fp32_nodes={[CONV]!r})"
    assert "--fp32-op Conv" in r.fix.cli

    # The fix as the report gives it: with the Conv in FP32 the divergence moves on to the next overflowing node.
    convert_fp16(planted, fp16, force_fp16_nodes=[n for n in flagged if n != CONV], extra_fp32_nodes=[CONV], **options)
    again = localize(fp16, reference=planted, shapes=SHAPE)
    assert again.first is not None and again.first.node != CONV
    assert again.first.node in flagged


def test_clean_fp16_file_has_no_divergence(tiny_onnx: Path, tmp_path: Path) -> None:
    from attn_export.exporter.fp16 import convert_fp16

    fp16 = tmp_path / "tiny.fp16.onnx"
    convert_fp16(tiny_onnx, fp16, check=False, calibration_shapes=[(1, 16, 16)])
    r = localize(fp16, reference=tiny_onnx, shapes=SHAPE)
    assert r.first is None and r.fix is None and r.diverging == 0
    assert r.compared > 100 and r.unmatched == 0
    assert len(r.path) + r.path_left_out > len(r.path)  # bounded: the whole path does not fit in the report
    assert r.path[-1].tensor == "out"


# ---------------------------------------------------------------------------------------------------------------------
# file against PyTorch
# ---------------------------------------------------------------------------------------------------------------------
def test_onnx_vs_pytorch_names_the_module_of_a_wrong_weight(tiny_onnx: Path, tmp_path: Path) -> None:
    def nudge(w: np.ndarray) -> np.ndarray:
        w[0] += 0.5
        return w

    fault = _plant_weight(tiny_onnx, tmp_path / "fault.onnx", nudge)
    r = localize(fault, shapes=SHAPE)
    assert r.mode == "pytorch" and r.reference == "pytorch (cpu)"
    planted_node = next(n for n in onnx.load(str(fault)).graph.node if n.name == CONV)
    assert r.first is not None and r.first.module == node_scope(planted_node) == "downs.2.conv_1"
    assert r.first.node == CONV
    module_inputs = [i for i in r.first.inputs if i.kind == "module input"]
    assert module_inputs and all(i.error is not None and i.error.max_abs < 1e-4 for i in module_inputs)
    weight = next(i for i in r.first.inputs if i.name == CONV_WEIGHT)
    assert not weight.error.passed and r.fix is not None and r.fix.kind == "weights"


def test_onnx_vs_pytorch_names_the_module_of_a_wrong_constant(tiny_onnx: Path, tmp_path: Path) -> None:
    fault, planted = _plant_constant(tiny_onnx, tmp_path / "constant.onnx")
    r = localize(fault, shapes=SHAPE)
    planted_node = next(n for n in onnx.load(str(fault)).graph.node if n.name == planted)
    # The Mul sits in the ResBlock's own forward, outside its submodules: the ResBlock is where it diverges.
    assert r.first is not None and r.first.module == node_scope(planted_node) == "downs.0"
    assert r.first.node.startswith("/downs.0/") and "own code" in r.first.note
    assert all(i.error is not None and i.error.max_abs < 1e-4 for i in r.first.inputs if i.kind == "module input")
    assert r.fix is not None and r.fix.kind == "export" and "/downs.0/" in r.fix.text


def test_onnx_vs_pytorch_clean_export_has_no_divergence(tiny_onnx: Path) -> None:
    r = localize(tiny_onnx)
    assert r.first is None and r.shapes_tried == [(1, 16, 16), (2, 16, 24)]
    assert r.compared > 100 and r.outputs and r.outputs[0].passed
    assert r.seed == 1  # the last shape tried used seed + 1, as verify's sweep does


def test_module_path_reads_both_exporters_names() -> None:
    assert module_path(["downs.0", "conv_2", "conv_2.1"]) == "downs.0.conv_2.1"   # TorchScript
    assert module_path(["downs.0", "conv_2", "1"]) == "downs.0.conv_2.1"          # dynamo, renamed by module
    assert module_path(["mid", "attn", "attn"]) == "mid.attn.attn"
    assert node_scope(helper.make_node("Concat", [], ["/Concat_4_output_0"], name="/Concat_4")) == ""
    assert node_scope(helper.make_node("Unsqueeze", [], ["/downs.0/Unsqueeze_1_output_0"], name="node_Unsqueeze_2")) == "downs.0"


# ---------------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------------
def test_inputs_round_trip_and_run(tiny_onnx: Path, tmp_path: Path) -> None:
    spec = spec_of(tiny_onnx)
    feeds = spec.make_inputs(2, 16, 24, seed=7)
    path = save_inputs(tmp_path / "inputs.npz", feeds)
    back = load_inputs(path, spec)
    assert list(back) == [t.name for t in spec.inputs]
    for name, value in feeds.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value)
    with pytest.raises(UsageError, match="exists"):
        save_inputs(path, feeds)
    r = localize(tiny_onnx, reference=tiny_onnx, inputs=back)
    assert r.input_source == "given" and r.seed is None and r.shape == (2, 16, 24)
    assert r.inputs["x"]["shape"] == [2, 3, 16, 24] and np.array_equal(r.feeds["x"], feeds["x"])
    with pytest.raises(UsageError, match="not both"):
        localize(tiny_onnx, inputs=back, shapes=SHAPE)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=True)
    return buf.getvalue()


def _write_npz(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name + ".npy", data)
    return path


@pytest.mark.parametrize("case, message", [
    ("not-a-zip", "not an .npz"),
    ("pickled", "Python objects"),
    ("dtype", "x is float64; the model takes float32"),
    ("missing", "missing t"),
    ("extra", "unexpected extra"),
    ("rank", "rank 3"),
    ("shape", "multiples of 4"),
    ("lying-header", "declares"),
])
def test_bad_inputs_file_is_refused_in_one_line(tiny_onnx: Path, tmp_path: Path, case: str, message: str) -> None:
    spec = spec_of(tiny_onnx)
    good = spec.make_inputs(1, 16, 16)
    members = {k: _npy(v) for k, v in good.items()}
    path = tmp_path / "bad.npz"
    if case == "not-a-zip":
        path.write_bytes(b"\x93NUMPY not really")
    else:
        if case == "pickled":
            members["x"] = _npy(np.array([{"a": 1}], dtype=object))
        elif case == "dtype":
            members["x"] = _npy(good["x"].astype(np.float64))
        elif case == "missing":
            del members["t"]
        elif case == "extra":
            members["extra"] = _npy(np.zeros(1, np.float32))
        elif case == "rank":
            members["x"] = _npy(good["x"][0])
        elif case == "shape":
            members["x"] = _npy(np.zeros((1, 3, 18, 18), np.float32))
        elif case == "lying-header":
            members["x"] = _npy(good["x"])[:200]  # its header promises 1x3x16x16 float32; the data is cut short
        _write_npz(path, members)
    with pytest.raises(UsageError, match=message) as info:
        load_inputs(path, spec)
    assert "\n" not in str(info.value)


def test_bad_options_are_refused(tiny_onnx: Path, tmp_path: Path) -> None:
    from attn_export.spec import ReferenceOptions

    with pytest.raises(UsageError, match="replaces the PyTorch model"):
        localize(tiny_onnx, reference=tiny_onnx, reference_model=ReferenceOptions(preset="tiny"))
    with pytest.raises(UsageError, match="not found"):
        localize(tmp_path / "missing.onnx")


# ---------------------------------------------------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------------------------------------------------
def test_engine_needs_the_onnx_file_it_was_built_from(tmp_path: Path) -> None:
    engine = tmp_path / "unet.plan"
    engine.write_bytes(b"")  # refused before anything reads it
    with pytest.raises(UsageError, match="--localize of an engine compares it with the ONNX file it was built from"):
        localize(engine)


def _have_trt_and_gpu() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    from attn_export.engines.trt_build import gpu_info

    return gpu_info() is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _have_trt_and_gpu(), reason="needs TensorRT and an NVIDIA GPU")
def test_fp16_engine_is_compared_tensor_by_tensor_with_its_onnx_file(tmp_path: Path, tiny_onnx: Path) -> None:
    from attn_export import build_engine
    from attn_export.engines.profiles import Profile

    result = build_engine(tiny_onnx, tmp_path / "tiny.engine", [Profile((1, 16, 16), (1, 32, 32), (2, 32, 32))],
                          fp16=True)
    assert result.build is not None
    report = localize(result.build.engine_path, reference=result.built_from)
    assert report.mode == "engine" and report.precision == "fp16"
    assert report.compared > 100 and report.first is None, report.summary()
    assert any("fuses less" in n for n in report.notes)
