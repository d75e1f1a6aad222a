"""The one attention analysis on the attention forms real UNets are written in.

Every model here is written in the test (tests/attention_zoo.py) or built with
onnx.helper: the seed article's bmm block, scale on q / on the logits / √scale
on q and k, constant or computed from the shape, K as [B, C, S] or transposed,
Einsum (channel-first and multi-head), SDPA, diffusers' UNet2DModel; through
the TorchScript exporter (our export path) and the dynamo exporter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import attention_zoo
from attn_export.engines.fusion import fusion_report
from attn_export.engines.readiness import check_trt_readiness
from attn_export.exporter import passes
from attn_export.exporter.onnx_export import _convert_opset, export_onnx
from attn_export.graph import canonicalize_attention, find_attention
from attn_export.inspection import inspect_artifact
from attn_export.models.loader import ModelSource
from conftest import run_cli_in_process as run

UNSEEN = [(1, 8, 8), (3, 32, 16), (2, 24, 40)]  # the export traces at 2 x (2m x 3m); none of these


def _session(model: onnx.ModelProto | str | Path) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _max_err_vs_torch(module: torch.nn.Module, model: onnx.ModelProto | str | Path) -> float:
    sess = _session(model)
    errs = []
    names = [i.name for i in sess.get_inputs()]
    for b, h, w in UNSEEN:
        x = np.random.default_rng(b * h + w).standard_normal((b, 3, h, w)).astype(np.float32)
        t = (np.arange(b) * 250 + 7).astype(np.int64)
        with torch.no_grad():
            out = module(torch.from_numpy(x), torch.from_numpy(t))
            ref = (out.sample if hasattr(out, "sample") else out).numpy()
        got = sess.run(None, dict(zip(names, (x, t))))[0]
        errs.append(float(np.abs(got - ref).max()))
    return max(errs)


def _torchscript(module: torch.nn.Module, path: Path) -> Path:
    """A plain TorchScript export at opset 17, none of our passes: the file as PyTorch writes it."""
    x, t = torch.randn(2, 3, 8, 12), torch.tensor([1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x, t), str(path), dynamo=False, opset_version=17, input_names=["x", "t"],
                          output_names=["y"], dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "t": {0: "b"}})
    return path


def _ops(model: onnx.ModelProto | str | Path) -> Counter:
    m = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    return Counter(n.op_type for n in m.graph.node)


# ---------------------------------------------------------------------------------------------------------------------
# through `attn-export onnx --model` (TorchScript trace, our passes)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo_exports(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("zoo")
    cache: dict[tuple[str, str], Path] = {}

    def _export(form: str, attention: str) -> Path:
        if (form, attention) not in cache:
            path = folder / f"{form}_{attention}.onnx"
            export_onnx(ModelSource(model=f"attention_zoo:{form}"), path, attention=attention)
            cache[(form, attention)] = path
        return cache[(form, attention)]

    return _export


@pytest.mark.parametrize("form", sorted(attention_zoo.FORMS))
@pytest.mark.parametrize("attention", ["op", "decomposed"])
def test_export_rewrites_every_site(zoo_exports, form: str, attention: str) -> None:
    path = zoo_exports(form, attention)
    sites = find_attention(onnx.load(str(path)))
    assert len(sites) == 2, [s.name for s in sites]
    assert all(s.problem is None for s in sites), [s.problem for s in sites]
    ops = _ops(path)
    if attention == "op":
        assert ops["Attention"] == 2 and ops["Softmax"] == 0 and ops["Einsum"] == 0
        assert {s.form for s in sites} == {"op"}
    else:
        assert ops["Attention"] == 0 and ops["Softmax"] == 2 and ops["Einsum"] == 0
        assert all(s.form == "decomposed" and s.canonical and s.scale_placement == "q" for s in sites)
    heads = attention_zoo.FORMS[form][1]
    expected_heads = 1 if form.startswith("einsum_channel_first") else heads  # legacy QKV folds heads into the batch
    ch = 32
    head_size = ch if form.startswith("einsum_channel_first") and heads == 1 else ch // heads
    for s in sites:
        assert s.heads == expected_heads and s.head_size == head_size
        assert s.scale == pytest.approx(head_size ** -0.5, rel=1e-6)
    assert [s.level for s in sites] == [0, 1]
    assert [s.seq_len for s in sites] == ["height*width", "(height/2)*(width/2)"]
    assert _max_err_vs_torch(attention_zoo.make(form), path) < 1e-4


def test_seed_block_scale_folded_from_the_shape(tmp_path: Path) -> None:
    """The seed's c ** -0.5 with c read from x.shape: a run-time Pow on a shape value, folded into the scale."""
    module = attention_zoo.make("seed_bmm")
    raw = _torchscript(module, tmp_path / "seed_raw.onnx")
    model = passes.optimize(onnx.load(str(raw)))
    assert _ops(model)["Pow"] == 2  # the scale really is computed at run time before the rewrite
    sites = find_attention(model)
    assert [(s.scale_placement, s.scale_source) for s in sites] == [("logits", "shape")] * 2
    assert all(s.k is not None and s.k.perm == [0, 2, 1] for s in sites)  # K came as [B, C, S]
    model = _convert_opset(model, 23)
    result = canonicalize_attention(model, "op")
    assert len(result.rewritten) == 2 and not result.unfused
    assert _ops(model)["Pow"] == 0  # the scale subgraph went with the old site
    assert _max_err_vs_torch(module, model) < 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# the dynamo exporter
# ---------------------------------------------------------------------------------------------------------------------
def _dynamo(module: torch.nn.Module, path: Path, opset: int) -> onnx.ModelProto:
    x, t = torch.randn(2, 3, 16, 24), torch.tensor([10, 500])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x, t), str(path), dynamo=True, opset_version=opset, input_names=["x", "t"],
                          output_names=["y"], verbose=False,
                          dynamic_shapes={"x": {0: "batch", 2: "height", 3: "width"}, "t": {0: "batch"}})
    return onnx.load(str(path))


@pytest.mark.parametrize("form", ["seed_bmm", "einsum_channel_first_mh", "sdpa_mh"])
def test_dynamo_exports(tmp_path: Path, form: str) -> None:
    module = attention_zoo.make(form)
    model = _convert_opset(_dynamo(module, tmp_path / "d.onnx", 18), 23)
    sites = find_attention(model)
    assert len(sites) == 2 and all(s.problem is None for s in sites), [s.problem for s in sites]
    for target in ("op", "decomposed"):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        result = canonicalize_attention(m, target)
        assert result.count == 2 and not result.unfused
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        onnx.checker.check_model(m, full_check=True)
        assert _ops(m)["Attention"] == (2 if target == "op" else 0)
        assert all(s.canonical for s in find_attention(m)) == (target == "decomposed")
        assert _max_err_vs_torch(module, m) < 1e-4


def test_dynamo_sdpa_at_opset_23_is_an_attention_node(tmp_path: Path) -> None:
    """Dynamo writes SDPA as one Attention node (no scale attribute); the analysis reads its default scale."""
    module = attention_zoo.make("sdpa_mh")
    model = _dynamo(module, tmp_path / "d23.onnx", 23)
    sites = find_attention(model)
    assert [s.form for s in sites] == ["op", "op"]
    assert all(s.scale == pytest.approx(8 ** -0.5) and s.scale_placement == "default" and s.heads == 4 for s in sites)
    result = canonicalize_attention(model, "decomposed")
    assert len(result.rewritten) == 2
    assert _ops(model)["Attention"] == 0 and all(s.canonical for s in find_attention(model))
    assert _max_err_vs_torch(module, model) < 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# FP16 with Casts around the attention (built with onnx.helper)
# ---------------------------------------------------------------------------------------------------------------------
def _fp16_graph(*, softmax_fp32: bool, scale_on: str, heads: int) -> onnx.ModelProto:
    """q, k, v inputs in FP16, [B, S, C] (heads 1) or [B, h, S, d]; Softmax optionally upcast to FP32."""
    F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT
    rank = 3 if heads == 1 else 4
    dims = ["B", "S", 32] if rank == 3 else ["B", heads, "S", 32 // heads]
    d = dims[-1]
    perm = [0, 2, 1] if rank == 3 else [0, 1, 3, 2]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], name="/att/Transpose", perm=perm)]
    inits = []
    q_in, kt_in = "q", "kt"
    if scale_on == "qk":
        inits.append(numpy_helper.from_array(np.array(d ** -0.25, dtype=np.float16), "root"))
        nodes += [helper.make_node("Mul", ["q", "root"], ["qs"], name="/att/Mul_q"),
                  helper.make_node("Mul", ["kt", "root"], ["kts"], name="/att/Mul_k")]
        q_in, kt_in = "qs", "kts"
    nodes.append(helper.make_node("MatMul", [q_in, kt_in], ["logits"], name="/att/MatMul"))
    x = "logits"
    if softmax_fp32:
        nodes.append(helper.make_node("Cast", [x], ["logits32"], name="/att/Cast", to=F32))
        x = "logits32"
    if scale_on == "logits":
        dtype = np.float32 if softmax_fp32 else np.float16
        inits.append(numpy_helper.from_array(np.array(d ** 0.5, dtype=dtype), "div"))
        nodes.append(helper.make_node("Div", [x, "div"], ["scaled"], name="/att/Div"))
        x = "scaled"
    nodes.append(helper.make_node("Softmax", [x], ["p"], name="/att/Softmax", axis=-1))
    p = "p"
    if softmax_fp32:
        nodes.append(helper.make_node("Cast", ["p"], ["p16"], name="/att/Cast_1", to=F16))
        p = "p16"
    nodes.append(helper.make_node("MatMul", [p, "v"], ["y"], name="/att/MatMul_1"))
    graph = helper.make_graph(nodes, "fp16_attention",
                              [helper.make_tensor_value_info(n, F16, dims) for n in ("q", "k", "v")],
                              [helper.make_tensor_value_info("y", F16, dims)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("softmax_fp32", [False, True])
@pytest.mark.parametrize("scale_on", ["qk", "logits"])
@pytest.mark.parametrize("heads", [1, 4])
def test_fp16_with_casts(softmax_fp32: bool, scale_on: str, heads: int) -> None:
    model = _fp16_graph(softmax_fp32=softmax_fp32, scale_on=scale_on, heads=heads)
    (site,) = find_attention(model)
    assert site.problem is None and site.dtype == "float16"
    assert site.softmax_dtype == ("float32" if softmax_fp32 else "float16")
    assert site.scale == pytest.approx((32 // heads) ** -0.5, rel=1e-3)
    rng = np.random.default_rng(0)
    for target in ("op", "decomposed"):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        assert canonicalize_attention(m, target).count == 1
        onnx.checker.check_model(onnx.shape_inference.infer_shapes(m, strict_mode=True), full_check=True)
        (after,) = find_attention(m)
        assert after.dtype == "float16" and (after.form == "op") == (target == "op")
        for s in (7, 33, 64):
            shape = (2, s, 32) if heads == 1 else (2, heads, s, 32 // heads)
            feeds = {n: (rng.standard_normal(shape) * 2).astype(np.float16) for n in ("q", "k", "v")}
            before = _session(model).run(None, feeds)[0]
            got = _session(m).run(None, feeds)[0]
            assert got.dtype == before.dtype == np.float16 and got.shape == before.shape
            # Both graphs round to FP16 in different places: each is held to float64 math. The decomposed
            # rewrite is no worse than the original (plus one FP16 step at |y| ~ 4); ONNX Runtime's FP16
            # Attention kernel on CPU is measurably less exact (0.006-0.010 here, against 0.002), so the op
            # form gets ten FP16 steps.
            q, k, v = (feeds[n].astype(np.float64) for n in ("q", "k", "v"))
            logits = q @ np.swapaxes(k, -1, -2) * (32 // heads) ** -0.5
            w = np.exp(logits - logits.max(-1, keepdims=True))
            exact = (w / w.sum(-1, keepdims=True)) @ v
            err_before = np.abs(before.astype(np.float64) - exact).max()
            bound = 2 * err_before + 2e-3 if target == "decomposed" else 0.02
            assert np.abs(got.astype(np.float64) - exact).max() <= bound


# ---------------------------------------------------------------------------------------------------------------------
# never silently unfused; every command counts the same sites
# ---------------------------------------------------------------------------------------------------------------------
def _cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """The installed command, as a user runs it (the zoo imports from the tests folder)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "COLUMNS": "250"}
    exe = Path(sys.executable).parent / "attn-export"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_unrecognized_attention_fails_the_export(tmp_path: Path) -> None:
    out = tmp_path / "biased.onnx"
    result = _cli("onnx", "--model", "attention_zoo:biased", "-o", out, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "/inner/att1/Softmax" in result.stderr and "sits between Q·Kᵀ and the Softmax" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written, no temporary left
    result = _cli("onnx", "--model", "attention_zoo:biased", "-o", out, "--allow-unfused", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.exists() and "NOT rewritten" in result.stdout and "/inner/att2" in result.stdout
    d = inspect_artifact(out).to_dict()
    assert d["attention_summary"]["count"] == 2 and d["attention_summary"]["rewritable"] == 0
    report = check_trt_readiness(out)
    assert len(report.attention) == 2 and len({f.node for f in report.unfused}) == 2
    assert report.verdict.startswith("builds, but 2 of 2 attention site(s) will not fuse")


@pytest.mark.parametrize("form", ["seed_bmm", "einsum_channel_first"])
def test_same_count_from_every_command(zoo_exports, tmp_path: Path, form: str) -> None:
    """inspect, inspect --trt and the engine fusion report see the same sites, before and after the rewrite."""
    raw = _torchscript(attention_zoo.make(form), tmp_path / "raw.onnx")
    for path in (raw, zoo_exports(form, "op"), zoo_exports(form, "decomposed")):
        n_inspect = inspect_artifact(path).to_dict()["attention_summary"]["count"]
        readiness = check_trt_readiness(path)
        fusion = fusion_report({"Layers": []}, readiness.attention)
        assert n_inspect == len(readiness.attention) == len(fusion.blocks) == 2
        if path == raw:  # scale after the product / an Einsum: inspect --trt must not say "ready"
            assert readiness.verdict != "ready" and readiness.unfused
    cli = run("inspect", raw, "--trt")
    assert "attention: 2 site(s)" in cli.stdout and "ready\n" not in cli.stdout


@pytest.mark.slow
def test_diffusers_unet2d_ddpm_cifar10(tmp_path: Path) -> None:
    out = tmp_path / "diffusers.onnx"
    result = export_onnx(ModelSource(model="attention_zoo:diffusers_ddpm_cifar10"), out)
    assert result.attention_nodes == 6 and not result.unfused
    assert _ops(out)["Attention"] == 6 and _ops(out)["Softmax"] == 0
    sites = find_attention(onnx.load(str(out)))
    assert [s.head_size for s in sites] == [256] * 6 and [s.level for s in sites] == [1, 1, 3, 1, 1, 1]
    module = attention_zoo.diffusers_ddpm_cifar10()
    assert _max_err_vs_torch(module, out) < 1e-4
    d = inspect_artifact(out).to_dict()
    assert d["attention_summary"]["count"] == 6 == len(check_trt_readiness(out).attention)


def test_diffusers_classic_processor_baddbmm(tmp_path: Path) -> None:
    """diffusers' classic AttnProcessor: baddbmm(empty, q, kᵀ, beta=0, alpha=scale), multi-head folded into the batch."""
    out = tmp_path / "classic.onnx"
    result = export_onnx(ModelSource(model="attention_zoo:diffusers_small_classic"), out)
    assert result.attention_nodes == 4 and not result.unfused
    sites = find_attention(onnx.load(str(out)))
    assert all(s.head_size == 8 and s.scale == pytest.approx(8 ** -0.5) for s in sites)
    assert _max_err_vs_torch(attention_zoo.diffusers_small_classic(), out) < 1e-4
