"""An artifact's embedded description may name code; no command runs it without the user's say-so."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from conftest import run_cli_in_process as run


def _evil(src: Path, out: Path, marker: Path) -> Path:
    model = onnx.load(str(src))
    for p in model.metadata_props:
        if p.key == "attn_export.spec":
            d = json.loads(p.value)
            d["source"] = {"kind": "import", "model": "os:system", "model_kwargs": {"command": f"touch {marker}"}, "seed": 0}
            p.value = json.dumps(d)
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize("command", [["verify"], ["bench", "--iterations", "1", "--backend", "pytorch"], ["fp16", "-o", "e16.onnx"]])
def test_recorded_factory_is_not_imported(tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          command: list[str], wide_console) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    evil = _evil(tiny_onnx, tmp_path / "evil.onnx", marker)
    result = run(command[0], evil, *command[1:])
    assert not marker.exists()
    text = result.output + str(result.exception or "")
    if command[0] != "bench":  # bench reports the backend it could not build and goes on
        assert result.exit_code == 2, text
    assert "os:system" in text and "--trust-artifact" in text
    assert not (tmp_path / "e16.onnx").exists()
