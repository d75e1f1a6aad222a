"""TensorRT logic that runs without TensorRT: profiles, sidecar, fusion parsing, readiness.

Nothing here claims an engine was built or run: the build and the runner are
only checked to refuse cleanly where TensorRT or a GPU is missing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from attn_export.errors import MissingDependencyError, ShapeError, UsageError
from attn_export.graph import AttentionSite
from attn_export.spec import METADATA_KEY, ModelSpec, TensorSpec
from attn_export.engines import fusion, profiles as prof, readiness, sidecar
from attn_export.files import file_sha256
from attn_export.engines.profiles import Profile

DATA = Path(__file__).parent / "data"
HAVE_TRT_AND_GPU = importlib.util.find_spec("tensorrt") is not None and __import__(
    "attn_export.engines.trt_build", fromlist=["gpu_info"]).gpu_info() is not None


def make_spec(hw_multiple: int = 8, channels: int = 3, attention_levels=(1,), channel_mults=(1, 2, 2, 2),
              fixed_batch: int | None = None, precision: str = "fp32") -> ModelSpec:
    batch = fixed_batch if fixed_batch is not None else "batch"
    return ModelSpec(
        inputs=[TensorSpec("x", "float32", [batch, channels, "height", "width"]), TensorSpec("t", "int64", [batch])],
        outputs=[TensorSpec("out", "float32", [batch, channels, "height", "width"])],
        hw_multiple=hw_multiple,
        source={"kind": "config", "config": {"attention_levels": list(attention_levels),
                                             "channel_mults": list(channel_mults), "mid_attention": True}},
        precision=precision,
    )


# =========================================================================== profiles
class TestProfiles:
    def test_parse_several(self):
        ps = prof.parse_profiles(["1x32x32", "2x64x64"], ["1x64x64", "2x128x128"], ["4x128x128", "8x256x256"])
        assert ps == [Profile((1, 32, 32), (1, 64, 64), (4, 128, 128)), Profile((2, 64, 64), (2, 128, 128), (8, 256, 256))]

    def test_parse_empty_is_empty(self):
        assert prof.parse_profiles([], [], []) == []

    def test_parse_count_mismatch(self):
        with pytest.raises(UsageError, match="do not pair up: 2 --min, 1 --opt, 1 --max"):
            prof.parse_profiles(["1x32x32", "1x32x32"], ["1x64x64"], ["4x128x128"])

    @pytest.mark.parametrize("bad", ["1x32", "axbxc", "1x32x32x3", ""])
    def test_parse_bad_shape(self, bad):
        with pytest.raises(UsageError, match="profile 0 opt: bad shape"):
            prof.parse_profiles(["1x32x32"], [bad], ["4x128x128"])

    def test_validate_good(self):
        spec = make_spec()
        assert prof.validate_profiles([Profile((1, 32, 32), (1, 64, 64), (4, 256, 256))], spec) == []

    @pytest.mark.parametrize("p, pattern", [
        (Profile((0, 32, 32), (1, 64, 64), (4, 128, 128)), r"profile 0 min: batch must be at least 1"),
        (Profile((1, 32, 32), (1, 64, 60), (4, 128, 128)), r"profile 0 opt: width 60 is not a positive multiple of 8"),
        (Profile((1, 32, 32), (1, 64, 64), (4, 132, 128)), r"profile 0 max: height 132 is not a positive multiple of 8"),
        (Profile((1, 64, 64), (1, 32, 64), (4, 128, 128)), r"profile 0 opt: height must satisfy min <= opt <= max \(got 64 <= 32 <= 128\)"),
        (Profile((1, 32, 32), (8, 64, 64), (4, 128, 128)), r"profile 0 opt: batch must satisfy"),
    ])
    def test_validate_errors(self, p, pattern):
        with pytest.raises(UsageError, match=pattern):
            prof.validate_profiles([p], make_spec())

    def test_validate_names_profile_index(self):
        good = Profile((1, 32, 32), (1, 64, 64), (4, 128, 128))
        with pytest.raises(UsageError, match=r"^profile 1 max: height 100"):
            prof.validate_profiles([good, Profile((1, 32, 32), (1, 64, 64), (4, 100, 128))], make_spec(hw_multiple=8))

    def test_validate_fixed_batch(self):
        with pytest.raises(UsageError, match=r"profile 0 max: batch must be 1 \(the ONNX fixes it; got 4\)"):
            prof.validate_profiles([Profile((1, 32, 32), (1, 64, 64), (4, 128, 128))], make_spec(fixed_batch=1))

    def test_validate_min_deep_positions(self):
        spec = make_spec(hw_multiple=32)
        spec.min_deep_positions = 2
        with pytest.raises(UsageError, match=r"profile 0 min: 32x32 leaves 1 position\(s\) at the deepest level"):
            prof.validate_profiles([Profile((1, 32, 32), (1, 64, 64), (4, 128, 128))], spec)
        p = prof.default_profile(spec)
        assert p.min[1] == 64
        prof.validate_profiles([p], spec)

    def test_validate_empty(self):
        with pytest.raises(UsageError, match="no optimization profile"):
            prof.validate_profiles([], make_spec())

    def test_key_count_warning(self):
        # Attention at level 0 (full resolution): 256x256 is 65536 keys > 65504.
        spec = make_spec(attention_levels=(0,), channel_mults=(1,))
        warnings = prof.validate_profiles([Profile((1, 32, 32), (1, 64, 64), (1, 256, 256))], spec)
        assert len(warnings) == 1 and "65536 attention keys at level 0" in warnings[0] and warnings[0].startswith("profile 0 max")
        assert prof.validate_profiles([Profile((1, 32, 32), (1, 64, 64), (1, 248, 256))], spec) == []

    def test_key_count_levels_include_mid(self):
        spec = make_spec(attention_levels=(1,), channel_mults=(1, 2, 2, 2))
        assert prof.attention_levels(spec) == [1, 3]
        assert prof.key_count_warnings(512, 512, spec)  # level 1: 256*256 keys

    def test_key_count_unknown_levels_skipped(self):
        spec = make_spec()
        spec.source = {}
        assert prof.attention_levels(spec) is None
        assert prof.key_count_warnings(4096, 4096, spec) == []

    @pytest.mark.parametrize("multiple", [1, 4, 8, 32, 48])
    def test_default_profile_is_valid(self, multiple):
        spec = make_spec(hw_multiple=multiple)
        p = prof.default_profile(spec)
        prof.validate_profiles([p], spec)
        assert p.min[0] == 1 and p.opt[0] == 1 and p.max[0] == 4
        assert p.min[1] >= 32 and p.min[1] % multiple == 0
        assert p.max[1] >= 256

    def test_default_profile_values(self):
        assert prof.default_profile(make_spec(hw_multiple=8)) == Profile((1, 32, 32), (1, 64, 64), (4, 256, 256))
        # A 256-px preset tunes for its own resolution.
        spec = make_spec(hw_multiple=32)
        spec.source = {"kind": "preset", "preset": "ddpm-256"}
        assert prof.default_profile(spec) == Profile((1, 32, 32), (1, 256, 256), (4, 256, 256))

    def test_default_profile_respects_fixed_batch(self):
        p = prof.default_profile(make_spec(fixed_batch=2))
        assert p.min[0] == p.opt[0] == p.max[0] == 2

    def test_tensor_shapes(self):
        shapes = prof.tensor_shapes(Profile((1, 32, 32), (2, 64, 64), (4, 128, 96)), make_spec(channels=3))
        assert shapes == {
            "x": ((1, 3, 32, 32), (2, 3, 64, 64), (4, 3, 128, 96)),
            "t": ((1,), (2,), (4,)),
        }

    def test_profile_contains(self):
        p = Profile((1, 32, 32), (1, 64, 64), (4, 128, 128))
        assert prof.profile_contains(p, 1, 32, 32) and prof.profile_contains(p, 4, 128, 128)
        assert not prof.profile_contains(p, 5, 64, 64)
        assert not prof.profile_contains(p, 1, 16, 64)
        assert prof.find_profile([p, Profile((1, 128, 128), (1, 256, 256), (1, 512, 512))], 1, 256, 256) == 1


# =========================================================================== sidecar
def _sidecar(tmp_path: Path, **over) -> dict:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really a plan")
    spec = make_spec()
    data = sidecar.make_sidecar(
        engine_path=engine, engine_sha256=file_sha256(engine), tensorrt_version="10.14.1.48",
        gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
        profiles=[Profile((1, 32, 32), (1, 64, 64), (4, 256, 256))], spec=spec,
        io=[{"name": "x", "mode": "input", "dtype": "float32", "shape": [-1, 3, -1, -1]},
            {"name": "t", "mode": "input", "dtype": "int64", "shape": [-1]},
            {"name": "out", "mode": "output", "dtype": "float32", "shape": [-1, 3, -1, -1]}],
        onnx_path=tmp_path / "model.onnx", onnx_sha256="0" * 64, precision="fp16",
        fusion={"all_fused": True}, build={"seconds": 1.5, "builder_optimization_level": 3, "workspace_bytes": None,
                                            "timing_cache": None, "strongly_typed": True},
        **over,
    )
    return data


class TestSidecar:
    def test_roundtrip(self, tmp_path):
        data = _sidecar(tmp_path)
        path = sidecar.write_sidecar(sidecar.sidecar_path(tmp_path / "model.engine"), data)
        assert path.name == "model.engine.json"
        back = sidecar.read_sidecar(tmp_path / "model.engine")
        assert back == json.loads(json.dumps(data))
        assert back["format"] == "attn-export-engine/1" and back["engine_file"] == "model.engine"
        assert back["profiles"][0]["shapes"]["x"] == [[1, 3, 32, 32], [1, 3, 64, 64], [4, 3, 256, 256]]
        assert sidecar.sidecar_profiles(back) == [Profile((1, 32, 32), (1, 64, 64), (4, 256, 256))]
        assert sidecar.sidecar_spec(back).hw_multiple == 8
        assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind

    def test_missing(self, tmp_path):
        with pytest.raises(UsageError, match=r"model.engine.json not found.*attn-export trt") as exc:
            sidecar.read_sidecar(tmp_path / "model.engine")
        assert "\n" not in str(exc.value)

    def test_invalid_json(self, tmp_path):
        (tmp_path / "model.engine.json").write_text("{nope")
        with pytest.raises(UsageError, match="is not valid JSON") as exc:
            sidecar.read_sidecar(tmp_path / "model.engine")
        assert "\n" not in str(exc.value)

    def test_wrong_format(self, tmp_path):
        data = _sidecar(tmp_path)
        data["format"] = "something-else/9"
        (tmp_path / "model.engine.json").write_text(json.dumps(data))
        with pytest.raises(UsageError, match="has format 'something-else/9'"):
            sidecar.read_sidecar(tmp_path / "model.engine")

    def test_missing_key(self, tmp_path):
        data = _sidecar(tmp_path)
        del data["gpu"]
        (tmp_path / "model.engine.json").write_text(json.dumps(data))
        with pytest.raises(UsageError, match="lacks gpu"):
            sidecar.read_sidecar(tmp_path / "model.engine")
        with pytest.raises(UsageError, match="lacks gpu"):
            sidecar.write_sidecar(tmp_path / "x.json", data)

    def test_bad_enums(self, tmp_path):
        with pytest.raises(UsageError, match="unknown precision"):
            sidecar.make_sidecar(**{**_make_args(tmp_path), "precision": "int3"})
        with pytest.raises(UsageError, match="unknown hardware compatibility"):
            sidecar.make_sidecar(**_make_args(tmp_path), hardware_compatibility="any")

    def test_compatible(self, tmp_path):
        data = _sidecar(tmp_path)
        sidecar.check_compatible(data, "10.14.1.48", "NVIDIA H100 PCIe", "9.0")
        sidecar.check_compatible(data, "10.14.1", "NVIDIA H100 PCIe", "9.0")  # build number ignored

    def test_refuses_trt_version(self, tmp_path):
        data = _sidecar(tmp_path)
        with pytest.raises(UsageError) as exc:
            sidecar.check_compatible(data, "10.13.3.9", "NVIDIA H100 80GB HBM3", "9.0")
        msg = str(exc.value)
        assert "10.14.1.48" in msg and "10.13.3.9" in msg and "rebuild the engine with `attn-export trt`" in msg

    def test_refuses_gpu(self, tmp_path):
        data = _sidecar(tmp_path)
        with pytest.raises(UsageError) as exc:
            sidecar.check_compatible(data, "10.14.1.48", "NVIDIA GeForce RTX 4090", "8.9")
        msg = str(exc.value)
        assert "NVIDIA H100 80GB HBM3" in msg and "9.0" in msg and "RTX 4090" in msg and "8.9" in msg
        assert "rebuild the engine with `attn-export trt`" in msg

    def test_ampere_plus(self, tmp_path):
        data = _sidecar(tmp_path, hardware_compatibility="ampere_plus")
        sidecar.check_compatible(data, "10.14.1.48", "NVIDIA A10", "8.6")
        with pytest.raises(UsageError, match="Ampere or newer"):
            sidecar.check_compatible(data, "10.14.1.48", "Tesla T4", "7.5")


def _make_args(tmp_path: Path) -> dict:
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    return dict(engine_path=engine, engine_sha256="", tensorrt_version="10.14", gpu_name="g", compute_capability="9.0",
                profiles=[], spec=make_spec(), io=[], onnx_path="m.onnx", onnx_sha256="", precision="fp16")


# =========================================================================== fusion
def _site(name: str, form: str, head: int, seq: str | None, dtype: str) -> AttentionSite:
    return AttentionSite(name=name, form=form, anchor=name + "/Softmax", head_size=head, seq_len=seq, dtype=dtype,
                         scale_placement="q", canonical=True)


def _blocks(down_head=32, mid_head=512, down_form="decomposed", mid_form="decomposed", dtype="float16"):
    return [
        _site("/downs.1/attention", down_form, down_head, "(height/2)*(width/2)", dtype),
        _site("/mid/attention", mid_form, mid_head, "(height/8)*(width/8)", dtype),
    ]


class TestFusion:
    def test_10x_layout(self):
        report = fusion.fusion_report((DATA / "inspector_10x.json").read_text(), _blocks())
        assert report.schema == "10.x" and report.verbosity == "detailed"
        assert [t["Name"] for t in report.io_tensors] == ["x", "t", "out"]
        down, mid = report.blocks
        assert down.fused is True
        assert down.layers == ["_gemm_mha_v2_myl0_14"] and "_gemm_mha_v2" in down.tactics[0]
        assert mid.fused is False
        assert "head size 512" in mid.reason
        assert not report.all_fused
        assert "1/2 attention blocks fused" in report.summary()
        assert len(report.layers) == 8
        json.dumps(report.to_dict())  # serializable for the sidecar

    def test_10x_separate_gemms_reason(self):
        # Same layers, but a head size inside the window: the reason is the separate GEMMs.
        report = fusion.fusion_report((DATA / "inspector_10x.json").read_text(), _blocks(mid_head=64))
        mid = report.blocks[1]
        assert mid.fused is False and "separate GEMM layers around a softmax" in mid.reason
        assert "/mid/attention/MatMul" in mid.layers and "/mid/attention/Softmax" in mid.layers

    def test_11x_layout(self):
        data = json.loads((DATA / "inspector_11x.json").read_text())
        blocks = [_site("/downs.1/attention", "op", 32, None, "float16"),
                  _site("/mid/attention", "decomposed", 32, None, "float32")]
        report = fusion.fusion_report(data, blocks)
        assert report.schema == "11.x" and report.verbosity == "detailed"
        assert report.io_tensors[0]["ProfileInfo"][0]["MaxShape"] == [4, 3, 256, 256]
        down, mid = report.blocks
        assert down.fused is True and down.layers == ["__myl_Fmha_myl0_7"]
        assert mid.fused is False and "float32" in mid.reason and "FP16/BF16" in mid.reason
        layer = report.layers[0]
        assert layer.dtypes == ["FP32", "FP16"]

    def test_names_only(self):
        info = {"Layers": ["/conv_in/Conv", "/downs.1/attention/MatMul", "/downs.1/attention/Softmax",
                           "/downs.1/attention/MatMul_1", "{ForeignNode[/mid/attention/Mul.../mid/attention/MatMul_1]}"],
                "Bindings": ["x", "t", "out"]}
        report = fusion.fusion_report(json.dumps(info), _blocks(mid_head=64))
        assert report.verbosity == "layer_names_only"
        assert all(b.fused is None for b in report.blocks)
        assert "verbosity too low" in report.blocks[0].reason

    def test_names_only_mha_name_is_enough(self):
        info = {"Layers": ["/downs.1/attention/_gemm_mha_v2_myl0_3"], "Bindings": ["x"]}
        report = fusion.fusion_report(info, _blocks()[:1])
        assert report.blocks[0].fused is True

    def test_no_layers(self):
        report = fusion.fusion_report({"Layers": [], "Bindings": []}, _blocks())
        assert report.verbosity == "none" and all(b.fused is None for b in report.blocks)
        assert "verbosity NONE" in report.blocks[0].reason

    def test_unattributed(self):
        report = fusion.fusion_report({"Layers": [{"Name": "/other/Conv", "LayerType": "CaskConvolution",
                                                   "TacticName": "sm80_xmma_fprop"}]}, _blocks())
        assert report.blocks[0].fused is None and "no engine layer" in report.blocks[0].reason

    def test_prefix_not_confused_with_longer_name(self):
        info = {"Layers": [{"Name": "/downs.1/attention_2/MatMul", "LayerType": "gemm", "TacticName": "_gemm_mha_v2_x"}]}
        report = fusion.fusion_report(info, _blocks()[:1])
        assert report.blocks[0].fused is None

    def test_iattention_layer_type(self):
        info = {"I/O Tensors": [], "Layers": [{"Name": "/downs.1/attention/Attention", "LayerType": "Attention",
                                               "TacticName": "0x1f"}]}
        assert fusion.fusion_report(info, _blocks()[:1]).blocks[0].fused is True

    def test_bad_json(self):
        with pytest.raises(UsageError, match="not valid JSON"):
            fusion.fusion_report("{", [])


# =========================================================================== readiness graphs
def _spec_json(hw_multiple=8, channels=32, precision="fp32") -> str:
    return make_spec(hw_multiple=hw_multiple, channels=channels, precision=precision).to_json()


def _attention_model(channels=32, form="op", scale_after=False, extra_ops=(), static_batch=False,
                     fp16=False, hw_multiple=8, use_t=False) -> onnx.ModelProto:
    """x [batch, C, height, width] -> one single-head self-attention block -> out, plus t [batch].

    ``use_t`` adds 0 * t to the output so that t is consumed (TensorRT drops unused inputs).
    """
    C = channels
    fdt = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    nodes, inits = [], []
    inits.append(numpy_helper.from_array(np.array([0, C, -1], dtype=np.int64), "shape_bcs"))
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axes1"))
    src = "x"
    if fp16:
        nodes.append(helper.make_node("Cast", ["x"], ["x16"], name="/in/Cast", to=TensorProto.FLOAT16))
        src = "x16"
    p = "/downs.1/attention"
    nodes += [
        helper.make_node("Reshape", [src, "shape_bcs"], ["bcs"], name=f"{p}/Reshape"),
        helper.make_node("Transpose", ["bcs"], ["bsc"], name=f"{p}/Transpose", perm=[0, 2, 1]),
        helper.make_node("Unsqueeze", ["bsc", "axes1"], ["q"], name=f"{p}/Unsqueeze"),
    ]
    scale = np.array(1.0 / np.sqrt(C), dtype=np.float16 if fp16 else np.float32)
    inits.append(numpy_helper.from_array(scale, "scale"))
    if form == "op":
        nodes.append(helper.make_node("Attention", ["q", "q", "q"], ["att"], name=f"{p}/Attention"))
    else:
        nodes.append(helper.make_node("Transpose", ["q"], ["kt"], name=f"{p}/Transpose_1", perm=[0, 1, 3, 2]))
        if scale_after:
            nodes += [helper.make_node("MatMul", ["q", "kt"], ["qk"], name=f"{p}/MatMul"),
                      helper.make_node("Mul", ["qk", "scale"], ["logits"], name=f"{p}/Mul")]
        else:
            nodes += [helper.make_node("Mul", ["q", "scale"], ["qs"], name=f"{p}/Mul"),
                      helper.make_node("MatMul", ["qs", "kt"], ["logits"], name=f"{p}/MatMul")]
        nodes += [helper.make_node("Softmax", ["logits"], ["probs"], name=f"{p}/Softmax", axis=-1),
                  helper.make_node("MatMul", ["probs", "q"], ["att"], name=f"{p}/MatMul_1")]
    nodes += [
        helper.make_node("Squeeze", ["att", "axes1"], ["att3"], name=f"{p}/Squeeze"),
        helper.make_node("Transpose", ["att3"], ["att_bcs"], name=f"{p}/Transpose_2", perm=[0, 2, 1]),
        helper.make_node("Shape", [src], ["xshape"], name=f"{p}/Shape"),
        helper.make_node("Reshape", ["att_bcs", "xshape"], ["att4"], name=f"{p}/Reshape_1"),
        helper.make_node("Add", [src, "att4"], ["res"], name=f"{p}/Add"),
    ]
    if use_t:
        inits += [numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes123"),
                  numpy_helper.from_array(np.array(0, dtype=np.float16 if fp16 else np.float32), "zero")]
        nodes += [helper.make_node("Cast", ["t"], ["tf"], name="/t/Cast", to=fdt),
                  helper.make_node("Unsqueeze", ["tf", "axes123"], ["t4"], name="/t/Unsqueeze"),
                  helper.make_node("Mul", ["t4", "zero"], ["t0"], name="/t/Mul"),
                  helper.make_node("Add", ["res0", "t0"], ["res"], name="/t/Add")]
        next(n for n in nodes if n.name == f"{p}/Add").output[0] = "res0"
    if fp16:
        nodes.append(helper.make_node("Cast", ["res"], ["out"], name="/out/Cast", to=TensorProto.FLOAT))
    else:
        nodes.append(helper.make_node("Identity", ["res"], ["out"], name="/out/Identity"))
    for op in extra_ops:
        nodes.append(helper.make_node(op, ["t"], [f"{op}_out"], name=f"/extra/{op}"))
    batch = 2 if static_batch else "batch"
    graph = helper.make_graph(
        nodes, "attn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, C, "height", "width"]),
         helper.make_tensor_value_info("t", TensorProto.INT64, [batch])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, C, "height", "width"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    prop = model.metadata_props.add()
    prop.key, prop.value = METADATA_KEY, _spec_json(hw_multiple=hw_multiple, channels=C,
                                                    precision="fp16" if fp16 else "fp32")
    onnx.checker.check_model(model)
    return model


class TestReadiness:
    def test_attention_blocks_op(self):
        blocks = readiness.attention_blocks(_attention_model(channels=64))
        assert len(blocks) == 1
        b = blocks[0]
        assert (b.name, b.form, b.head_size, b.dtype) == ("/downs.1/attention", "op", 64, "float32")
        assert (b.seq_len, b.level) == ("height*width", 0)

    def test_attention_blocks_decomposed(self):
        blocks = readiness.attention_blocks(_attention_model(form="decomposed", fp16=True))
        assert len(blocks) == 1
        b = blocks[0]
        assert (b.form, b.head_size, b.dtype, b.scale_before_product) == ("decomposed", 32, "float16", True)
        assert b.nodes[0] == "/downs.1/attention/MatMul" and "/downs.1/attention/MatMul_1" in b.nodes

    def test_unsupported_op(self):
        report = readiness.check_trt_readiness(_attention_model(fp16=True, extra_ops=["Unique"]), target="10.14")
        errs = [f for f in report.errors if f.code == "unsupported-op"]
        assert len(errs) == 1 and errs[0].node == "/extra/Unique" and "Unique" in errs[0].message
        assert not report.ok
        with pytest.raises(UsageError, match=r"not ready for TensorRT 10.14: Unique is not supported"):
            report.raise_for_errors()

    def test_custom_domain_op(self):
        model = _attention_model(fp16=True)
        model.graph.node.append(helper.make_node("MyPlugin", ["t"], ["p"], name="/plug", domain="com.example"))
        report = readiness.check_trt_readiness(model, target="10.14")
        assert "custom-op" in report.codes("error")

    def test_attention_op_needs_10_14(self):
        old = readiness.check_trt_readiness(_attention_model(fp16=True), target="10.13")
        assert {"unsupported-op", "attention-op-version"} <= set(old.codes("error"))
        assert any(f.node == "/downs.1/attention/Attention" for f in old.errors)
        new = readiness.check_trt_readiness(_attention_model(fp16=True), target="10.14")
        assert new.ok, [str(f) for f in new.errors]
        assert "attention" in new.codes("ok")
        assert readiness.check_trt_readiness(_attention_model(fp16=True), target="11.0").ok

    def test_decomposed_ok_on_10_13(self):
        report = readiness.check_trt_readiness(_attention_model(form="decomposed", fp16=True), target="10.13")
        assert report.ok and not report.warnings, [str(f) for f in report.findings]

    def test_head_size_512_will_not_fuse(self):
        report = readiness.check_trt_readiness(_attention_model(channels=512, fp16=True), target="10.14")
        assert report.ok  # it builds ...
        hs = [f for f in report.warnings if f.code == "head-size"]
        assert len(hs) == 1 and "will not fuse" in hs[0].message and "512" in hs[0].message  # ... unfused

    @pytest.mark.parametrize("c, fusable", [(8, False), (16, True), (24, True), (36, False), (256, True), (264, False)])
    def test_head_size_window(self, c, fusable):
        assert readiness.head_size_fusable(c) is fusable

    def test_scale_after_product_not_fusable(self):
        model = _attention_model(form="decomposed", scale_after=True, fp16=True)
        (block,) = readiness.attention_blocks(model)
        assert block.scale_before_product is False
        assert "/downs.1/attention/Mul" in block.nodes
        report = readiness.check_trt_readiness(model, target="10.14")
        w = [f for f in report.warnings if f.code == "attention-scale"]
        assert len(w) == 1 and "will not fuse" in w[0].message

    def test_profile_max_not_multiple(self):
        model = _attention_model(fp16=True, hw_multiple=8)
        bad = [Profile((1, 32, 32), (1, 64, 64), (4, 100, 128))]
        report = readiness.check_trt_readiness(model, target="10.14", profiles=bad)
        errs = [f for f in report.errors if f.code == "profile"]
        assert len(errs) == 1 and "profile 0 max: height 100 is not a positive multiple of 8" in errs[0].message
        good = readiness.check_trt_readiness(model, target="10.14", profiles=[Profile((1, 32, 32), (1, 64, 64), (4, 128, 128))])
        assert good.ok and "profiles" in good.codes("ok")

    def test_key_count_from_graph_levels(self):
        model = _attention_model(fp16=True)
        spec = ModelSpec.from_json(model.metadata_props[0].value)
        spec.source = {}  # no UNet config: the level comes from the graph (level 0 here)
        model.metadata_props[0].value = spec.to_json()
        report = readiness.check_trt_readiness(model, target="10.14", profiles=[Profile((1, 32, 32), (1, 64, 64), (1, 256, 256))])
        w = [f for f in report.warnings if f.code == "fp16-key-count"]
        assert len(w) == 1 and "65536 attention keys" in w[0].message and w[0].node == "/downs.1/attention"

    def test_static_batch_flagged(self):
        report = readiness.check_trt_readiness(_attention_model(fp16=True, static_batch=True), target="10.14")
        w = [f for f in report.warnings if f.code == "static-dim"]
        assert len(w) == 1 and "fixed batch of 2" in w[0].message

    def test_fp32_model_for_fp16_build(self):
        report = readiness.check_trt_readiness(_attention_model(), target="10.14", fp16=True)
        assert {"fp32-model", "attention-fp32"} <= set(report.codes("warning"))

    def test_fp16_norm_flagged(self):
        model = _attention_model(fp16=True)
        for name, arr in (("in_s", np.ones(32, np.float16)), ("in_b", np.zeros(32, np.float16))):
            model.graph.initializer.append(numpy_helper.from_array(arr, name))
        model.graph.node.append(helper.make_node("InstanceNormalization", ["x16", "in_s", "in_b"], ["normed"],
                                                 name="/norm/InstanceNormalization"))
        report = readiness.check_trt_readiness(model, target="10.14")
        w = [f for f in report.warnings if f.code == "norm-fp16"]
        assert readiness.check_trt_readiness(_attention_model(fp16=True, use_t=True), target="10.14").ok
        assert len(w) == 1 and w[0].node == "/norm/InstanceNormalization"

    def test_bad_target(self):
        with pytest.raises(UsageError, match="bad TensorRT version"):
            readiness.check_trt_readiness(_attention_model(), target="ten")
        assert "target" in readiness.check_trt_readiness(_attention_model(fp16=True), target="10.8").codes("error")

    def test_supported_ops_table(self):
        assert "Attention" not in readiness.supported_ops("10.13")
        assert "Attention" in readiness.supported_ops("10.14.1")
        assert "RMSNormalization" in readiness.supported_ops("11.0")
        assert {"Conv", "InstanceNormalization", "Softmax", "MatMul", "Resize", "Cast"} <= readiness.supported_ops("10.12")

    def test_missing_file(self, tmp_path):
        with pytest.raises(UsageError, match="ONNX file not found"):
            readiness.check_trt_readiness(tmp_path / "nope.onnx")

    def test_report_dict(self):
        d = readiness.check_trt_readiness(_attention_model(fp16=True), target="10.14").to_dict()
        json.dumps(d)
        assert d["ok"] and d["attention"][0]["head_size"] == 32

    @pytest.mark.parametrize("form", ["op", "decomposed"])
    def test_real_tiny_export(self, export_model, form):
        path = export_model("tiny", form)
        blocks = readiness.attention_blocks(path)
        assert blocks and all(b.form == form for b in blocks)
        assert all(b.head_size is not None for b in blocks)
        report = readiness.check_trt_readiness(path, target="10.14")
        assert report.ok, [str(f) for f in report.errors]
        assert report.spec is not None
        # tiny: attention at level 1 plus the middle block at level 2.
        assert {(b.level, b.seq_len) for b in blocks} == {(1, "(height/2)*(width/2)"), (2, "(height/4)*(width/4)")}
        if form == "decomposed":
            assert all(b.scale_before_product for b in blocks)


# =========================================================================== no TensorRT here
@pytest.mark.skipif(HAVE_TRT_AND_GPU, reason="TensorRT and a GPU are present")
class TestWithoutTensorRT:
    def test_build_engine_missing_dependency(self, tmp_path):
        from attn_export.engines.trt_build import build_plan

        onnx_path = tmp_path / "m.onnx"
        onnx.save(_attention_model(fp16=True), str(onnx_path))
        with pytest.raises(MissingDependencyError) as exc:
            build_plan(onnx_path, tmp_path / "m.engine", None, readiness.check_trt_readiness(onnx_path, "10.14"))
        msg = str(exc.value)
        assert "\n" not in msg
        assert 'pip install ".[trt-cu12]"' in msg and ".[trt-cu13]" in msg
        assert "NVIDIA GPU" in msg
        assert not (tmp_path / "m.engine").exists()

    def test_runner_refuses_to_activate(self, tmp_path):
        from attn_export.runners.trt_runner import TrtRunner

        data = _sidecar(tmp_path)
        sidecar.write_sidecar(sidecar.sidecar_path(tmp_path / "model.engine"), data)
        runner = TrtRunner(tmp_path / "model.engine")
        assert runner.spec.hw_multiple == 8 and runner.name == "tensorrt"
        with pytest.raises(MissingDependencyError) as exc:
            runner.activate()
        assert "\n" not in str(exc.value) and 'pip install ".[trt-cu12]"' in str(exc.value)
        assert not runner.is_active

    def test_runner_shape_narrowed_to_profiles(self, tmp_path):
        from attn_export.runners.trt_runner import TrtRunner

        sidecar.write_sidecar(sidecar.sidecar_path(tmp_path / "model.engine"), _sidecar(tmp_path))
        runner = TrtRunner(tmp_path / "model.engine")
        runner.check_shape(2, 64, 128)
        with pytest.raises(ShapeError, match=r"8x64x64 is outside this engine's optimization profiles \(profile 0: 1x32x32\.\.4x256x256"):
            runner.check_shape(8, 64, 64)
        with pytest.raises(ShapeError, match="multiples of 8"):
            runner.check_shape(1, 60, 64)

    def test_runner_missing_engine(self, tmp_path):
        from attn_export.runners.trt_runner import TrtRunner

        with pytest.raises(UsageError, match="engine file not found"):
            TrtRunner(tmp_path / "nope.engine")


# =========================================================================== TensorRT-RTX: build log, sidecar
# The layer lines below were logged by TensorRT-RTX 1.7's builder (DETAILED verbosity) for the tiny preset:
# rtx_layers_fused.txt from its FP16 `op` export (batch 2), rtx_layers_fp32.txt from its FP32 decomposed export.
def _op_site(prefix: str) -> AttentionSite:
    node = f"{prefix}/Attention_y"
    return AttentionSite(name=prefix, form="op", anchor=node, nodes=[node], head_size=32, dtype="float16", heads=1)


def _decomposed_site(prefix: str) -> AttentionSite:
    nodes = [f"{prefix}/Mul_1", f"{prefix}/MatMul", f"{prefix}/Softmax", f"{prefix}/MatMul_1"]
    return AttentionSite(name=prefix, form="decomposed", anchor=f"{prefix}/Softmax", nodes=nodes, head_size=32,
                         dtype="float32", scale_placement="q", canonical=True)


class TestBuildLog:
    def test_layers_parsed_with_their_onnx_nodes(self):
        layers = fusion.parse_build_log((DATA / "rtx_layers_fused.txt").read_text())
        by_name = {layer.name: layer for layer in layers}
        mha = by_name["_gemm_mha_v2_myl0_30"]
        assert mha.type == "kgen" and mha.tactic.startswith("_gemm_mha_v2_0x") and mha.is_mha()
        assert mha.onnx_nodes == ["/downs.2/attention/Attention_y"] and set(mha.dtypes) == {"Half"}
        conv = next(layer for layer in layers if layer.name.startswith("/init_conv/Conv"))
        assert conv.onnx_nodes == ["/init_conv/Conv"] and not conv.is_mha()

    def test_repeated_layers_kept_once(self):
        text = (DATA / "rtx_layers_fused.txt").read_text()
        assert len(fusion.parse_build_log(text + "\n" + text)) == len(fusion.parse_build_log(text))
        assert fusion.parse_build_log("no layers here\nName: broken line") == []

    def test_fused_sites(self):
        sites = [_op_site("/downs.2/attention"), _op_site("/mids.0/attention")]
        report = fusion.build_log_report((DATA / "rtx_layers_fused.txt").read_text(), sites)
        assert report.source == "build log" and report.schema == "build-log" and report.verbosity == "detailed"
        assert [b.verdict for b in report.blocks] == ["fused", "fused"] and report.all_fused
        assert report.blocks[0].layers == ["_gemm_mha_v2_myl0_30"] and report.blocks[1].layers == ["_gemm_mha_v2_myl0_55"]
        assert report.fused_layer_count == 2 and not report.unfused

    def test_separate_kernels_with_the_predicted_reason(self):
        site = _decomposed_site("/downs.2/attention")
        text = (DATA / "rtx_layers_fp32.txt").read_text()
        report = fusion.build_log_report(text, [site])
        block = report.blocks[0]
        assert block.verdict == "separate kernels" and block.fused is False and "float32" in block.reason
        assert any("/downs.2/attention/MatMul_1" in name for name in block.layers)
        report = fusion.build_log_report(text, [site], {"/downs.2/attention": "one head at batch 1"})
        assert report.blocks[0].reason == "one head at batch 1" and report.unfused == report.blocks

    def test_site_the_engine_does_not_hold(self):
        report = fusion.build_log_report((DATA / "rtx_layers_fp32.txt").read_text(), [_op_site("/ups.9/attention")])
        assert report.blocks[0].verdict == "unknown" and "no engine layer" in report.blocks[0].reason
        report = fusion.build_log_report("", [_op_site("/ups.9/attention")])
        assert report.verbosity == "none" and report.blocks[0].verdict == "unknown"

    def test_refusal_only_for_sites_expected_to_fuse(self):
        from attn_export.engines.trt_build import unfused_failure

        sites = [_op_site("/downs.2/attention"), _op_site("/mids.0/attention")]
        report = fusion.build_log_report("", sites)  # nothing attributed: unknown, not refused
        quiet = readiness.ReadinessReport(target="TensorRT-RTX", findings=[], attention=sites)
        assert unfused_failure(report, quiet) is None
        report = fusion.build_log_report((DATA / "rtx_layers_fused.txt").read_text(), sites,
                                         {s.name: "one head at batch 1" for s in sites})
        assert unfused_failure(report, quiet) is None  # both fused
        report = fusion.build_log_report((DATA / "rtx_layers_fp32.txt").read_text(),
                                         [_decomposed_site("/downs.2/attention"), _op_site("/mids.0/attention")])
        quiet.attention = [_decomposed_site("/downs.2/attention"), _op_site("/mids.0/attention")]
        message = unfused_failure(report, quiet)
        assert message and "1 attention site(s) that should fuse" in message and "--allow-unfused" in message
        assert "/downs.2/attention: separate kernels" in message
        predicted = readiness.ReadinessReport(target="TensorRT-RTX", attention=quiet.attention, findings=[
            readiness.Finding("warning", "attention-fp32", "will not fuse: attention runs in FP32", "/downs.2/attention")])
        assert readiness.predicted_unfused(predicted) == {"/downs.2/attention": "attention runs in FP32"}
        assert unfused_failure(report, predicted) is None


class TestRtxSidecar:
    def _data(self, tmp_path, **changes):
        data = sidecar.make_sidecar(**{**_make_args(tmp_path), "gpu_name": None, "compute_capability": None,
                                       "runtime": "rtx", "tensorrt_version": "1.7.1.116", "engine_sha256": "0" * 64, "onnx_sha256": "1" * 64,
                                       "io": [{"name": "x", "mode": "input", "dtype": "float32", "shape": [-1, 3, -1, -1]}],
                                       "compute_capabilities": ["8.0", "8.6", "8.9", "12.0"], **changes})
        return data

    def test_written_and_read_back_without_a_gpu(self, tmp_path):
        data = self._data(tmp_path, profiles=[Profile((1, 32, 32), (1, 32, 32), (2, 64, 64))], spec=make_spec())
        sidecar.write_sidecar(sidecar.sidecar_path(tmp_path / "m.engine"), data)
        back = sidecar.read_sidecar(tmp_path / "m.engine")
        assert back["runtime"] == "rtx" and back["gpu"] is None and back["compute_capabilities"][-1] == "12.0"
        assert sidecar.sidecar_runtime(back) == "rtx"
        assert sidecar.sidecar_runtime({"format": "x"}) == "tensorrt"  # sidecars written before runtimes were recorded

    def test_schema_refuses_bad_runtime_and_targets(self, tmp_path):
        for key, value in (("runtime", "tensorrt-llm"), ("compute_capabilities", ["sm86"])):
            data = self._data(tmp_path, profiles=[Profile((1, 32, 32), (1, 32, 32), (2, 64, 64))], spec=make_spec())
            data[key] = value
            (tmp_path / "m.engine.json").write_text(json.dumps(data))
            with pytest.raises(UsageError, match="is invalid"):
                sidecar.read_sidecar(tmp_path / "m.engine")

    def test_runner_checks(self, tmp_path):
        data = self._data(tmp_path)
        sidecar.check_compatible(data, "1.7.1.116", "RTX 4090", "8.9", "rtx")
        with pytest.raises(UsageError, match="TensorRT-RTX engine; load it with TensorRT-RTX"):
            sidecar.check_compatible(data, "10.14.1.48", "RTX 4090", "8.9", "tensorrt")
        with pytest.raises(UsageError, match="built with TensorRT-RTX 1.7.1.116 but this is TensorRT-RTX 1.6"):
            sidecar.check_compatible(data, "1.6.1.120", "RTX 4090", "8.9", "rtx")
        with pytest.raises(UsageError, match=r"compute capabilities 8.0, 8.6, 8.9, 12.0 .* 7.5.*--compute-capability 7.5"):
            sidecar.check_compatible(data, "1.7.1.116", "RTX 2080", "7.5", "rtx")
        trt_data = sidecar.make_sidecar(**_make_args(tmp_path))
        with pytest.raises(UsageError, match="TensorRT engine; load it with TensorRT,"):
            sidecar.check_compatible(trt_data, "1.7.1.116", "RTX 4090", "8.9", "rtx")


class TestRuntimes:
    def test_names_and_refusals(self):
        from attn_export.engines import runtime
        from attn_export.engines.trt_build import check_compute_capabilities, check_timing_cache

        assert runtime.get_runtime("rtx").module == "tensorrt_rtx" and runtime.get_runtime("tensorrt").module == "tensorrt"
        with pytest.raises(UsageError, match="unknown runtime 'cuda'"):
            runtime.get_runtime("cuda")
        assert check_compute_capabilities(runtime.RTX, None) == ["8.0", "8.6", "8.9", "12.0"]
        assert check_compute_capabilities(runtime.RTX, ["7.5", "7.5", "12.0"]) == ["7.5", "12.0"]
        with pytest.raises(UsageError, match="'9.0' is not one TensorRT-RTX builds for"):
            check_compute_capabilities(runtime.RTX, ["9.0"])
        with pytest.raises(UsageError, match="TensorRT-RTX option"):
            check_compute_capabilities(runtime.TENSORRT, ["8.6"])
        with pytest.raises(UsageError, match="no-ops"):
            check_timing_cache(runtime.RTX, "t.cache")
        check_timing_cache(runtime.TENSORRT, "t.cache")

    def test_missing_rtx_stops_before_any_work(self, tiny_onnx, tmp_path, monkeypatch):
        from attn_export import pipeline
        from attn_export.engines import runtime

        monkeypatch.setattr(pipeline, "installed", lambda rt: False)
        with pytest.raises(MissingDependencyError, match=r"TensorRT-RTX is not installed.*pip install \"\.\[rtx\]\"") as exc:
            pipeline.build_engine(tiny_onnx, tmp_path / "m.engine", fp16=True, runtime="rtx")
        assert exc.value.exit_code == 2 and list(tmp_path.iterdir()) == []
        assert runtime.RTX.builds_without_gpu and not runtime.TENSORRT.builds_without_gpu


class TestPublishTogether:
    def test_both_or_neither(self, tmp_path, monkeypatch):
        from attn_export.atomic import publish_together

        engine, side = tmp_path / "m.engine", tmp_path / "m.engine.json"
        publish_together([(engine, b"plan"), (side, b"{}")])
        assert engine.read_bytes() == b"plan" and side.read_bytes() == b"{}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json"]
        # The second file cannot be written: neither the new engine nor any temporary file is left; the old pair stays.
        real = Path.write_bytes

        def failing(self: Path, data: bytes) -> int:
            if data == b"new sidecar":
                raise OSError(28, "No space left on device")
            return real(self, data)

        monkeypatch.setattr(Path, "write_bytes", failing)
        with pytest.raises(OSError):
            publish_together([(engine, b"new plan"), (side, b"new sidecar")])
        assert engine.read_bytes() == b"plan" and side.read_bytes() == b"{}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json"]
