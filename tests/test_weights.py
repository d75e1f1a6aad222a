"""The weight files behind exports and FP16 conversion: staging, reading, appending and compacting tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from attn_export.exporter import weights


def _model(tensors: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A graph that adds every tensor to an input of its shape, so each initializer is used."""
    nodes, inputs, outputs = [], [], []
    for name, a in tensors.items():
        inputs.append(helper.make_tensor_value_info(f"x_{name}", TensorProto.FLOAT, list(a.shape)))
        outputs.append(helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, list(a.shape)))
        nodes.append(helper.make_node("Add", [f"x_{name}", name], [f"y_{name}"], name=f"add_{name}"))
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in tensors.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"big": rng.standard_normal((96, 100)).astype(np.float32),   # 9600 elements: staged
            "small": rng.standard_normal((4, 5)).astype(np.float32)}    # stays inline


def test_stage_weights_moves_large_inline_tensors(tmp_path: Path) -> None:
    t = _tensors()
    staged = weights.stage_weights(_model(t), tmp_path, tmp_path / "w.data")
    inits = {i.name: i for i in staged.graph.initializer}
    assert inits["big"].data_location == TensorProto.EXTERNAL and not inits["big"].raw_data
    assert inits["small"].data_location != TensorProto.EXTERNAL
    assert weights.has_external(staged)
    for name, a in t.items():
        np.testing.assert_array_equal(weights.read_array(inits[name], tmp_path), a)
    assert (tmp_path / "w.data").stat().st_size == t["big"].nbytes


def test_stage_weights_copies_external_tensors_of_any_size(tmp_path: Path) -> None:
    # A source with its weights outside (even small ones) is staged whole: the stage never points back at it.
    src = tmp_path / "src"
    src.mkdir()
    t = _tensors()
    m = _model(t)
    onnx.save_model(m, str(src / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    light = onnx.load(str(src / "m.onnx"), load_external_data=False)
    stage = tmp_path / "stage"
    stage.mkdir()
    staged = weights.stage_weights(light, src, stage / "w.data")
    for init in staged.graph.initializer:
        assert {e.key: e.value for e in init.external_data}["location"] == "w.data"
        np.testing.assert_array_equal(weights.read_array(init, stage), t[init.name])


def test_read_array_refuses_an_external_tensor_without_its_folder(tmp_path: Path) -> None:
    staged = weights.stage_weights(_model(_tensors()), tmp_path, tmp_path / "w.data")
    big = next(i for i in staged.graph.initializer if i.name == "big")
    with pytest.raises(ValueError, match="no folder"):
        weights.read_array(big, None)
    (tmp_path / "w.data").write_bytes(b"\0" * 16)
    with pytest.raises(OSError, match="shorter"):
        weights.read_array(big, tmp_path)


def test_data_writer_appends_large_and_inlines_small(tmp_path: Path) -> None:
    big = np.arange(10000, dtype=np.float16).reshape(100, 100)
    small = np.ones(3, dtype=np.float16)
    with weights.DataWriter(tmp_path / "h.data") as w:
        tb, ts = w.tensor(big, "b"), w.tensor(small, "s")
    assert tb.data_location == TensorProto.EXTERNAL and tb.data_type == TensorProto.FLOAT16
    assert ts.data_location != TensorProto.EXTERNAL
    np.testing.assert_array_equal(weights.read_array(tb, tmp_path), big)
    np.testing.assert_array_equal(numpy_helper.to_array(ts), small)


def test_compact_external_gathers_several_files_and_drops_unused(tmp_path: Path) -> None:
    t = _tensors()
    t["other"] = np.full((100, 100), 2.0, dtype=np.float32)
    m = weights.stage_weights(_model(t), tmp_path, tmp_path / "a.data")
    # One tensor rewritten into a second file, one dropped from the graph: only the used bytes survive.
    with weights.DataWriter(tmp_path / "b.data") as w:
        new = w.tensor(np.zeros((96, 100), dtype=np.float32), "big")
    next(i for i in m.graph.initializer if i.name == "big").CopyFrom(new)
    keep = [i for i in m.graph.initializer if i.name != "other"]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    weights.compact_external(m, tmp_path, None, "out.data")
    assert (tmp_path / "out.data").stat().st_size == 96 * 100 * 4
    big = next(i for i in m.graph.initializer if i.name == "big")
    np.testing.assert_array_equal(weights.read_array(big, tmp_path), 0)
    with pytest.raises(ValueError, match="refers to out.data, not a.data"):
        weights.compact_external(m, tmp_path, "a.data", "again.data")
