"""UNets written the way released code writes them, through the default command.

The models (tests/export_zoo.py) are written here in the style of released UNet code: attention run through a
``torch.autograd.Function`` (gradient checkpointing), a blur kernel built at run time for a strided convolution,
guided-diffusion's QKVAttention scale, NCSN++'s 5-D spatial attention, a model of one size, a text-context input
(cross-attention), and forwards that raise. No third-party source is copied.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from pathlib import Path

import onnx
import pytest

from attn_export.errors import ExportFailed
from attn_export.exporter.fp16 import convert_fp16
from attn_export.exporter.metadata import find_spec
from attn_export.exporter.onnx_export import export_onnx
from attn_export.graph import find_attention
from attn_export.models.loader import ModelSource
from conftest import run_cli_in_process as run


@pytest.fixture
def log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary folder of this test's own for the exporters' log (other runs may share the system's)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _logs(folder: Path) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "attn-export-*.export.log")))


def test_autograd_function_falls_back_to_dynamo(tmp_path: Path, log_dir: Path) -> None:
    out = tmp_path / "g.onnx"
    r = export_onnx(ModelSource(model="export_zoo:guided"), out)
    assert r.exporter == "dynamo" and r.fallback and r.fallback.startswith("torchscript: RuntimeError")
    assert r.check is not None and r.check["passed"]
    model = onnx.load(str(out))
    assert find_spec(model, out).exporter == "dynamo"
    (site,) = find_attention(model)
    assert site.name == "/inner/att", site.name  # named by module path, as the tracer names nodes, not node_softmax
    assert _logs(log_dir) == []  # the exporters' log goes once an exporter succeeds


def test_runtime_kernel_one_line_no_ir_dump(tmp_path: Path, wide_console) -> None:
    r = run("onnx", "--model", "export_zoo:runtime_kernel", "-o", tmp_path / "r.onnx")
    assert r.exit_code == 0, r.output
    assert "dynamo (torch.export), after the TorchScript tracer failed" in r.output and "SymbolicValueError" in r.output
    assert "graph(" not in r.output and len(r.output) < 6000  # no TorchScript IR on the console


def test_presets_keep_the_tracer(tmp_path: Path) -> None:
    r = export_onnx(ModelSource(preset="tiny"), tmp_path / "t.onnx", check=False)
    assert r.exporter == "torchscript" and r.fallback is None
    assert find_spec(onnx.load(str(tmp_path / "t.onnx")), "t").exporter == "torchscript"


def test_forced_exporter_failure_names_its_log(tmp_path: Path, log_dir: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportFailed) as exc:
        export_onnx(ModelSource(model="export_zoo:guided"), out / "g.onnx", exporter="torchscript")
    message = str(exc.value)
    assert exc.value.exit_code == 1 and "\n" not in message and "torchscript: RuntimeError" in message
    logs = _logs(log_dir)
    assert len(logs) == 1 and logs[0] in message
    text = Path(logs[0]).read_text()
    assert "the torchscript exporter failed" in text and "Traceback" in text
    assert list(out.iterdir()) == []


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


# --------------------------------------------------------------------------- a model that serves one size
@pytest.fixture(scope="module")
def one_size(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("static") / "one.onnx"
    r = run("onnx", "--model", "export_zoo:one_size", "--static-hw", "32x32", "-o", out)
    assert r.exit_code == 0, r.output
    return out


def test_probe_failure_says_why_and_suggests_static_hw(tmp_path: Path) -> None:
    r = run("onnx", "--model", "export_zoo:one_size", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 2 and "--static-hw" in r.output and "must match the size of tensor b (32)" in r.output


def test_static_hw_export(one_size: Path) -> None:
    model = onnx.load(str(one_size))
    dims = [(d.dim_param or d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 32, 32]
    spec = find_spec(model, one_size)
    assert spec.fixed_hw == (32, 32) and spec.source["static_hw"] == [32, 32]
    from attn_export.engines.profiles import default_profile

    p = default_profile(spec)
    assert p.min[1:] == p.opt[1:] == p.max[1:] == (32, 32) and p.max[0] > 1


def test_static_hw_verify_and_fp16_follow(one_size: Path, tmp_path: Path, wide_console) -> None:
    r = run("verify", one_size, "--model", "export_zoo:one_size")
    assert r.exit_code == 0 and "PASSED" in r.output, r.output
    shapes = re.findall(r"^\W*(\d+)x(\d+)x(\d+)\W", r.output, re.MULTILINE)
    assert len(shapes) >= 2 and all((h, w) == ("32", "32") for _, h, w in shapes), r.output
    assert len({b for b, _, _ in shapes}) >= 2  # the sweep varies the batch instead
    half = convert_fp16(one_size, tmp_path / "half.onnx", check=False)
    assert half.audit.calibration_shapes and all(s[1:] == (32, 32) for s in half.audit.calibration_shapes)


def test_static_hw_bad_values(tmp_path: Path) -> None:
    r = run("onnx", "--preset", "tiny", "--static-hw", "32", "-o", tmp_path / "t.onnx")
    assert r.exit_code == 2 and "HEIGHTxWIDTH" in r.output
    r = run("onnx", "--preset", "tiny", "--static-hw", "30x30", "-o", tmp_path / "t.onnx")
    assert r.exit_code == 2 and "multiples of 4" in r.output
    r = run("onnx", "--preset", "tiny", "--static-hw", "32x64", "-o", tmp_path / "t.onnx")
    assert r.exit_code == 0, r.output
    assert find_spec(onnx.load(str(tmp_path / "t.onnx")), "t").fixed_hw == (32, 64)


def test_total_scale_counts_factors_before_a_reshape(tmp_path: Path) -> None:
    # guided-diffusion's QKVAttention: (q * ch**-0.25).view(...), (k * ch**-0.25).view(...): the softmax scale is
    # ch**-0.5 (ch = 32 per head), reported whole; the rewrite keeps those Muls and puts no second scale on the site.
    import torch

    import export_zoo

    path = tmp_path / "qkv.onnx"
    torch.onnx.export(export_zoo.qkv_new_order(), (torch.randn(2, 3, 16, 24), torch.tensor([1, 2])), str(path),
                      dynamo=False, opset_version=18, input_names=["x", "t"], output_names=["out"],
                      dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}, "t": {0: "N"}, "out": {0: "N", 2: "H", 3: "W"}})
    site = find_attention(onnx.load(str(path)))[0]
    assert site.scale == pytest.approx(1.0) and site.total_scale == pytest.approx(32 ** -0.5, rel=1e-6)
    r = run("inspect", path, "--json")
    assert r.exit_code == 0
    import json

    reported = json.loads(r.output)["attention"][0]
    assert reported["scale"] == pytest.approx(32 ** -0.5, rel=1e-6) and "before a reshape" in reported["scale_placement"]
    # optimize rewrites the site and checks it against the file: the same numbers.
    r = run("optimize", path, "-o", tmp_path / "opt.onnx", "--shapes", "x:1x3x16x16")
    assert r.exit_code == 0, r.output


def test_cross_attention_is_reported_as_such(tmp_path: Path, wide_console) -> None:
    # A context input [B, 7, 48]: the second site's K and V come from it alone.
    import json

    import torch

    import export_zoo

    torch.manual_seed(0)
    path = tmp_path / "cross.onnx"
    class Positional(torch.nn.Module):  # plain torch.onnx.export passes every input by position
        def __init__(self) -> None:
            super().__init__()
            self.inner = export_zoo.CrossAttend().eval()

        def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return self.inner(x, t, context=context)

    torch.onnx.export(Positional().eval(), (torch.randn(2, 3, 8, 12), torch.tensor([1, 2]), torch.randn(2, 7, 48)), str(path),
                      dynamo=False, opset_version=18, input_names=["x", "t", "context"], output_names=["out"],
                      dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}, "t": {0: "N"}, "context": {0: "N"},
                                    "out": {0: "N", 2: "H", 3: "W"}})
    sites = find_attention(onnx.load(str(path)))
    assert [s.kind for s in sites] == ["self", "cross"]
    assert sites[1].kv_len == 7 and sites[0].kv_len == sites[0].seq_len
    r = run("inspect", path, "--json")
    reported = json.loads(r.output)["attention"]
    assert [a["kind"] for a in reported] == ["self", "cross"] and reported[1]["kv_len"] == 7
    r = run("inspect", path)
    assert "cross: " in r.output and "/ 7" in r.output


# --------------------------------------------------------------------------- conditioning inputs
def test_extra_input_through_the_path(tmp_path: Path, wide_console) -> None:
    """A text-context input [B, 7, 48], passed by keyword: export, inspect, verify, Triton config, engine profiles."""
    import json

    out = tmp_path / "c.onnx"
    r = run("onnx", "--model", "export_zoo:cross_attend", "--extra-input", "context:float32:batch,7,48", "-o", out)
    assert r.exit_code == 0, r.output
    model = onnx.load(str(out))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["context"] == ["batch", 7, 48]
    spec = find_spec(model, out)
    assert [t.name for t in spec.inputs] == ["x", "t", "context"] and spec.source["extra_inputs"][0]["name"] == "context"
    sites = json.loads(run("inspect", out, "--json").output)["attention"]
    assert [(a["kind"], a["kv_len"]) for a in sites] == [("self", "height*width"), ("cross", 7)]
    r = run("verify", out, "--model", "export_zoo:cross_attend")
    assert r.exit_code == 0 and "PASSED" in r.output, r.output
    repo = tmp_path / "repo"
    repo.mkdir()
    r = run("triton", out, "--repo", repo)
    assert r.exit_code == 0, r.output
    config = (repo / "c" / "config.pbtxt").read_text()
    assert 'name: "context"' in config and "dims: [ 7, 48 ]" in config
    from attn_export.engines.profiles import default_profile, tensor_shapes

    shapes = tensor_shapes(default_profile(spec), spec)
    assert shapes["context"] == ((1, 7, 48), (1, 7, 48), (4, 7, 48))


@pytest.mark.parametrize("text, says", [
    ("context:float32", "NAME:DTYPE:DIMS"),
    ("context:float64:batch,7", "dtype must be one of"),
    ("context:float32:batch,seq,48", "needs its size: write seq=77"),
    ("context:float32:batch,seq=9-7-16,48", "min <= opt <= max"),
    ("context:float32:batch,height=7,48", "must be a new name"),
    ("context:float32:7,batch", "batch must be the first dim"),
    ("t:float32:batch,7", "the name is taken"),
])
def test_extra_input_refusals(text: str, says: str, tmp_path: Path) -> None:
    r = run("onnx", "--model", "export_zoo:cross_attend", "--extra-input", text, "-o", tmp_path / "c.onnx")
    assert r.exit_code == 2 and says in r.output, r.output
    r = run("onnx", "--preset", "tiny", "--extra-input", "c:float32:batch,4", "-o", tmp_path / "t.onnx")
    assert r.exit_code == 2 and "needs --model" in r.output


# --------------------------------------------------------------------------- Score-SDE's attention form
def test_ncsnpp_spatial_attention_is_rewritten(tmp_path: Path) -> None:
    """5-D einsums with a reshape of the key axes around the softmax: layout, rewritten, fused-form, exact."""
    import json

    import torch

    import export_zoo

    out = tmp_path / "n.onnx"
    r = export_onnx(ModelSource(model="export_zoo:spatial_net"), out)
    assert r.attention_nodes == 2 and not r.unfused and r.check is not None and r.check["passed"]
    sites = find_attention(onnx.load(str(out)))
    assert len(sites) == 2 and all(s.form == "op" and s.head_size == 32 for s in sites)
    assert [s.total_scale for s in sites] == pytest.approx([32 ** -0.5] * 2)
    # A file exported elsewhere: inspect reads its sites as optimize will, and optimize rewrites them.
    raw = tmp_path / "raw.onnx"
    torch.onnx.export(export_zoo.spatial_net(), (torch.randn(2, 3, 16, 16), torch.tensor([1, 2])), str(raw), dynamo=False,
                      opset_version=18, input_names=["x", "t"], output_names=["out"],
                      dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}, "t": {0: "N"}, "out": {0: "N", 2: "H", 3: "W"}})
    reported = json.loads(run("inspect", raw, "--json").output)["attention"]
    assert len(reported) == 2 and all(a["problem"] is None and a["form"] == "einsum" for a in reported)
    assert all("mask or bias" not in a["trt_fusion"] for a in reported)
    r2 = run("optimize", raw, "-o", tmp_path / "opt.onnx", "--shapes", "x:1x3x16x16")
    assert r2.exit_code == 0, r2.output
    assert sum(n.op_type == "Attention" for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node) == 2


def test_an_input_the_forward_never_reads_stays_an_input(tmp_path: Path) -> None:
    # The exporter prunes an unread input; the file keeps it (unread), so every declared feed is accepted.
    out = tmp_path / "u.onnx"
    r = export_onnx(ModelSource(model="export_zoo:ignores_t"), out)
    assert r.check is not None and r.check["passed"]
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["x", "t"]
    r2 = run("verify", out, "--model", "export_zoo:ignores_t")
    assert r2.exit_code == 0 and "PASSED" in r2.output, r2.output


# --------------------------------------------------------------------------- masked attention
MASK_INPUTS = ("--extra-input", "context:float32:batch,7,48", "--extra-input", "context_mask:bool:batch,7")


def _masked_export(tmp_path: Path, style: str, *options: str) -> Path:
    out = tmp_path / f"{style}.onnx"
    r = run("onnx", "--model", "export_zoo:masked_cross", "--model-kwargs", f'{{"style": "{style}"}}', *MASK_INPUTS,
            *options, "-o", out)
    assert r.exit_code == 0, r.output
    return out


def _against_pytorch(path: Path, style: str) -> tuple[float, float]:
    """(max |ONNX Runtime - PyTorch|, max |PyTorch with the mask - PyTorch without it|) at an unseen shape."""
    import numpy as np
    import onnxruntime as ort
    import torch

    import export_zoo

    spec = find_spec(onnx.load(str(path), load_external_data=False), path)
    feeds = spec.make_inputs(3, 8, 20, seed=11)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    model = export_zoo.masked_cross(style)
    args = (torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["t"]))
    with torch.no_grad():
        want = model(*args, context=torch.from_numpy(feeds["context"]),
                     context_mask=torch.from_numpy(feeds["context_mask"])).numpy()
        unmasked = model(*args, context=torch.from_numpy(feeds["context"]),
                         context_mask=torch.ones_like(torch.from_numpy(feeds["context_mask"]))).numpy()
    return float(np.abs(got - want).max()), float(np.abs(unmasked - want).max())


@pytest.mark.parametrize("style, kind", [("sdpa", "additive"), ("masked_fill", "drop"), ("additive", "additive")])
@pytest.mark.parametrize("form", ["op", "decomposed"])
def test_masked_attention_is_rewritten_with_its_mask(style: str, kind: str, form: str, tmp_path: Path) -> None:
    """A key-padding mask written three ways: one site with its mask, rewritten into either form, exact."""
    raw = tmp_path / "raw"
    raw.mkdir()
    path = _masked_export(tmp_path, style, "--attention", form)
    (site,) = find_attention(onnx.load(str(path)))
    assert site.problem is None and site.form == form and site.kind == "cross" and site.mask is not None
    if form == "decomposed":
        assert site.canonical and site.mask.kind == "additive"  # the canonical chain: MatMul -> Add -> Softmax
        assert site.nan_to_zero == (style == "sdpa")  # SDPA's guard for fully masked rows is kept
    else:
        # ONNX Runtime's Attention kernel needs the query axis of the mask at full length.
        assert site.mask.full_query_axis
    err, effect = _against_pytorch(path, style)
    assert effect > 1e-2, "the drawn mask must change the output, or this test proves nothing"
    assert err < 1e-4


def test_masked_attention_as_the_dynamo_exporter_writes_it(tmp_path: Path) -> None:
    """dynamo at opset 23 writes one Attention node with a [B, 1, 1, S_kv] boolean mask; ONNX Runtime's kernel
    refuses that broadcast ("inconsistent q_sequence_length"): the export expands it, and verify passes."""
    path = _masked_export(tmp_path, "sdpa", "--exporter", "dynamo")
    (site,) = find_attention(onnx.load(str(path)))
    assert site.form == "op" and site.mask is not None and site.mask.kind == "keep" and site.mask.full_query_axis
    err, effect = _against_pytorch(path, "sdpa")
    assert err < 1e-4 and effect > 1e-2
    r = run("verify", path, "--model", "export_zoo:masked_cross")
    assert r.exit_code == 0 and "PASSED" in r.output, r.output


def test_masked_attention_fp16_keeps_the_site_in_fp16(tmp_path: Path, wide_console) -> None:
    """A mask's -inf and -1e4 are masking, not an FP16 overflow: no FP32 island at the site, and it verifies."""
    import numpy as np

    for style in ("sdpa", "additive"):
        path = _masked_export(tmp_path, style)
        half = tmp_path / f"{style}.fp16.onnx"
        r = run("fp16", path, "--model", "export_zoo:masked_cross", "--model-kwargs", f'{{"style": "{style}"}}',
                "-o", half)
        assert r.exit_code == 0 and "FP32 islands: 0 node(s)" in r.output, r.output
        model = onnx.load(str(half))
        (site,) = find_attention(model)
        assert site.dtype == "float16" and site.form == "op" and site.mask is not None
        if style == "sdpa":  # SDPA's -inf fill stays -inf in FP16 (not clamped to -65504)
            fills = [a for i in model.graph.initializer if (a := onnx.numpy_helper.to_array(i)).dtype == np.float16]
            assert any(np.isneginf(a).any() for a in fills)
        err, effect = _against_pytorch(half, style)
        assert err < 1e-2 and effect > 1e-2


def test_readiness_of_masked_attention_per_target(tmp_path: Path) -> None:
    from attn_export.engines.readiness import check_trt_readiness

    op = _masked_export(tmp_path, "sdpa")
    decomposed = tmp_path / "d" / "sdpa.onnx"
    decomposed.parent.mkdir()
    r = run("onnx", "--model", "export_zoo:masked_cross", *MASK_INPUTS, "--attention", "decomposed", "-o", decomposed)
    assert r.exit_code == 0, r.output
    codes = lambda path, **kw: {f.code: f.level for f in check_trt_readiness(path, fp16=False, **kw).findings}  # noqa: E731
    assert codes(op)["attention-masked"] == "ok" and "attention-mask" not in codes(op)
    assert codes(decomposed)["attention-mask"] == "warning"          # TensorRT's pattern fusion: masks break it
    assert codes(decomposed, target="10.12")["attention-mask"] == "warning"
    assert codes(decomposed, runtime="rtx")["attention-masked"] == "ok"  # measured: TensorRT-RTX fuses both forms


def test_boolean_inputs_are_drawn_as_padding_masks() -> None:
    import numpy as np

    from attn_export.spec import padding_mask

    rng = np.random.default_rng(0)
    for shape in [(4, 7), (2, 1, 1, 9), (3, 2)]:
        m = padding_mask(rng, shape)
        assert m.shape == shape and m.dtype == bool
        assert m.any(axis=-1).all()          # no row fully masked (NaN in PyTorch)
        assert not m.all()                   # some key is masked, so a dropped mask shows
        assert (np.diff(m.astype(int), axis=-1) <= 0).all()  # a prefix: attended keys first, padding after


def test_extra_input_with_a_dynamic_length(tmp_path: Path, wide_console) -> None:
    """A context of any length 1..16 (7 usual) and its padding mask of the same length: one named axis, carried into
    the file, the runners, the engine profiles and Triton's config."""
    import numpy as np

    from attn_export.engines.profiles import default_profile, tensor_shapes
    from attn_export.runners.ort_runner import OrtRunner

    out = tmp_path / "seq.onnx"
    r = run("onnx", "--model", "export_zoo:masked_cross", "--extra-input", "context:float32:batch,seq=1-7-16,48",
            "--extra-input", "context_mask:bool:batch,seq", "-o", out)
    assert r.exit_code == 0, r.output
    model = onnx.load(str(out))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["context"] == ["batch", "seq", 48] and dims["context_mask"] == ["batch", "seq"]
    spec = find_spec(model, out)
    assert spec.axis_sizes == {"seq": [1, 7, 16]}
    shapes = tensor_shapes(default_profile(spec), spec)
    assert shapes["context"][0][1] == 1 and shapes["context"][1][1] == 7 and shapes["context"][2][1] == 16
    # Another length than the export's, against PyTorch: the axis is really dynamic.
    import torch

    import export_zoo

    feeds = spec.make_inputs(2, 8, 12, seed=5)
    rng = np.random.default_rng(1)
    feeds["context"] = rng.standard_normal((2, 12, 48)).astype(np.float32)
    feeds["context_mask"] = np.arange(12) < np.array([[5], [12]])
    got = OrtRunner(out).infer(feeds)["out"]
    with torch.no_grad():
        want = export_zoo.masked_cross()(torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["t"]),
                                         context=torch.from_numpy(feeds["context"]),
                                         context_mask=torch.from_numpy(feeds["context_mask"])).numpy()
    assert np.abs(np.asarray(got) - want).max() < 1e-4
    feeds["context"] = feeds["context"][:, :3]
    with pytest.raises(Exception, match="axis seq must be one size"):
        OrtRunner(out).infer(feeds)
    repo = tmp_path / "repo"
    repo.mkdir()
    assert run("triton", out, "--repo", repo).exit_code == 0
    config = (repo / "seq" / "config.pbtxt").read_text()
    assert "dims: [ -1, 48 ]" in config
    r = run("verify", out, "--model", "export_zoo:masked_cross")
    assert r.exit_code == 0 and "PASSED" in r.output, r.output


def test_a_cross_attention_whose_queries_read_the_context_is_still_cross(tmp_path: Path) -> None:
    # Deeper in a Stable-Diffusion UNet, Q has passed through earlier cross-attention: K is still the context's.
    out = tmp_path / "two.onnx"
    r = run("onnx", "--model", "export_zoo:two_cross", "--extra-input", "context:float32:batch,7,48", "-o", out)
    assert r.exit_code == 0, r.output
    sites = find_attention(onnx.load(str(out)))
    assert [(s.kind, s.kv_len) for s in sites] == [("cross", 7), ("cross", 7)]


def test_diffusers_sd_layout_unet(tmp_path: Path) -> None:
    """diffusers' UNet2DConditionModel (SD layout): every site found with its kind, and its attention scores counted
    in the memory estimate though shape inference loses their lengths (default FP16 calibration at 128 px once
    needed 16 GiB and was killed)."""
    from attn_export.exporter.audit import default_calibration_shapes
    from attn_export.graph.memory import SizeModel, shapes_that_fit

    out = tmp_path / "sd.onnx"
    r = run("onnx", "--model", "export_zoo:diffusers_sd", "--extra-input", "encoder_hidden_states:float32:batch,77,32",
            "-o", out)
    assert r.exit_code == 0, r.output
    model = onnx.load(str(out), load_external_data=False)
    sites = find_attention(model)
    assert [s.kind for s in sites] == ["self", "cross"] * 4 and all(s.kv_len == 77 for s in sites if s.kind == "cross")
    spec = find_spec(model, out)
    est = SizeModel(model, spec).estimate((1, 128, 128), keep_all=True)
    # Full-resolution self-attention, 8 heads of 16384 x 16384 fp32 logits and probabilities: 16 GiB.
    assert est.attention >= 16 * 2**30
    sizes = SizeModel(model, spec)
    fit, left = shapes_that_fit(model, spec, default_calibration_shapes(spec), 24 * 2**30, keep_all=True, sizes=sizes)
    assert (1, 128, 128) not in fit and len(left) == 1 and "left out" in left[0]
    # The covering shape was over the bound, so each shape was estimated on its own to name the one left out.
    assert sizes.inferences == 1 + len(default_calibration_shapes(spec))


def test_learned_memory_keys_count_in_the_key_length(tmp_path: Path) -> None:
    out = tmp_path / "mem.onnx"
    r = run("onnx", "--model", "export_zoo:memory_kv", "-o", out)
    assert r.exit_code == 0, r.output
    (site,) = find_attention(onnx.load(str(out)))
    assert site.kind == "self" and site.seq_len == "height*width" and site.kv_len == "height*width+4"
