"""Shared fixtures: exports are made once per session and reused."""

from __future__ import annotations

from pathlib import Path

import pytest

from attn_export.exporter.onnx_export import export_onnx
from attn_export.models.loader import ModelSource


@pytest.fixture(scope="session")
def export_model(tmp_path_factory: pytest.TempPathFactory):
    """Export (once per session) and return the ONNX path: export_model("tiny", "op", norm="gn")."""
    cache: dict[tuple, Path] = {}
    folder = tmp_path_factory.mktemp("exports")

    def _export(preset: str = "tiny", attention: str = "op", **overrides) -> Path:
        key = (preset, attention, tuple(sorted(overrides.items())))
        if key not in cache:
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
