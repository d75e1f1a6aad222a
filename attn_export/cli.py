"""The `attn-export` command line. Thin: parse options, call library functions, print.

Errors from the library (AttnExportError) become one line on stderr and the
error's exit code (2 for bad input, 1 for a failed check); no tracebacks
unless ATTN_EXPORT_DEBUG=1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from .errors import AttnExportError, UsageError

app = typer.Typer(
    name="attn-export",
    help=(
        "Take a diffusion UNet with self-attention from PyTorch to ONNX and TensorRT.\n\n"
        "Typical path:  attn-export onnx --preset ddpm-cifar10 -o unet.onnx  ->  "
        "attn-export verify unet.onnx  ->  attn-export trt unet.onnx --fp16 -o unet.plan"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"attn-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Diffusion UNets with self-attention, from PyTorch to ONNX and TensorRT."""


def _fail(message: str, code: int) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _json_option(text: Optional[str], option: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{option} must be a JSON object, e.g. '{{\"ch\": 64}}'")
    return value


def _spinner(description: str):  # noqa: ANN202 - rich Progress
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), TimeElapsedColumn(),
                    console=err_console, transient=True, disable=not err_console.is_terminal)


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def _dims(dims: list) -> str:
    from rich.markup import escape

    return escape("[" + ", ".join(str(d) for d in dims) + "]")


# ---------------------------------------------------------------------------------------------------------------------
# attn-export onnx
# ---------------------------------------------------------------------------------------------------------------------
SOURCE_HELP = "Model source: one of --preset (tiny, ddpm-cifar10, ddpm-256), --config FILE.json, --model pkg.module:factory."


@app.command("onnx", help=(
    "Export a UNet to ONNX with dynamic batch, height and width.\n\n"
    "Examples:\n\n"
    "  attn-export onnx --preset ddpm-cifar10 -o unet.onnx\n\n"
    "  attn-export onnx --config unet.json --checkpoint ema.safetensors -o unet.onnx\n\n"
    "  attn-export onnx --model mypkg.unet:build --model-kwargs '{\"ch\": 64}' --checkpoint ckpt.pt -o unet.onnx\n\n"
    "The model description (config, seed, checkpoint sha256, inputs, valid H/W multiple) is stored in the file, "
    "so verify, trt and inspect need no more options."
))
def onnx_cmd(
    output: Path = typer.Option(..., "-o", "--output", help="ONNX file to write (written atomically)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Built-in model: tiny, ddpm-cifar10, ddpm-256. " + SOURCE_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help="UNet config as JSON (keys of attn_export.models.UNetConfig)."),
    model: Optional[str] = typer.Option(None, "--model", help="Import a denoiser factory: package.module:function, returning model(x, t[, y])."),
    model_kwargs: Optional[str] = typer.Option(None, "--model-kwargs", help="JSON object of keyword arguments for --model."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=".safetensors, .pt, .pth or .ckpt (pickles load with weights_only=True)."),
    checkpoint_key: Optional[str] = typer.Option(None, "--checkpoint-key", help="Key of the state dict inside the checkpoint (default: top level, else ema, model, state_dict)."),
    seed: int = typer.Option(0, "--seed", help="Initialization seed when no checkpoint is given (recorded in the file)."),
    norm: Optional[str] = typer.Option(None, "--norm", help="Override the preset's normalization: gn, in, bn or none."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Class-conditional preset, or the class count of an imported model."),
    hw_multiple: Optional[int] = typer.Option(None, "--hw-multiple", help="Imported models: H/W must be multiples of this (probed if omitted)."),
    attention: str = typer.Option("op", "--attention", help="op: one ONNX Attention node per block (opset>=23, TensorRT>=10.14). decomposed: Mul(q,scale), MatMul, Softmax, MatMul (any TensorRT 10.x)."),
    opset: int = typer.Option(23, "--opset", help="ONNX opset. 23 is the first with the Attention op; TensorRT 10.14+/11 and ONNX Runtime >= 1.23 read it."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare with PyTorch in ONNX Runtime at an unseen shape before writing."),
) -> None:
    from .exporter.onnx_export import export_onnx
    from .models.loader import ModelSource

    overrides: dict[str, Any] = {}
    if norm is not None:
        overrides["norm"] = None if norm.lower() in ("none", "null") else norm
    if num_classes is not None and model is None:
        overrides["num_classes"] = num_classes
    source = ModelSource(
        preset=preset, config=config, model=model, model_kwargs=_json_option(model_kwargs, "--model-kwargs"),
        checkpoint=checkpoint, checkpoint_key=checkpoint_key, seed=seed, overrides=overrides,
        num_classes=num_classes if model is not None else None, hw_multiple=hw_multiple,
    )
    with _spinner("exporting") as prog:
        task = prog.add_task("exporting", total=None)
        result = export_onnx(source, output, attention=attention, opset=opset, force=force, check=check,
                             progress=lambda step: prog.update(task, description=f"export: {step}"))
    _print_export_summary(result)


def _print_export_summary(r: Any) -> None:
    from rich.table import Table

    table = Table(title="attn-export onnx", show_header=False, title_justify="left")
    table.add_row("file", str(r.path) + (f" (+ {r.external_data.name})" if r.external_data else ""))
    table.add_row("size", _human_size(r.size_bytes))
    table.add_row("opset", str(r.opset))
    table.add_row("parameters", f"{r.num_parameters:,}")
    for name, dtype, dims in r.inputs:
        table.add_row(f"input {name}", f"{dtype} {_dims(dims)}")
    for name, dtype, dims in r.outputs:
        table.add_row(f"output {name}", f"{dtype} {_dims(dims)}")
    table.add_row("attention", f"{r.attention_nodes} x {'Attention op' if r.attention == 'op' else 'MatMul/Softmax/MatMul (scale on q)'}")
    table.add_row("H/W multiple", str(r.spec.hw_multiple))
    if r.check:
        s = r.check["shapes"][0]["shape"]
        table.add_row("check vs PyTorch", f"max abs err {r.check['max_abs_err']:.2e} at {s[0]}x{s[1]}x{s[2]} (ONNX Runtime CPU)")
    table.add_row("time", f"{r.seconds:.1f} s")
    console.print(table)


# ---------------------------------------------------------------------------------------------------------------------
def main() -> None:
    """Console entry point: run the app, turning library errors into one line and an exit code."""
    try:
        app()
    except AttnExportError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted; no partial output was left behind")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last resort: keep the one-line promise
        if os.environ.get("ATTN_EXPORT_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {first} (set ATTN_EXPORT_DEBUG=1 for the traceback)",
                          highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
