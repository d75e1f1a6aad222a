"""Property: any small valid UNet config exports, and ONNX Runtime agrees with PyTorch at any valid shape."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from attn_export.exporter.onnx_export import export_onnx
from attn_export.models.loader import ModelSource, load_model


@st.composite
def configs(draw):
    levels = draw(st.integers(1, 3))
    mults = draw(st.lists(st.sampled_from([1, 2]), min_size=levels, max_size=levels))
    attention = draw(st.lists(st.integers(0, levels - 1), max_size=2, unique=True))
    norm = draw(st.sampled_from(["gn", "in", "bn", None]))
    return dict(
        base_channels=draw(st.sampled_from([8, 16])), channel_mults=mults, num_res_blocks=draw(st.integers(1, 2)),
        attention_levels=attention, mid_attention=draw(st.booleans()), time_emb_dim=draw(st.sampled_from([16, 32])),
        num_classes=draw(st.sampled_from([None, 3])), norm=norm, num_groups=4, dropout=0.0,
        activation=draw(st.sampled_from(["silu", "relu", "gelu"])), freq_shift=draw(st.sampled_from([0, 1])),
        downsample_padding=draw(st.sampled_from(["symmetric", "asymmetric"])), in_channels=draw(st.sampled_from([1, 3])),
        out_channels=draw(st.sampled_from([1, 3])),
    )


# No shrinking: each example is an export (seconds); the falsifying example is printed as drawn.
@settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cfg=configs(), attention=st.sampled_from(["op", "decomposed"]), data=st.data())
def test_random_configs_export_and_match(tmp_path_factory, cfg, attention, data) -> None:
    path = tmp_path_factory.mktemp("prop") / "m.onnx"
    result = export_onnx(ModelSource(config=cfg), path, attention=attention, check=False)
    spec = result.spec
    reference = load_model(ModelSource(config=cfg), attention_impl="reference")
    m = spec.hw_multiple
    b = data.draw(st.integers(1, 3), label="batch")
    hm = data.draw(st.integers(1, 4), label="H / multiple")
    need = spec.min_deep_positions  # instance norm needs several positions at the deepest level
    wm = data.draw(st.integers(-(-need // hm) if hm < need else 1, 4), label="W / multiple")
    feeds = spec.make_inputs(b, hm * m, wm * m, seed=data.draw(st.integers(0, 1000), label="seed"))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with torch.no_grad():
        want = reference.module(*[torch.from_numpy(feeds[t.name]) for t in spec.inputs]).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4
