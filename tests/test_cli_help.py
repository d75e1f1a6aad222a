"""The command line's own words: every option a help text or the README names exists, flags read as flags,
commands come in the order of the path, and cli.py stays a thin layer."""

from __future__ import annotations

import re
from pathlib import Path

from typing import Any

import typer
from typer.testing import CliRunner

from attn_export import cli

ROOT = Path(__file__).resolve().parents[1]
PATH_ORDER = ["onnx", "optimize", "fp16", "trt", "verify", "inspect", "bench", "triton"]


def _commands() -> dict[str, Any]:
    return dict(typer.main.get_command(cli.app).commands)  # type: ignore[attr-defined]


def _options(command: Any) -> set[str]:
    return {o for p in command.params for o in [*p.opts, *p.secondary_opts] if o.startswith("--")} | {"--help"}


def _help(*args: str) -> str:
    res = CliRunner().invoke(cli.app, [*args, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert res.exit_code == 0, res.output
    return res.output


def test_commands_in_the_order_of_the_path() -> None:
    assert list(_commands()) == PATH_ORDER
    listed = re.findall(r"│ (\w+)\s{2,}", _help().split("Commands")[1])
    assert listed == PATH_ORDER


def test_every_option_a_help_names_exists() -> None:
    commands = _commands()
    every = set().union(*(_options(c) for c in commands.values())) | {"--version"}
    for name in commands:
        text = _help(name)
        # An option named after another command ("`attn-export fp16` ... --fp32-op") must be that command's.
        for other, option in re.findall(r"attn-export (\w+)[^\n`]*?(--[a-z][a-z0-9-]*)", text):
            if other in commands:
                assert option in _options(commands[other]), f"{name} --help: `attn-export {other} ... {option}`"
        for option in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text)):
            assert option in every, f"{name} --help names {option}, which no command has"


def test_readme_names_only_options_that_exist() -> None:
    commands = _commands()
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.match(r"\s*attn-export (\w+)(.*)", line.split("#")[0])
            if m and m.group(1) in commands:
                for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2)):
                    assert option in _options(commands[m.group(1)]), f"README: attn-export {m.group(1)} {option}"


def test_flags_read_as_flags_and_defaults_are_shown() -> None:
    text = _help("fp16")
    assert "<bool>" not in text
    assert "[default: 4096.0]" in text
    assert "<list[str]>" not in text


def test_cli_is_a_thin_layer() -> None:
    lines = (ROOT / "attn_export" / "cli.py").read_text().count("\n")
    assert lines <= 400, f"cli.py has {lines} lines; option groups go to cli_args.py, running to cli_support.py"


def test_no_model_source_lists_the_choices(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli.app, ["onnx", "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2
    assert "--preset tiny|ddpm-cifar10|ddpm-256" in res.output and "--config" in res.output and "--model" in res.output
    assert not list(tmp_path.iterdir())


def test_advice_in_messages_names_commands_and_options_that_exist() -> None:
    """Every `attn-export CMD --option` a message or docstring of the package tells the user to run exists."""
    commands = _commands()
    seen = 0
    for path in (ROOT / "attn_export").rglob("*.py"):
        text = path.read_text()
        for command, rest in re.findall(r"`attn-export (\w+)([^`]*)`", text):
            seen += 1
            assert command in commands, f"{path.name}: `attn-export {command}` is no command"
            for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                assert option in _options(commands[command]), f"{path.name}: `attn-export {command} ... {option}`"
    assert seen > 10


def test_old_spellings_work_for_one_release(tmp_path: Path) -> None:
    import subprocess
    import sys

    from attn_export.exporter.onnx_export import export_onnx
    from attn_export.models.loader import ModelSource

    src = tmp_path / "m.onnx"
    export_onnx(ModelSource(preset="tiny"), src, check=False)
    proc = subprocess.run([sys.executable, "-m", "attn_export", "optimize", str(src), "-o", str(tmp_path / "o.onnx"),
                           "--input-shapes", "x:1x3x16x16,t:1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "deprecated: --input-shapes is now --shapes" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "attn_export", "optimize", str(src), "-o", str(tmp_path / "p.onnx"),
                           "--input-shapes", "x:1x3x16x16,t:1", "--shapes", "x:1x3x16x16,t:1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "give --shapes only" in proc.stderr
