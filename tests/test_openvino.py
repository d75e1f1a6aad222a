"""The OpenVINO runner and `--backend openvino` of verify, bench and triton.

Tests that run OpenVINO skip where it is not installed (`make test` passes without it); the ones that check what a
user without it sees make its import fail instead. Precision checks read OpenVINO's own capabilities of this CPU,
so they hold on any host: bf16 tests skip only where the CPU has no bf16 units, with that reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CliResult, invoke_cli

from attn_export.compare import compare_outputs, default_tolerances
from attn_export.errors import MissingDependencyError, UsageError
from attn_export.host import native_bf16
from attn_export.runners.openvino_runner import INSTALL_HINT, check_precision, import_openvino, parse_precision

NEEDS_OPENVINO = "needs OpenVINO (pip install '.[openvino]')"


def _capabilities() -> list[str]:
    ov = pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def _needs_bf16() -> None:
    if "BF16" not in _capabilities():
        pytest.skip("this CPU has no bf16 units (AVX512_BF16 or AMX): OpenVINO refuses bf16 here, as it should")


def _invoke(*args: str) -> CliResult:
    return invoke_cli(*args)


def _feeds(spec, batch: int, h: int, w: int, t_high: int, seed: int = 0) -> dict[str, np.ndarray]:
    feeds = spec.make_inputs(batch, h, w, seed=seed)
    feeds["t"] = np.random.default_rng(seed).integers(0, t_high, batch).astype(np.int64)
    return feeds


# ---------------------------------------------------------------------------------------------------------------------
# without OpenVINO
# ---------------------------------------------------------------------------------------------------------------------
def test_not_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch, tiny_onnx: Path) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(MissingDependencyError, match=r"\.\[openvino\]") as err:
        import_openvino()
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    res = _invoke("verify", str(tiny_onnx), "--backend", "openvino", "--precision", "f32")
    assert res.exit_code == 2 and INSTALL_HINT in res.output
    res = _invoke("triton", str(tiny_onnx), "--repo", str(tiny_onnx.parent / "repo-none"), "--backend", "openvino",
                  "--precision", "bf16")
    assert res.exit_code == 2 and INSTALL_HINT in res.output
    assert not (tiny_onnx.parent / "repo-none" / tiny_onnx.stem).exists()


def test_precision_is_explicit_and_named() -> None:
    assert [parse_precision(p) for p in ("f32", "FP32", "bfloat16", "bf16", "fp16")] == ["f32", "f32", "bf16", "bf16", "f16"]
    with pytest.raises(UsageError, match="explicit precision"):
        parse_precision(None)
    with pytest.raises(UsageError, match="f32, bf16, f16"):
        parse_precision("int8")


def test_precision_check_reads_the_capabilities() -> None:
    check_precision("bf16", ["FP32", "BF16"])
    check_precision("f32", ["FP32"])
    with pytest.raises(UsageError, match="cannot run f16 natively.*never emulated.*native here: f32 or bf16"):
        check_precision("f16", ["FP32", "BF16", "INT8"])
    with pytest.raises(UsageError, match="bf16 needs AVX512_BF16 or AMX"):
        check_precision("bf16", ["FP32"])


def test_native_bf16_reads_the_flags() -> None:
    assert native_bf16({"flags": "fpu avx512f avx512_bf16"})
    assert native_bf16({"flags": "avx2 amx_bf16 amx_tile"})
    assert not native_bf16({"flags": "avx2 avx512f avx512bw"})
    assert not native_bf16({})


@pytest.mark.parametrize(("args", "message"), [
    (["--backend", "openvino"], "explicit precision"),
    (["--precision", "bf16"], "add --backend openvino"),
    (["--backend", "tensorflow", "--precision", "f32"], "--backend must be onnxruntime or openvino"),
])
def test_verify_backend_options_exit_2(tiny_onnx: Path, args: list[str], message: str) -> None:
    res = _invoke("verify", str(tiny_onnx), *args)
    assert res.exit_code == 2 and message in res.output


# ---------------------------------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("static_shapes", [False, True], ids=["dynamic", "static-per-shape"])
def test_f32_matches_onnxruntime(tiny_onnx: Path, static_shapes: bool) -> None:
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    from attn_export.runners.openvino_runner import OpenVinoRunner
    from attn_export.runners.ort_runner import OrtRunner

    ort = OrtRunner(tiny_onnx, attention="as-is")
    with OpenVinoRunner(tiny_onnx, precision="f32", threads=2, static_shapes=static_shapes) as ov:
        for shape in ((1, 8, 8), (2, 32, 48), (3, 12, 20)):
            feeds = _feeds(ov.spec, *shape, t_high=1000)
            got = compare_outputs(ort.infer(feeds), ov.infer(feeds), default_tolerances("fp32"), ["out"])
            assert all(o.passed for o in got), [o.reason for o in got]
            assert got[0].max_abs < 1e-4
        assert ov.compiled_settings()["inference_precision"] == "f32"  # asked for and compiled, never the default
        assert len(ov._compiled) == (3 if static_shapes else 1)  # one compilation per shape, or one for all


def test_bf16_within_fp16_tolerances(tiny_onnx: Path) -> None:
    """bf16, the time embedding held in f32, is within the FP16 tolerances of ONNX Runtime FP32 over the whole
    timestep range (without the island only t < 256 passed: docs/benchmarks.md)."""
    _needs_bf16()
    from attn_export.runners.openvino_runner import OpenVinoRunner
    from attn_export.runners.ort_runner import OrtRunner

    ort = OrtRunner(tiny_onnx, attention="as-is")
    with OpenVinoRunner(tiny_onnx, precision="bf16", threads=2) as ov:
        assert ov.compiled_settings()["inference_precision"] == "bf16"
        for i, shape in enumerate(((1, 8, 8), (2, 32, 32), (1, 32, 48), (1, 64, 64))):
            feeds = _feeds(ov.spec, *shape, t_high=1000, seed=i)
            feeds["t"][0] = 999
            ref, got = ort.infer(feeds), ov.infer(feeds)
            result = compare_outputs(ref, got, default_tolerances("bf16"), ["out"])
            assert all(o.passed for o in result), [o.reason for o in result]
            assert 0 < result[0].max_abs  # bf16 really ran: FP32 would agree to about 1e-6


def test_bf16_holds_the_time_embedding_in_f32(tiny_onnx: Path) -> None:
    """Unheld, OpenVINO's bf16 rounds t = 999 to 1000 before sin/cos; held, t = 999 is as accurate as t < 256."""
    _needs_bf16()
    from attn_export.runners.openvino_runner import OpenVinoRunner
    from attn_export.runners.ort_runner import OrtRunner

    ort = OrtRunner(tiny_onnx, attention="as-is")
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)

    def errors(ov: OpenVinoRunner) -> tuple[float, float]:
        def mean_error(t: int) -> float:
            feeds = {"x": x, "t": np.full((4,), t, np.int64)}
            return float(np.abs(ov.infer(feeds)["out"] - ort.infer(feeds)["out"]).mean())
        return max(mean_error(t) for t in (5, 100, 200)), mean_error(999)

    with OpenVinoRunner(tiny_onnx, precision="bf16", threads=2, hold_f32_islands=False) as raw:
        exact, large = errors(raw)
        assert large > 2 * exact  # 999 is held as 1000 in bf16
        assert "f32 islands" not in raw.describe()
    with OpenVinoRunner(tiny_onnx, precision="bf16", threads=2) as held:
        exact, large = errors(held)
        assert large < 1.3 * exact
        assert held.compiled_settings()["f32_islands"] == {"t": 6}  # Convert, Reshape, Mul, Sin, Cos, Concat
        assert "f32 islands: t embedding (6 nodes)" in held.describe() and "NOT held" not in held.describe()
        assert held.compiled_settings()["f32_island_nodes_not_held"] == []
        folder = Path(held._folder.name)
        assert folder.is_dir() and folder.stat().st_mode & 0o077 == 0  # the marked IR is private to this user
    assert not folder.exists()  # and gone with the runner


def _float_timestep_model(path: Path) -> Path:
    """A diffusers-shaped toy: float t expanded to x's batch, a sinusoidal embedding, a linear layer, a conv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    freqs = np.exp(-np.log(10000.0) * np.arange(8) / 8)[None, :].astype(np.float32)
    inits = [numpy_helper.from_array(freqs, "freqs"), numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w_lin"),
             numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w_conv")]
    nodes = [helper.make_node("Shape", ["x"], ["x_shape"]),
             helper.make_node("Slice", ["x_shape", "zero", "one"], ["batch"]),
             helper.make_node("Expand", ["t", "batch"], ["t_b"]),
             helper.make_node("Unsqueeze", ["t_b", "one"], ["t_col"]),
             helper.make_node("Mul", ["t_col", "freqs"], ["arg"]),
             helper.make_node("Sin", ["arg"], ["s"]), helper.make_node("Cos", ["arg"], ["c"]),
             helper.make_node("Concat", ["s", "c"], ["emb"], axis=1),
             helper.make_node("MatMul", ["emb", "w_lin"], ["temb"]),
             helper.make_node("Unsqueeze", ["temb", "axes23"], ["temb4"]),
             helper.make_node("Conv", ["x", "w_conv"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["h", "temb4"], ["out"])]
    inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes23"))
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "h", "w"]),
                                             helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_islands_found_by_dependence_not_names(tmp_path: Path) -> None:
    """A float timestep expanded to the batch (a shape query of x): the island is the embedding up to the MatMul."""
    ov = pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    from attn_export.runners.openvino_islands import PREFIX, find_islands, held_at_low_precision, hold_islands

    path = _float_timestep_model(tmp_path / "toy.onnx")
    core = ov.Core()
    islands = find_islands(core.read_model(str(path)))
    assert list(islands) == ["t"]  # x reaches Sin only through a shape query: no island of its own
    types = sorted(n.get_type_name() for n in islands["t"])
    assert {"Sin", "Cos", "Concat", "Multiply"} <= set(types)
    assert not {"MatMul", "Convolution", "Parameter", "Result"} & set(types)
    model, held = hold_islands(ov, core, core.read_model(str(path)), tmp_path)
    assert held.count == len(islands["t"]) and not held.not_held
    assert not [n for n in model.get_ordered_ops() if n.get_type_name() == "Unsqueeze"
                and n.get_friendly_name().startswith("attn_export_f32_island/")]  # became Reshape
    if "BF16" in _capabilities():
        def run(m: object, precision: str, t: float) -> np.ndarray:
            compiled = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": precision})
            x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
            return np.asarray(compiled({"x": x, "t": np.array([t], np.float32)})[0])

        # Expand became Tile and Unsqueeze Reshape: the plugin keeps every island node at f32
        assert held_at_low_precision(core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})) == []
        # and the check reads the compiled precisions: the same nodes named as an island but unmarked run at bf16
        unmarked = core.read_model(str(path))
        for i, node in enumerate(find_islands(unmarked)["t"]):
            node.set_friendly_name(f"{PREFIX}{i}/{node.get_friendly_name()}")
        assert "arg" in held_at_low_precision(core.compile_model(unmarked, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"}))
        for t in (999.0, 517.5):  # neither is a bf16 value
            ref = run(core.read_model(str(path)), "f32", t)
            held_err = np.abs(run(model, "bf16", t) - ref).mean()
            raw_err = np.abs(run(core.read_model(str(path)), "bf16", t) - ref).mean()
            assert held_err < raw_err / 3, (t, held_err, raw_err)


def test_island_stops_where_another_input_joins(tmp_path: Path) -> None:
    """sin(t * w) + x: the Add depends on x too, so only the Mul and the Sin are t's island."""
    ov = pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from attn_export.runners.openvino_islands import find_islands

    w = numpy_helper.from_array(np.linspace(0.1, 1.0, 4, dtype=np.float32)[None, :], "w")
    graph = helper.make_graph(
        [helper.make_node("Unsqueeze", ["t", "one"], ["tc"]), helper.make_node("Mul", ["tc", "w"], ["arg"]),
         helper.make_node("Sin", ["arg"], ["s"]), helper.make_node("Add", ["s", "x"], ["y"]),
         helper.make_node("Relu", ["y"], ["out"])], "joined",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])],
        [w, numpy_helper.from_array(np.array([1], np.int64), "one")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "joined.onnx")
    islands = find_islands(ov.Core().read_model(str(tmp_path / "joined.onnx")))
    assert list(islands) == ["t"]
    assert sorted(n.get_type_name() for n in islands["t"]) == ["Multiply", "Sin", "Unsqueeze"]


def test_no_island_without_an_embedding(tmp_path: Path) -> None:
    """A model with no sin/cos of an input keeps every node at the asked precision."""
    ov = pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    import onnx
    from onnx import TensorProto, helper

    from attn_export.runners.openvino_islands import find_islands

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "relu.onnx")
    assert find_islands(ov.Core().read_model(str(tmp_path / "relu.onnx"))) == {}


def test_f16_refused_in_one_line_exit_2(tiny_onnx: Path) -> None:
    if "FP16" in _capabilities():
        pytest.skip("this CPU runs f16 natively (AVX512_FP16 or AMX-FP16): nothing to refuse")
    proc = subprocess.run([sys.executable, "-m", "attn_export", "verify", str(tiny_onnx), "--backend", "openvino",
                           "--precision", "f16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot run f16 natively" in lines[0] and "never emulated" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


# ---------------------------------------------------------------------------------------------------------------------
# verify, bench, triton
# ---------------------------------------------------------------------------------------------------------------------
def test_verify_cli_openvino(tiny_onnx: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    report = tmp_path / "f32.json"
    res = _invoke("verify", str(tiny_onnx), "--backend", "openvino", "--precision", "f32", "--report", str(report))
    assert res.exit_code == 0, res.output
    data = json.loads(report.read_text())
    assert data["passed"] and data["precision"] == "fp32" and data["tolerances"]["stat"] == "elemwise"
    assert data["candidate"].startswith("openvino ") and ", f32," in data["candidate"]
    if "BF16" in _capabilities():
        report = tmp_path / "bf16.json"
        res = _invoke("verify", str(tiny_onnx), "--backend", "openvino", "--precision", "bf16", "--input-range",
                      "t:0:255", "--report", str(report))
        assert res.exit_code == 0, res.output
        data = json.loads(report.read_text())
        assert data["precision"] == "bf16" and ", bf16," in data["candidate"]
        assert data["tolerances"] == {"atol": 1e-2, "rtol": 1e-2, "stat": "mean", "quantile": 0.99}
    res = _invoke("verify", str(tiny_onnx), "--backend", "openvino", "--precision", "f32", "--form", "serving")
    assert res.exit_code == 2 and "as written" in res.output
    res = _invoke("verify", str(tiny_onnx), "--backend", "openvino", "--precision", "f32", "--localize")
    assert res.exit_code == 2 and "--localize" in res.output


def test_bench_openvino_rows(tiny_onnx: Path, tmp_path: Path) -> None:
    caps = _capabilities()
    out = tmp_path / "bench.json"
    res = _invoke("bench", str(tiny_onnx), "--backend", "pytorch,openvino,openvino-f16", "--shapes", "1x16x16",
                  "--warmup", "1", "--iterations", "2", "--threads", "2", "--no-isolate", "--report", str(out))
    assert res.exit_code == 0, res.output
    rows = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    expected = ["pytorch", "openvino-f32", "openvino-bf16"] + (["pytorch-bf16"] if native_bf16() else []) + ["openvino-f16"]
    assert list(rows) == expected
    assert rows["openvino-f32"]["status"] == "ok"
    assert rows["openvino-f32"]["settings"]["inference_precision"] == "f32"
    assert rows["openvino-f32"]["settings"]["threads"] == 2
    for name, cap in (("openvino-bf16", "BF16"), ("openvino-f16", "FP16")):
        if cap in caps:
            assert rows[name]["status"] == "ok" and rows[name]["settings"]["inference_precision"] == name.split("-")[1]
        else:
            assert rows[name]["status"] == "unavailable" and "never emulated" in rows[name]["error"]
    if native_bf16():
        assert rows["pytorch-bf16"]["status"] == "ok" and rows["pytorch-bf16"]["settings"]["autocast"] == "bfloat16"


def test_triton_openvino_config(tiny_onnx: Path, tmp_path: Path) -> None:
    ov = pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    from google.protobuf import text_format

    from attn_export.runners.ort_runner import OrtRunner
    from attn_export.triton import model_config_pb2, write_model_repository

    m = write_model_repository(tiny_onnx, tmp_path / "repo", name="ddpm_ov", backend="openvino", precision="bf16")
    assert m.validated
    pb2 = model_config_pb2()
    cfg = text_format.Parse(m.config_path.read_text(), pb2.ModelConfig())
    assert cfg.backend == "openvino" and cfg.platform == ""
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert {k: v.string_value for k, v in cfg.parameters.items()} == {
        "HINT_BF16": "YES", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    assert [(t.name, list(t.dims)) for t in cfg.input] == [("x", [-1, 3, -1, -1]), ("t", [-1])]
    assert cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU
    folder = tmp_path / "repo" / "ddpm_ov" / "1"
    assert sorted(p.name for p in folder.iterdir()) == ["model.bin", "model.xml"]
    # The IR holds the FP32 weights: at f32 it computes what the ONNX file computes.
    compiled = ov.Core().compile_model(str(folder / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ort = OrtRunner(tiny_onnx, attention="as-is")
    feeds = _feeds(ort.spec, 2, 16, 24, t_high=1000)
    assert np.abs(compiled(feeds)[0] - ort.infer(feeds)["out"]).max() < 1e-4
    # and it carries the time embedding's f32 marks, which the server's bf16 keeps
    assert m.f32_islands == "f32 islands: t embedding (6 nodes)"
    if "BF16" in _capabilities():
        from attn_export.runners.openvino_islands import held_at_low_precision

        bf16 = ov.Core().compile_model(str(folder / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
        assert held_at_low_precision(bf16) == []

    batched = write_model_repository(tiny_onnx, tmp_path / "repo", name="ddpm_ov_b", backend="openvino",
                                     precision="bf16", max_batch=4, instances=2)
    cfg = text_format.Parse(batched.config_path.read_text(), pb2.ModelConfig())
    assert cfg.max_batch_size == 4 and cfg.parameters["ENABLE_BATCH_PADDING"].string_value == "YES"
    assert cfg.parameters["NUM_STREAMS"].string_value == "2"


@pytest.mark.parametrize(("args", "message"), [
    (["--precision", "f32"], "cannot pin f32"),
    (["--precision", "f16"], "cannot pin f16"),
    (["--precision", "bf16", "--kind", "gpu"], "--kind cpu"),
    (["--precision", "bf16", "--form", "serving"], "as written"),
])
def test_triton_openvino_refusals(tiny_onnx: Path, tmp_path: Path, args: list[str], message: str) -> None:
    res = _invoke("triton", str(tiny_onnx), "--repo", str(tmp_path / "repo"), "--backend", "openvino", *args)
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_trajectory_on_openvino(tiny_onnx: Path) -> None:
    """verify --trajectory samples with OpenVINO as the candidate: f32 draws PyTorch's pictures; bf16 is judged by
    the FP16-class rule (what it draws from timesteps it rounds is in docs/benchmarks.md)."""
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    from attn_export.trajectory import default_rule, verify_trajectory

    f32 = verify_trajectory(tiny_onnx, 5, backend="openvino", precision="f32")
    assert f32.passed and f32.candidate.startswith("openvino (CPU, f32") and f32.precision == "fp32"
    assert min(i.psnr for i in f32.images) > 60
    if "BF16" in _capabilities():
        bf16 = verify_trajectory(tiny_onnx, 5, backend="openvino", precision="bf16")
        assert bf16.precision == "bf16" and bf16.rule == default_rule("bf16") != default_rule("fp32")
    with pytest.raises(UsageError, match="add --backend openvino"):
        verify_trajectory(tiny_onnx, 5, precision="bf16")
