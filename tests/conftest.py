"""Shared fixtures: exports are made once per session and reused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from attn_export.exporter.onnx_export import export_onnx
from attn_export.models.loader import ModelSource


LARGE_PRESETS = ("ddpm-256",)


@pytest.fixture(scope="session")
def export_model(tmp_path_factory: pytest.TempPathFactory):
    """Export (once per session) and return the ONNX path: export_model("tiny", "op", norm="gn")."""
    cache: dict[tuple, Path] = {}
    folder = tmp_path_factory.mktemp("exports")

    def _export(preset: str = "tiny", attention: str = "op", **overrides) -> Path:
        key = (preset, attention, tuple(sorted(overrides.items())))
        if key not in cache:
            if preset in LARGE_PRESETS:
                # Hundreds of MB each, and each xdist worker holds its own cache: keep one large export at a time.
                for old in [k for k in cache if k[0] in LARGE_PRESETS]:
                    done = cache.pop(old)
                    done.unlink()
                    done.with_name(done.name + ".data").unlink(missing_ok=True)
            name = "_".join([preset, attention] + [f"{k}-{v}" for k, v in sorted(overrides.items())]) + ".onnx"
            path = folder / name
            export_onnx(ModelSource(preset=preset, overrides=overrides), path, attention=attention, check=False)
            cache[key] = path
        return cache[key]

    return _export


@pytest.fixture(scope="session")
def tiny_onnx(export_model) -> Path:
    """The tiny preset exported with the Attention op."""
    return export_model("tiny", "op")


@pytest.fixture(scope="session")
def tiny_decomposed_onnx(export_model) -> Path:
    """The tiny preset exported with the decomposed MatMul/Softmax/MatMul chain."""
    return export_model("tiny", "decomposed")


@pytest.fixture
def wide_console():
    """A wide console, so table cells are printed whole and can be matched against the JSON report."""
    from attn_export import cli

    old = cli.console._width
    cli.console.width = 250
    yield
    cli.console._width = old


def run_cli_in_process(*args: object):
    """Invoke the CLI in this process (typer's CliRunner): faster than a subprocess."""
    from typer.testing import CliRunner

    from attn_export import cli

    return CliRunner().invoke(cli.app, [str(a) for a in args])


class CliResult:
    """Exit code and text as a user sees them (cli.main turns library errors into one line and an exit code)."""

    def __init__(self, res: Any) -> None:
        from attn_export.errors import AttnExportError

        self.exit_code, self.output = res.exit_code, res.output
        if isinstance(res.exception, AttnExportError):
            self.exit_code, self.output = res.exception.exit_code, res.output + str(res.exception)


def invoke_cli(*args: object) -> CliResult:
    """:func:`run_cli_in_process`, with a library error read as the exit code and line the command would print."""
    return CliResult(run_cli_in_process(*args))


def make_fake_engine(tiny_onnx: Path, folder: Path, profile: Any) -> Path:
    """A file named like an engine (not a real plan) with a valid sidecar for the tiny preset, built for ``profile``:
    what the engine paths read before TensorRT is needed."""
    from attn_export.engines.sidecar import make_sidecar, sidecar_path, write_sidecar
    from attn_export.exporter.foreign import spec_of

    engine = folder / "tiny.plan"
    engine.write_bytes(b"not a real plan")
    data = make_sidecar(
        engine_path=engine, engine_sha256="0" * 64, tensorrt_version="10.14.1", gpu_name="NVIDIA H100",
        compute_capability="9.0", profiles=[profile], spec=spec_of(tiny_onnx),
        io=[{"name": "x", "mode": "input", "dtype": "float16", "shape": [-1, 3, -1, -1]}], onnx_path=tiny_onnx,
        onnx_sha256="1" * 64, precision="fp16", fusion={"summary": "4/4 attention blocks fused"},
    )
    write_sidecar(sidecar_path(engine), data)
    return engine
