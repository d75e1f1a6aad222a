"""3x3 convolutions as Winograd F(4x4, 3x3) in the ONNX Runtime serving form (CPU provider)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from attn_export.graph import onnxruntime_serving_form, winograd_convolutions
from attn_export.graph.winograd import _AT, _BT, _G, transformed_weights
from attn_export.runners.ort_runner import OrtRunner


def _all_ops(graph: onnx.GraphProto) -> Counter:
    """Op types of a graph's nodes and of the nodes of every subgraph (If branches)."""
    ops: Counter = Counter()
    for n in graph.node:
        ops[n.op_type] += 1
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                ops.update(_all_ops(a.g))
    return ops


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _conv_model(c: int, k: int, *, bias: bool = True, dtype: type = np.float32, **attrs: object) -> onnx.ModelProto:
    """One Conv on a [N, C, H, W] input with dynamic batch, height and width; random weights."""
    rng = np.random.default_rng(7)
    kernel = attrs.pop("kernel", 3)
    group = int(attrs.get("group", 1))  # type: ignore[call-overload]
    w = (rng.standard_normal((k, c // group, kernel, kernel)) / np.sqrt(9 * c)).astype(dtype)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(k).astype(dtype), "b"))
        inputs.append("b")
    attrs.setdefault("pads", [1, 1, 1, 1])
    node = helper.make_node("Conv", inputs, ["y"], name="conv", kernel_shape=[kernel, kernel], **attrs)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    x = helper.make_tensor_value_info("x", elem, ["batch", c, "height", "width"])
    y = helper.make_tensor_value_info("y", elem, ["batch", k, "height", "width"])
    graph = helper.make_graph([node], "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_matrices_compute_a_correlation() -> None:
    # One dimension: Aᵀ[(G g) ⊙ (Bᵀ d)] is the 4 outputs of a 3-tap correlation over 6 inputs.
    rng = np.random.default_rng(0)
    for _ in range(20):
        g, d = rng.standard_normal(3), rng.standard_normal(6)
        expected = np.array([d[i:i + 3] @ g for i in range(4)])
        np.testing.assert_allclose(_AT @ ((_G @ g) * (_BT @ d)), expected, rtol=1e-12, atol=1e-12)


def test_transformed_weights_are_g_w_gt() -> None:
    w = np.random.default_rng(1).standard_normal((5, 3, 3, 3)).astype(np.float32)
    u = transformed_weights(w)
    assert u.shape == (36, 5, 3) and u.dtype == np.float32
    for k in range(5):
        for c in range(3):
            np.testing.assert_allclose(u[:, k, c].reshape(6, 6), _G @ w[k, c] @ _G.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 12, 20), (3, 4, 36)])
def test_one_convolution_matches(bias: bool, shape: tuple[int, int, int]) -> None:
    c, k = 24, 40
    model = _conv_model(c, k, bias=bias)
    direct = _session(model)
    result = winograd_convolutions(model, hw_multiple=4, min_channels=1, max_transformed_bytes=None)
    assert result.rewritten == ["conv"] and not result.skipped
    ops = _all_ops(model.graph)
    assert ops["DepthToSpace"] == 1 and ops["MatMul"] == 2 and ops["Conv"] == 1  # the Conv is the input transform
    assert ops["If"] == 0
    onnx.checker.check_model(model)
    n, h, w = shape
    x = np.random.default_rng(2).standard_normal((n, c, h, w)).astype(np.float32)
    ref = direct.run(None, {"x": x})[0]
    got = _session(model).run(None, {"x": x})[0]
    assert got.shape == ref.shape == (n, k, h, w)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))
    assert not np.array_equal(got, ref)  # rounding differs: the Winograd nodes ran


def test_large_inputs_take_the_convolution_as_written() -> None:
    """The If picks Winograd up to the size limit (per image) and the convolution as written above it."""
    c, k = 16, 8
    model = _conv_model(c, k)
    direct = _session(model)
    # 12x12 pixels: the transformed input takes 16 * 144 * 36/16 * 4 bytes = 20,736 bytes per image.
    assert winograd_convolutions(model, hw_multiple=4, min_channels=1, max_transformed_bytes=20736).rewritten
    ops = _all_ops(model.graph)
    assert ops["If"] == 1 and ops["DepthToSpace"] == 1 and ops["Conv"] == 2  # transform + the conv as written
    onnx.checker.check_model(model)
    served = _session(model)
    rng = np.random.default_rng(6)
    for n, h, w, winograd in ((2, 12, 12, True), (1, 8, 16, True), (1, 12, 16, False), (3, 16, 16, False)):
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        ref, got = direct.run(None, {"x": x})[0], served.run(None, {"x": x})[0]
        scale = max(1.0, float(np.abs(ref).max()))
        diff = float(np.abs(got - ref).max())
        assert diff <= 1e-5 * scale
        # The two kernels of the convolution as written (in and out of the If) sum in other orders, about 2e-7
        # apart here (relative); the Winograd transforms, 2e-6 to 3e-6.
        assert (diff > 5e-7 * scale) == winograd, (n, h, w, diff)


@pytest.mark.parametrize("attrs, reason", [
    ({"strides": [2, 2]}, "strided or dilated"),
    ({"dilations": [2, 2], "pads": [2, 2, 2, 2]}, "strided or dilated"),
    ({"group": 2}, "grouped"),
    ({"pads": [0, 0, 0, 0]}, "padding is not 1"),
    ({"kernel": 1, "pads": [0, 0, 0, 0]}, "not a float32 3x3 kernel"),
    ({"dtype": np.float16}, "not a float32 3x3 kernel"),
])
def test_other_convolutions_are_left(attrs: dict, reason: str) -> None:
    model = _conv_model(16, 16, **attrs)
    before = model.SerializeToString()
    result = winograd_convolutions(model, hw_multiple=8, min_channels=1)
    assert not result.rewritten and result.skipped == {"conv": reason}
    assert model.SerializeToString() == before


def test_small_channel_counts_and_size_budget_are_respected() -> None:
    model = _conv_model(16, 16)
    assert winograd_convolutions(model, hw_multiple=4).skipped == {"conv": "fewer than 128 input channels"}
    model = _conv_model(16, 16)
    result = winograd_convolutions(model, hw_multiple=4, min_channels=1, max_added_bytes=1000)
    assert not result.rewritten and "size allowed" in result.skipped["conv"]


def test_sizes_that_do_not_tile_are_left() -> None:
    # Inputs that are multiples of 2 only: H and W need not be multiples of 4.
    model = _conv_model(16, 16)
    result = winograd_convolutions(model, hw_multiple=2, min_channels=1)
    assert not result.rewritten and "not a multiple of 4" in result.skipped["conv"]


def test_levels_of_a_unet(export_model) -> None:
    """tiny (H/W multiple 4): level-0 convolutions tile for every accepted size, deeper ones do not."""
    path = export_model("tiny", "op")
    model = onnx.load(str(path))
    result = winograd_convolutions(model, hw_multiple=4, min_channels=1)
    assert result.rewritten
    assert all("H/2 and W/2 are not always multiples of 4" in r or "H/4" in r
               for r in result.skipped.values() if "multiples" in r)
    assert any("H/2 and W/2" in r for r in result.skipped.values())
    plain = _session(path)
    served = _session(model)
    rng = np.random.default_rng(3)
    for n, h, w in ((1, 8, 8), (2, 36, 20), (3, 12, 28)):
        feeds = {"x": rng.standard_normal((n, 3, h, w)).astype(np.float32), "t": np.arange(n, dtype=np.int64) * 300}
        ref = plain.run(None, feeds)[0]
        assert np.abs(served.run(None, feeds)[0] - ref).max() < 1e-4


def test_runner_serves_winograd_on_cpu_only(export_model) -> None:
    path = export_model("tiny", "op", base_channels=128)
    served = OrtRunner(path).activate()
    as_written = OrtRunner(path, winograd=False).activate()
    assert served.winograd_rewritten > 0 and as_written.winograd_rewritten == 0
    assert served.attention_rewritten == as_written.attention_rewritten > 0
    assert any("Winograd" in p for p in served.serving_form_parts())
    rng = np.random.default_rng(4)
    for n, h, w in ((1, 16, 16), (2, 24, 40)):
        feeds = {"x": rng.standard_normal((n, 3, h, w)).astype(np.float32), "t": np.arange(n, dtype=np.int64) * 250}
        a, b = served.infer(feeds), as_written.infer(feeds)
        assert all(np.abs(a[o] - b[o]).max() < 1e-4 for o in a)
    # CUDA and TensorRT get no Winograd: their convolutions are cuDNN's or TensorRT's own.
    model = onnx.load(str(path))
    form = onnxruntime_serving_form(model, provider="CUDAExecutionProvider", hw_multiple=4)
    assert form.winograd is None and form.attention_sites > 0


def test_verify_names_and_checks_the_serving_form(export_model) -> None:
    from attn_export.verify import verify

    report = verify(export_model("tiny", "op", base_channels=128), shapes=[(1, 16, 16), (2, 8, 24)], form="serving")
    assert report.passed
    assert "Winograd" in report.candidate


def test_triton_cpu_instances_get_winograd(export_model, tmp_path: Path) -> None:
    from attn_export.triton import write_model_repository

    path = export_model("tiny", "op", base_channels=128)
    cpu = write_model_repository(path, tmp_path / "repo", name="cpu", kind="cpu", form="serving")
    gpu = write_model_repository(path, tmp_path / "repo", name="gpu", kind="gpu", form="serving")
    assert cpu.winograd_rewritten > 0 and gpu.winograd_rewritten == 0
    assert cpu.attention_rewritten == gpu.attention_rewritten > 0
    assert "Winograd" in cpu.config_text and "Winograd" not in gpu.config_text
    ops = _all_ops(onnx.load(str(cpu.model_file)).graph)
    assert ops["DepthToSpace"] == ops["If"] == cpu.winograd_rewritten


def test_new_names_do_not_collide() -> None:
    # A foreign graph may already hold a tensor under the name the rewrite would pick.
    model = _conv_model(16, 8)
    taken = "conv/winograd/products"
    model.graph.node.append(helper.make_node("Identity", ["x"], [taken], name=taken))
    model.graph.output.append(helper.make_tensor_value_info(taken, TensorProto.FLOAT, ["batch", 16, "height", "width"]))
    direct = _session(model)
    assert winograd_convolutions(model, hw_multiple=4, min_channels=1).rewritten == ["conv"]
    onnx.checker.check_model(model)
    x = np.random.default_rng(5).standard_normal((1, 16, 12, 8)).astype(np.float32)
    ref, got = direct.run(None, {"x": x}), _session(model).run(None, {"x": x})
    assert np.abs(got[0] - ref[0]).max() < 1e-5 and np.array_equal(got[1], x)


def test_models_with_external_data(export_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights in a data file: the qualifying 3x3 weights are read from it (and no others), the rest stays there."""
    from attn_export.exporter.onnx_export import export_onnx
    from attn_export.graph import index
    from attn_export.models.loader import ModelSource
    from attn_export.triton import write_model_repository

    inline = export_model("tiny", "op", base_channels=128)
    path = tmp_path / "src" / "unet.onnx"
    path.parent.mkdir()
    export_onnx(ModelSource(preset="tiny", overrides={"base_channels": 128}), path, check=False,
                external_data_threshold=1024)
    assert (path.parent / "unet.onnx.data").is_file()

    read: list[str] = []
    real = index.read_external
    monkeypatch.setattr(index, "read_external", lambda init, folder: read.append(init.name) or real(init, folder))
    light = onnx.load(str(path), load_external_data=False)
    dims = {i.name: list(i.dims) for i in light.graph.initializer}
    weights = {n.input[1] for n in light.graph.node if n.op_type == "Conv"}
    assert not winograd_convolutions(light, hw_multiple=4).rewritten  # no folder: nothing to read the weights from
    result = winograd_convolutions(light, hw_multiple=4, weights_folder=path.parent)
    assert result.rewritten and read
    assert all(name in weights and dims[name][2:] == [3, 3] and dims[name][1] >= 128 for name in read)
    monkeypatch.undo()

    served, plain = OrtRunner(path).activate(), OrtRunner(path, attention="as-is").activate()
    assert served.winograd_rewritten == OrtRunner(inline).activate().winograd_rewritten == len(result.rewritten)
    feeds = {"x": np.random.default_rng(8).standard_normal((2, 3, 16, 24)).astype(np.float32), "t": np.array([3, 800])}
    assert np.abs(served.infer(feeds)["out"] - plain.infer(feeds)["out"]).max() < 1e-4

    m = write_model_repository(path, tmp_path / "repo", kind="cpu", form="serving")
    assert m.winograd_rewritten == len(result.rewritten)
    copy = ort.InferenceSession(str(m.model_file), providers=["CPUExecutionProvider"])
    assert np.abs(copy.run(None, feeds)[0] - plain.infer(feeds)["out"]).max() < 1e-4


def test_external_location_outside_the_folder_is_not_read(tmp_path: Path) -> None:
    """Called as a library on a model it did not load, the rewrite still refuses a location that leaves the folder."""
    model = _conv_model(128, 128)
    weight = next(i for i in model.graph.initializer if len(i.dims) == 4)
    weight.ClearField("raw_data")
    del weight.float_data[:]
    weight.data_location = TensorProto.EXTERNAL
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 128 * 128 * 9 * 4)
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", str(128 * 128 * 9 * 4))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(ValueError, match="outside the model's folder"):
        winograd_convolutions(model, hw_multiple=8, weights_folder=folder)
