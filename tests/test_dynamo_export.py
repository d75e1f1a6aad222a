"""The dynamo (torch.export) exporter through the product's own export path, so the project keeps working
when PyTorch drops the TorchScript exporter."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from attn_export.exporter.onnx_export import export_onnx
from attn_export.graph import find_attention
from attn_export.models.loader import ModelSource


@pytest.mark.parametrize("attention", ["op", "decomposed"])
def test_dynamo_export_is_fused_and_matches_pytorch(tmp_path: Path, attention: str, tiny_onnx: Path) -> None:
    out = tmp_path / f"dynamo-{attention}.onnx"
    r = export_onnx(ModelSource(preset="tiny"), out, attention=attention, exporter="dynamo")
    # Checked against PyTorch in ONNX Runtime at an unseen shape before it was written, under the pass rule.
    assert r.check is not None and r.check["passed"], r.check
    assert r.check["max_abs_err"] < 1e-4
    model = onnx.load(str(out))
    sites = find_attention(model)
    expected = len(find_attention(onnx.load(str(tiny_onnx))))  # the TorchScript export of the same model
    assert r.attention_nodes == len(sites) == expected > 0
    assert all(s.canonical if attention == "decomposed" else s.form == "op" for s in sites), [s.to_dict() for s in sites]
    assert all(s.problem is None for s in sites)
    dims = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in model.graph.input}
    assert dims["x"] == ["batch", 3, "height", "width"] and dims["t"] == ["batch"]


def test_unknown_exporter_refused(tmp_path: Path) -> None:
    from attn_export.errors import UsageError

    with pytest.raises(UsageError, match="--exporter must be one of"):
        export_onnx(ModelSource(preset="tiny"), tmp_path / "x.onnx", exporter="fx")
    assert not (tmp_path / "x.onnx").exists()
