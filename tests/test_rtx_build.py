"""Real engines, built on this CPU by TensorRT-RTX's own builder (CPU-only AOT), and the fusion report they get.

Every build here is real: tensorrt-rtx is a test dependency, and its builder
makes engines without a GPU. What each test proves:

* the engine and its sidecar are written (together, nothing else left behind);
* the report's per-site verdicts agree with an independent build of the same
  file through the raw TensorRT-RTX API (no attn-export code), whose fused
  attention layers (``_gemm_mha_v2``) are counted and mapped to ONNX nodes;
* the readiness rules predict what the builder does: a site is predicted to
  fuse exactly when the builder fuses it.

Running the engines needs a GPU (tests/test_trt_gpu.py). Small profiles keep
the builds to seconds; the large presets are marked ``slow``.
"""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import onnx
import pytest

import attention_zoo
from attn_export.engines.profiles import Profile
from attn_export.engines.readiness import check_trt_readiness, predicted_fusable
from attn_export.errors import CheckFailed, UsageError
from attn_export.exporter.fp16 import convert_fp16
from attn_export.exporter.onnx_export import export_onnx
from attn_export.exporter.optimize import optimize_onnx
from attn_export.graph import find_attention
from attn_export.models.loader import ModelSource
from attn_export.pipeline import EngineResult, build_engine
from conftest import run_cli_in_process

# The wheels exist for Linux x86-64 and Windows only; there the test extra installs them, so a missing module fails.
SUPPORTED = (platform.system() == "Linux" and platform.machine() == "x86_64") or platform.system() == "Windows"
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="TensorRT-RTX has wheels for Linux x86-64 and Windows only")

RANGE = Profile((1, 32, 32), (2, 32, 32), (2, 64, 64))   # a batch range: what serving uses
BATCH_ONE = Profile((1, 32, 32), (1, 32, 32), (1, 64, 64))


# --------------------------------------------------------------------------- an independent build
def independent_build_profiles(onnx_path: Path, profiles: list[Profile]) -> list[str]:
    """The names of the fused attention layers of a raw TensorRT-RTX build with several profiles."""
    result = _raw_build(onnx_path, profiles, decomposable=True)
    assert result is not None, "the independent build failed"
    return list(result)


def independent_build(onnx_path: Path, profile: Profile, *, decomposable: bool = True) -> list[list[str]] | None:
    """Build ``onnx_path`` with the raw TensorRT-RTX API; the ONNX nodes of each fused attention layer (None: no engine)."""
    result = _raw_build(onnx_path, [profile], decomposable=decomposable)
    return None if result is None else list(result.values())


def _raw_build(onnx_path: Path, profiles: list[Profile], *, decomposable: bool) -> dict[str, list[str]] | None:
    """Build ``onnx_path`` with the raw TensorRT-RTX API: each fused attention layer and its ONNX nodes (None: no engine).

    Nothing of attn-export is used: parser, profile, builder and the layer
    log are TensorRT-RTX's own. ``decomposable`` marks the Attention layers as
    ``attn-export trt`` does; without it, a site with no fused kernel fails
    the whole build.
    """
    import tensorrt_rtx as trt

    lines: list[str] = []

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            lines.extend(msg.splitlines())

    logger = Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(onnx_path))
    if decomposable:
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.ATTENTION_INPUT:
                layer.__class__ = trt.IAttentionInputLayer
                layer.attention.decomposable = True
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for profile in profiles:
        opt = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            dims = list(t.shape)  # batch first; H and W of the image; every other dim static
            shapes = [tuple([b, dims[1], h, w] if len(dims) == 4 else [b, *dims[1:]]) for b, h, w in (profile.min, profile.opt, profile.max)]
            opt.set_shape(t.name, *shapes)
        config.add_optimization_profile(opt)
    if builder.build_serialized_network(network, config) is None:
        return None
    fused: dict[str, list[str]] = {}
    for line in lines:
        m = re.match(r"Name: (_gemm_mha\w*), .*Metadata: (.*)$", line.strip())
        if m:
            fused[m.group(1)] = re.findall(r"\[ONNX Layer: ([^\]]*)\]", m.group(2))
    return fused


def assert_agrees(result: EngineResult, onnx_path: Path, profile: Profile) -> None:
    """The report agrees with the independent build, and the readiness rules predicted it."""
    assert result.build is not None and result.readiness is not None
    report = result.build.fusion
    assert report.source == "build log" and report.verbosity == "detailed"
    assert [b.name for b in report.blocks] == [s.name for s in find_attention(onnx.load(str(onnx_path), load_external_data=False))]
    fused_layers = independent_build(onnx_path, profile)
    assert fused_layers is not None, "the independent build failed"
    assert report.fused_layer_count == len(fused_layers)
    for block, site in zip(report.blocks, result.readiness.attention):
        independent = any({site.anchor, *site.nodes} & set(nodes) for nodes in fused_layers)
        assert (block.verdict == "fused") == independent, (block.name, block.verdict, fused_layers)
        assert block.verdict in ("fused", "separate kernels"), block
    predicted = predicted_fusable(result.readiness)
    assert {b.name for b in report.blocks if b.verdict == "fused"} == predicted, (report.summary(), result.readiness.verdict)


def _engine(path: Path, tmp_path: Path, profile: Profile, name: str = "m.plan", **kwargs: object) -> EngineResult:
    return build_engine(path, tmp_path / name, [profile], runtime="rtx", **kwargs)  # type: ignore[arg-type]


def _written(tmp_path: Path, name: str = "m.plan") -> dict:
    """The engine and its sidecar are there, nothing else is, and the sidecar describes this engine."""
    import hashlib

    engine, side = tmp_path / name, tmp_path / (name + ".json")
    assert engine.is_file() and side.is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    data = json.loads(side.read_text())
    assert data["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    assert data["runtime"] == "rtx" and data["tensorrt_version"].startswith("1.")
    assert data["compute_capabilities"] and data["gpu"] is None
    return data


# --------------------------------------------------------------------------- files to build
@pytest.fixture(scope="session")
def half(tmp_path_factory: pytest.TempPathFactory, export_model):
    """half(fp32_path) -> its FP16 file (converted once, unchecked: the builder is what these tests exercise)."""
    folder = tmp_path_factory.mktemp("fp16")
    done: dict[Path, Path] = {}

    def convert(path: Path, **kwargs: object) -> Path:
        if path not in done:
            out = folder / (path.stem + ".fp16.onnx")
            convert_fp16(path, out, check=False, calibration_shapes=[(1, 32, 32)], **kwargs)  # type: ignore[arg-type]
            done[path] = out
        return done[path]

    return convert


@pytest.mark.parametrize("attention", ["op", "decomposed"])
def test_tiny_fp16_fuses_every_site(attention: str, export_model, half, tmp_path: Path) -> None:
    path = half(export_model("tiny", attention))
    result = _engine(path, tmp_path, RANGE)
    assert_agrees(result, path, RANGE)
    report = result.build.fusion
    assert len(report.blocks) == 4 and all(b.verdict == "fused" for b in report.blocks)
    data = _written(tmp_path)
    assert data["precision"] == "fp16" and data["fusion"]["source"] == "build log"
    assert data["build"]["attention_decomposable"] is True
    assert [io["name"] for io in data["io"]] == ["x", "t", "out"]


def test_batch_one_profile_does_not_fuse_one_head(export_model, half, tmp_path: Path) -> None:
    # One head at batch 1: the builder fuses none of the sites; the rules say so, so the build is not refused.
    path = half(export_model("tiny", "op"))
    result = _engine(path, tmp_path, BATCH_ONE)
    assert "batch-one" in result.readiness.codes("warning")
    assert_agrees(result, path, BATCH_ONE)
    assert all(b.verdict == "separate kernels" and "batch 1" in (b.reason or "") for b in result.build.fusion.blocks)
    _written(tmp_path)


def test_profiles_get_their_own_verdicts(export_model, half, tmp_path: Path) -> None:
    # Two profiles, one fixed at batch 1: each profile is its own graph; the site fuses in the range profile only.
    path = half(export_model("tiny", "op"))
    result = build_engine(path, tmp_path / "m.plan", [BATCH_ONE, RANGE], runtime="rtx")
    assert any(f.code == "batch-one" and "in profile 0" in f.message for f in result.readiness.findings)
    report = result.build.fusion
    for block in report.blocks:
        assert block.verdict == "partly fused" and block.profiles == {"0": "separate kernels", "1": "fused"}, block
        assert "separate kernels in profile 0 (one attention head at batch 1" in block.reason
    assert not report.all_fused and "partly fused" in report.summary()
    # The independent build's fused layers: one per site, all in the second profile's graph.
    independent = independent_build_profiles(path, [BATCH_ONE, RANGE])
    assert len(independent) == len(report.blocks) and all("_myl1_" in name for name in independent)
    _written(tmp_path)


def test_fp32_file_builds_unfused(export_model, tmp_path: Path) -> None:
    # No fused kernel takes FP32 Q/K/V: marked decomposable, the Attention ops build as separate kernels.
    path = export_model("tiny", "op")
    assert independent_build(path, RANGE, decomposable=False) is None  # as TensorRT-RTX reads the file by default
    result = _engine(path, tmp_path, RANGE)
    assert_agrees(result, path, RANGE)
    assert all(b.verdict == "separate kernels" and "FP32" in (b.reason or "") for b in result.build.fusion.blocks)
    assert _written(tmp_path)["precision"] == "fp32"


def test_multi_head_model(tmp_path_factory: pytest.TempPathFactory, half, tmp_path: Path) -> None:
    # Four heads of 16: fused, at batch 1 too (the batch-one rule is about a single head).
    path = tmp_path_factory.mktemp("mh") / "mh.onnx"
    export_onnx(ModelSource(model="attention_zoo:make", model_kwargs={"form": "sdpa_mh", "ch": 64}), path, check=False)
    fp16 = half(path)
    assert {s.heads for s in find_attention(onnx.load(str(fp16)))} == {4}
    for i, profile in enumerate((RANGE, BATCH_ONE)):
        result = _engine(fp16, tmp_path, profile, name=f"mh{i}.plan")
        assert_agrees(result, fp16, profile)
        assert all(b.verdict == "fused" for b in result.build.fusion.blocks)


def test_head_size_below_the_window(tmp_path_factory: pytest.TempPathFactory, half, tmp_path: Path) -> None:
    # Four heads of 8: below the fused kernels' window; predicted and built as separate kernels. The FP16 file holds
    # the MatMul/Softmax/MatMul chain there, which a builder that marks nothing decomposable builds too.
    path = tmp_path_factory.mktemp("mh8") / "mh8.onnx"
    export_onnx(ModelSource(model="attention_zoo:make", model_kwargs={"form": "sdpa_mh", "ch": 32}), path, check=False)
    fp16 = half(path)
    assert all(s.form == "decomposed" for s in find_attention(onnx.load(str(fp16))))
    assert independent_build(fp16, RANGE, decomposable=False) is not None
    result = _engine(fp16, tmp_path, RANGE)
    assert "head-size" in result.readiness.codes("warning")
    assert_agrees(result, fp16, RANGE)
    assert not any(b.verdict == "fused" for b in result.build.fusion.blocks)


def test_foreign_onnx_after_optimize(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    folder = tmp_path_factory.mktemp("foreign")
    attention_zoo.foreign_onnx(str(folder / "denoiser.onnx"))
    shapes = ["noisy:1x1x32x32,sigma:1,difficulty:1"]
    optimize_onnx(folder / "denoiser.onnx", folder / "opt.onnx", input_shapes=shapes, check=False)
    convert_fp16(folder / "opt.onnx", folder / "half.onnx", check=False, input_shapes=shapes)
    path = folder / "half.onnx"
    result = _engine(path, tmp_path, RANGE)
    assert_agrees(result, path, RANGE)
    assert len(result.build.fusion.blocks) == 3 and all(b.verdict == "fused" for b in result.build.fusion.blocks)
    assert [io["name"] for io in _written(tmp_path)["io"]] == ["noisy", "sigma", "difficulty", "denoised"]


@pytest.mark.slow
def test_ddpm_cifar10(export_model, half, tmp_path: Path) -> None:
    path = half(export_model("ddpm-cifar10", "op"))
    result = _engine(path, tmp_path, RANGE)
    assert_agrees(result, path, RANGE)
    assert len(result.build.fusion.blocks) == 6 and all(b.verdict == "fused" for b in result.build.fusion.blocks)


@pytest.mark.slow
def test_ddpm_256_builds_with_head_size_512(export_model, tmp_path: Path) -> None:
    # Head size 512 has no fused kernel: the Attention op would stop a builder that does not mark it decomposable
    # (the FP32 op export still would); the FP16 file holds the MatMul/Softmax/MatMul chain there instead.
    # Converted into this test's folder, not the session's: 217 MB that nothing else reads.
    path = tmp_path / "d256.fp16.onnx"
    convert_fp16(export_model("ddpm-256", "op"), path, check=False, calibration_shapes=[(1, 32, 32)])
    profile = Profile((1, 64, 64), (2, 64, 64), (2, 64, 64))
    assert all(s.form == "decomposed" for s in find_attention(onnx.load(str(path), load_external_data=False)))
    assert independent_build(path, profile, decomposable=False) is not None
    result = _engine(path, tmp_path, profile)
    assert_agrees(result, path, profile)
    assert all(b.verdict == "separate kernels" and "512" in (b.reason or "") for b in result.build.fusion.blocks)
    _written(tmp_path)


# --------------------------------------------------------------------------- refusals and failures
def test_unexpected_unfused_site_is_refused(export_model, half, tmp_path: Path) -> None:
    # A readiness report made without the profiles does not know about batch 1: the builder's result then
    # contradicts it, and the build is refused (exit 1, nothing written) unless --allow-unfused.
    from attn_export.engines.trt_build import build_plan

    path = half(export_model("tiny", "op"))
    blind = check_trt_readiness(path, runtime="rtx")
    assert predicted_fusable(blind) == {s.name for s in blind.attention}
    with pytest.raises(CheckFailed, match=r"4 attention site\(s\) that should fuse were not fused.*--allow-unfused") as exc:
        build_plan(path, tmp_path / "m.plan", [BATCH_ONE], blind, runtime="rtx")
    assert exc.value.exit_code == 1 and "/mids.0/attention: separate kernels" in str(exc.value)
    assert list(tmp_path.iterdir()) == []
    built = build_plan(path, tmp_path / "m.plan", [BATCH_ONE], blind, runtime="rtx", allow_unfused=True)
    assert len(built.fusion.unfused) == 4
    _written(tmp_path)


def _with_custom_op(src: Path, dst: Path) -> str:
    """A copy of ``src`` whose first Softmax's input goes through a node of an unknown domain first; its name."""
    m = onnx.load(str(src))
    softmax = next(n for n in m.graph.node if n.op_type in ("Softmax", "Attention"))
    name = "mystery_op_node"
    node = onnx.helper.make_node("Mystery", [softmax.input[0]], ["mystery_out"], name=name, domain="com.example")
    softmax.input[0] = "mystery_out"
    m.graph.node.insert(list(m.graph.node).index(softmax), node)
    m.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(m, str(dst))
    return name


def test_parser_error_names_the_node(export_model, half, tmp_path: Path) -> None:
    from attn_export.engines.readiness import ReadinessReport
    from attn_export.engines.trt_build import build_plan
    from attn_export.exporter.metadata import find_spec

    path = tmp_path / "custom.onnx"
    name = _with_custom_op(half(export_model("tiny", "op")), path)
    # Through the CLI: the readiness check names the node first; one line, exit 2.
    r = run_cli_in_process("trt", path, "--runtime", "rtx", "-o", tmp_path / "c.plan")
    assert r.exit_code == 2 and name in r.output and "Traceback" not in r.output
    # The builder's own parser, past the readiness check: its error names the node too.
    model = onnx.load(str(path))
    unchecked = ReadinessReport(target="TensorRT-RTX", findings=[], attention=find_attention(model), spec=find_spec(model, path))
    with pytest.raises(UsageError) as exc:
        build_plan(path, tmp_path / "c.plan", [RANGE], unchecked, runtime="rtx")
    assert exc.value.exit_code == 2 and name in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "c.plan").exists()


def test_cli_end_to_end(export_model, tmp_path: Path, wide_console) -> None:
    # The README's step as a user types it: an FP32 export, --fp16, the RTX runtime, one profile.
    out = tmp_path / "unet.plan"
    r = run_cli_in_process("trt", export_model("tiny", "op"), "--fp16", "--runtime", "rtx", "-o", out,
                           "--min", "1x32x32", "--opt", "2x32x32", "--max", "2x64x64")
    assert r.exit_code == 0, r.output
    assert "4/4 attention blocks fused" in r.output and "without a GPU" in r.output
    data = json.loads((tmp_path / "unet.plan.json").read_text())
    assert data["fusion"]["all_fused"] is True and data["model"]["precision"] in ("fp16", "mixed")
    r = run_cli_in_process("inspect", out)
    assert r.exit_code == 0, r.output
    r = run_cli_in_process("trt", export_model("tiny", "op"), "--runtime", "rtx", "-o", tmp_path / "x.plan",
                           "--compute-capability", "6.1")
    assert r.exit_code == 2 and "compute capability '6.1'" in r.output
    r = run_cli_in_process("trt", export_model("tiny", "op"), "--runtime", "rtx", "-o", tmp_path / "x.plan",
                           "--timing-cache", tmp_path / "t.cache")
    assert r.exit_code == 2 and "no-ops" in r.output


def test_cross_attention_with_a_context_input(tmp_path_factory: pytest.TempPathFactory, half, tmp_path: Path) -> None:
    # Stable-Diffusion-style conditioning: a context input [B, 7, 48]; the cross-attention site (7 keys) fuses too.
    from attn_export.models.loader import parse_extra_input

    path = tmp_path_factory.mktemp("cross") / "cross.onnx"
    export_onnx(ModelSource(model="export_zoo:cross_attend", extra_inputs=[parse_extra_input("context:float32:batch,7,48")]),
                path, check=False)
    fp16 = half(path)
    result = _engine(fp16, tmp_path, RANGE)
    assert [s.kind for s in result.readiness.attention] == ["self", "cross"]
    assert_agrees(result, fp16, RANGE)
    assert all(b.verdict == "fused" for b in result.build.fusion.blocks)
    assert [io["name"] for io in _written(tmp_path)["io"]] == ["x", "t", "context", "out"]


@pytest.mark.parametrize("attention", ["op", "decomposed"])
def test_masked_cross_attention_fuses(attention: str, tmp_path_factory: pytest.TempPathFactory, half,
                                      tmp_path: Path) -> None:
    # A key-padding mask [B, 7] on cross-attention (SDPA's boolean attn_mask): TensorRT-RTX fuses the site with its
    # mask in both forms, as the readiness rules say; the independent raw-API build agrees.
    from attn_export.models.loader import parse_extra_input

    path = tmp_path_factory.mktemp("masked") / f"masked_{attention}.onnx"
    extras = [parse_extra_input("context:float32:batch,7,48"), parse_extra_input("context_mask:bool:batch,7")]
    export_onnx(ModelSource(model="export_zoo:masked_cross", extra_inputs=extras), path, attention=attention,
                check=False)
    fp16 = half(path)
    result = _engine(fp16, tmp_path, RANGE)
    (site,) = result.readiness.attention
    assert site.mask is not None and site.kind == "cross"
    assert_agrees(result, fp16, RANGE)
    assert [b.verdict for b in result.build.fusion.blocks] == ["fused"]
    assert [io["name"] for io in _written(tmp_path)["io"]] == ["x", "t", "context", "context_mask", "out"]


def test_engine_localize_builds_the_marked_engine_and_checks_its_source(export_model, half, tmp_path: Path,
                                                                        wide_console) -> None:
    """--localize of an engine builds the ONNX file it came from again, as it was built, with every float tensor
    marked as an output: the RTX builder makes that engine here. The file must be the engine's own (its SHA-256),
    and running the marked engine needs a GPU, so here the command stops at that, in one line."""
    from attn_export.engines.marked import build_marked
    from attn_export.exporter.audit import value_types

    fp32 = export_model("tiny", "op")
    path = half(fp32)
    _engine(path, tmp_path, RANGE)
    sidecar = _written(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    types = value_types(model)
    floats = [o for n in model.graph.node for o in n.output
              if types.get(o) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    plan, marked = build_marked(path, sidecar, floats)
    assert len(plan) > 1000 and set(marked) <= set(floats)
    # The attention sites' inputs are tensors of the network, so they can be read back: the first place to look.
    sites = find_attention(model, probe=False)
    assert all(s.q is not None and s.q.tensor in marked for s in sites), (marked[:10], [s.q for s in sites])
    assert len(marked) >= len(floats) // 2, (len(marked), len(floats))

    engine = tmp_path / "m.plan"
    r = run_cli_in_process("verify", engine, "--localize")
    assert r.exit_code == 2 and "--reference" in r.output and "Traceback" not in r.output, r.output
    r = run_cli_in_process("verify", engine, "--localize", "--reference", fp32)
    assert r.exit_code == 2 and "was not built from" in r.output and "Traceback" not in r.output, r.output
    r = run_cli_in_process("verify", engine, "--localize", "--reference", path)
    assert r.exit_code == 2 and "GPU" in r.output and "Traceback" not in r.output, r.output
