"""`attn-export onnx` from the command line: happy paths, bring-your-own model, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from attn_export.exporter.foreign import spec_of

CLI = [sys.executable, "-m", "attn_export.cli"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("ATTN_EXPORT_DEBUG", None)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]


def test_onnx_command_summary(tmp_path: Path) -> None:
    out = tmp_path / "tiny.onnx"
    proc = run_cli("onnx", "--preset", "tiny", "-o", str(out), "--attention", "decomposed")
    assert proc.returncode == 0, proc.stderr
    for needle in ("tiny.onnx", "opset", "23", "[batch, 3, height, width]", "4 x MatMul/Softmax/MatMul", "check vs PyTorch", "time"):
        assert needle in proc.stdout, needle
    assert spec_of(out).attention == "decomposed"


def test_config_and_checkpoint(tmp_path: Path) -> None:
    from attn_export.models import UNet, preset_config

    cfg = preset_config("tiny", norm="bn", num_classes=3)
    (tmp_path / "unet.json").write_text(json.dumps(cfg.to_dict()))
    torch.manual_seed(9)
    save_file(UNet(cfg).state_dict(), tmp_path / "ema.safetensors")
    out = tmp_path / "unet.onnx"
    proc = run_cli("onnx", "--config", str(tmp_path / "unet.json"), "--checkpoint", str(tmp_path / "ema.safetensors"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    spec = spec_of(out)
    assert spec.source["kind"] == "config" and spec.num_classes == 3
    assert len(spec.checkpoint["sha256"]) == 64


BYO_MODULE = textwrap.dedent('''
    import dataclasses
    import torch
    from torch import nn

    @dataclasses.dataclass
    class Output:
        sample: torch.Tensor
        aux: int = 0

    class Denoiser(nn.Module):
        """A toy denoiser: two levels, returns a dict, a tuple or a dataclass."""
        def __init__(self, ch=8, kind="dict"):
            super().__init__()
            self.kind = kind
            self.emb = nn.Embedding(1000, ch)
            self.inp = nn.Conv2d(3, ch, 3, padding=1)
            self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
            self.up = nn.Upsample(scale_factor=2)
            self.out = nn.Conv2d(2 * ch, 3, 3, padding=1)
        def forward(self, x, t):
            h = self.inp(x) + self.emb(t)[:, :, None, None]
            d = self.up(torch.relu(self.down(h)))
            o = self.out(torch.cat([h, d], 1))
            if self.kind == "dict":
                return {"sample": o, "extra": 1}
            if self.kind == "tuple":
                return (o,)
            return Output(o)

    def build(ch=8, kind="dict"):
        return Denoiser(ch, kind)
''')


@pytest.mark.parametrize("kind", ["dict", "tuple", "dataclass"])
def test_bring_your_own_model(tmp_path: Path, kind: str) -> None:
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "unet.py").write_text(BYO_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        from mypkg.unet import build  # type: ignore[import-not-found]

        torch.manual_seed(1)
        model = build(ch=12, kind=kind).eval()
        torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mypkg.unet", None)
        sys.modules.pop("mypkg", None)
    out = tmp_path / "byo.onnx"
    proc = run_cli("onnx", "--model", "mypkg.unet:build", "--model-kwargs", json.dumps({"ch": 12, "kind": kind}),
                   "--checkpoint", "ckpt.pt", "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    spec = spec_of(out)
    assert spec.hw_multiple == 2 and spec.source["model"] == "mypkg.unet:build"
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 10)).astype(np.float32)
    t = np.array([5, 700], dtype=np.int64)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x, "t": t})[0]
    with torch.no_grad():
        o = model(torch.from_numpy(x), torch.from_numpy(t))
        want = (o["sample"] if kind == "dict" else o[0] if kind == "tuple" else o.sample).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_bad_inputs_give_one_line_and_no_output(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    assert_one_line_error(run_cli("onnx", "--preset", "nope", "-o", str(out)), "unknown preset 'nope'")
    assert_one_line_error(run_cli("onnx", "--preset", "tiny", "-o", str(tmp_path / "missing" / "m.onnx")), "output folder does not exist")
    assert_one_line_error(run_cli("onnx", "--preset", "tiny", "--checkpoint", str(tmp_path / "no.pt"), "-o", str(out)), "checkpoint not found")
    torch.manual_seed(0)
    from attn_export.models import UNet, preset_config

    save_file(UNet(preset_config("ddpm-cifar10", channel_mults=(1, 2))).state_dict(), tmp_path / "other.safetensors")
    result = run_cli("onnx", "--preset", "tiny", "--checkpoint", str(tmp_path / "other.safetensors"), "-o", str(out))
    assert_one_line_error(result, "does not fit the model")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    assert_one_line_error(run_cli("onnx", "--preset", "tiny", "--checkpoint", str(tmp_path / "evil.pt"), "-o", str(out)), "could run code")
    assert not (tmp_path / "pwned").exists()
    assert_one_line_error(run_cli("onnx", "--model", "nomodule_xyz:build", "-o", str(out)), "cannot import")
    assert_one_line_error(run_cli("onnx", "--preset", "tiny", "--model-kwargs", "{bad", "-o", str(out)), "--model-kwargs is not valid JSON")
    assert_one_line_error(run_cli("onnx", "--preset", "tiny", "--config", "x.json", "-o", str(out)), "give only one of")
    assert_one_line_error(run_cli("onnx", "--preset", "tiny", "--opset", "99", "-o", str(out)), "--opset must be between")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt", "other.safetensors"]


def test_version_and_help() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("attn-export ")
    proc = run_cli("onnx", "--help")
    assert proc.returncode == 0 and "--attention" in proc.stdout and "Examples" in proc.stdout


def test_error_text_is_not_markup(tmp_path: Path) -> None:
    # A message holding brackets (like the install hint attn-export[trt]) must come out verbatim.
    proc = run_cli("onnx", "--config", "[bold]x[/].json", "-o", str(tmp_path / "m.onnx"))
    assert_one_line_error(proc, "config file not found: [bold]x[/].json")


def test_outputs_get_normal_permissions(tmp_path: Path) -> None:
    from attn_export.atomic import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
