"""README.md runs as written: its command blocks, in order, in a fresh folder, on this CPU machine.

Steps marked "(GPU)" in their comment must stop with exit 2 and one line where no NVIDIA GPU and TensorRT
are present, as the README's "What needs a GPU" table says. The preset is the README's own with
ATTN_EXPORT_README_VERBATIM=1; by default the suite runs the same commands on the `tiny` preset, whose files
take seconds instead of minutes (the commands and their order are unchanged).

Lines left out, each for its reason: `make ...` (that is how this suite was started), `pip install ...` (a new
environment; the Makefile installs the same extras), and the TensorRT API check (tests/test_trt_api.py runs it
for every supported release).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = ("make ", "pip install ", "python -m tests.trt_api.check")
VERBATIM = os.environ.get("ATTN_EXPORT_README_VERBATIM") == "1"


def _gpu_here() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available()) and __import__("importlib").util.find_spec("tensorrt") is not None
    except ImportError:
        return False


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def _commands() -> list[tuple[str, bool]]:
    """(command, needs a GPU) for every line of every sh block, continuation lines joined, comments dropped."""
    out = []
    for block in _blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            command, _, comment = line.partition("#")
            command = " ".join(command.split())
            if command and not command.startswith(LEFT_OUT):
                out.append((command, "(GPU)" in comment))
    return out


def _preset(text: str) -> str:
    return text if VERBATIM else text.replace("ddpm-cifar10", "tiny")


def test_the_readme_has_the_path_in_it() -> None:
    commands = [c for c, _ in _commands()]
    firsts = [c.split()[1] for c in commands if c.startswith("attn-export ")]
    for step in ("onnx", "verify", "inspect", "fp16", "trt", "optimize", "bench", "triton"):
        assert step in firsts, step
    assert _blocks("python"), "the Python API block"


@pytest.mark.skipif(_gpu_here(), reason="a GPU and TensorRT are here: the GPU steps run (make test-gpu covers them)")
def test_every_command_block_runs_in_order(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "COLUMNS": "200"}
    assert shutil.which("attn-export", path=env["PATH"]), "attn-export is not installed next to this Python"
    ran = []
    for command, gpu in _commands():
        proc = subprocess.run(_preset(command), shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        where = f"README: `{command}` exited {proc.returncode}: {proc.stderr.strip()[-600:]}"
        assert "Traceback" not in proc.stderr, where
        if gpu:
            assert proc.returncode == 2, where
            assert len(proc.stderr.strip().splitlines()) == 1, where
        else:
            assert proc.returncode == 0, where
        ran.append(command)
    assert len(ran) >= 10
    # What the path leaves behind, as the README says.
    for name in ("unet.onnx", "unet.fp16.onnx", "unet.engine", "unet.engine.json", "unet.serving.onnx",
                 "unet.dec.onnx"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "unet.plan").exists()  # the GPU step stopped before writing anything
    assert (tmp_path / "models" / "unet.serving" / "config.pbtxt").is_file()

    # The Python block, run as written after the commands (it makes its own files the same way).
    script = tmp_path / "readme_api.py"
    script.write_text(_preset(_blocks("python")[0]))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
