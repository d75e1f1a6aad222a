"""The `attn-export` command line. Thin: parse options, call library functions, print.

Errors from the library (AttnExportError) become one line on stderr and the
error's exit code (2 for bad input, 1 for a failed check); no tracebacks
unless ATTN_EXPORT_DEBUG=1.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console

from .errors import AttnExportError, Terminated, UsageError

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
# Piped output (logs, CI) gets a wide console: rich's default of 80 columns folds the verify and bench tables.
_PIPED_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160
console = Console(width=_PIPED_WIDTH)
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


def _print_error(message: str, label: str = "error:") -> None:
    """One line on stderr; the message is plain text (a '[trt]' in it is not rich markup)."""
    from rich.text import Text

    err_console.print(Text.assemble((label, "bold red"), " ", message), highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    _print_error(message)
    raise typer.Exit(code)


def command(name: str, **settings: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command; the one place where library errors become one line and an exit code.

    2 for input the user must change (UsageError and its kin), 1 for a check
    that ran and failed (CheckFailed, an engine that failed to build or run),
    130 on Ctrl-C and 143 on SIGTERM: outputs are written through temporary
    files, so an interrupted command leaves none behind.
    """
    def register(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> None:
            try:
                fn(*args, **kwargs)
            except AttnExportError as exc:
                _fail(str(exc), exc.exit_code)
            except OSError as exc:
                # A file the OS refuses (full disk, permissions, a folder where a file was expected): the
                # user's environment, so exit 2. Partial outputs are temporary files, removed on the way out.
                where = f"{exc.filename}: " if exc.filename else ""
                _fail(f"{where}{exc.strerror or exc}", 2)
            except KeyboardInterrupt as exc:
                err_console.print("interrupted; no partial output was left behind")
                raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None

        app.command(name, **settings)(run)
        return run

    return register


# Signals received while a command runs. Native code (the TorchScript tracer among it) can swallow the
# exception a handler raises, so every progress report raises it again: the command stops at its next step,
# before anything is put in place.
_SIGNALS: list[int] = []


def _on_signal(signum: int, frame: Any) -> None:
    _SIGNALS.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _raise_if_signalled() -> None:
    if _SIGNALS:
        raise Terminated() if signal.SIGTERM in _SIGNALS else KeyboardInterrupt()


def _progress_type() -> type:
    """rich's Progress whose every update first re-raises a signal that native code swallowed."""
    from rich.progress import Progress

    class SignalAwareProgress(Progress):
        def update(self, *args: Any, **kwargs: Any) -> None:
            _raise_if_signalled()
            super().update(*args, **kwargs)

    return SignalAwareProgress


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
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    return _progress_type()(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), TimeElapsedColumn(),
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
# readiness.supported_range(), spelled out so --help needs no onnx import (a test keeps the two equal).
SUPPORTED_TRT = "10.12-10.16, 11.0-11.4"
TARGETS_HELP = f"one of {SUPPORTED_TRT}, e.g. 10.14 or 11.0 (the releases whose Python API the conformance check covers)"
INPUT_SHAPES_HELP = ("Shapes of every dynamic input, Polygraphy/trtexec style: x:1x3x64x64,sigma:1 "
                     "(repeat the option for several shapes). For files this tool did not export.")
INPUT_RANGE_HELP = ("Data range of an input, name:LOW:HIGH, e.g. sigma:0.002:80 (repeatable; default: image N(0,1), "
                    "other floats [0,1], integers [0,1000)).")
SOURCE_HELP = "Model source: one of --preset (tiny, ddpm-cifar10, ddpm-256), --config FILE.json, --model pkg.module:factory."

# The reference-model options, declared once for every command that rebuilds an artifact's PyTorch model.
REF_PRESET = typer.Option(None, "--preset", help="Reference model: a built-in preset (default: the one the artifact records).")
REF_CONFIG = typer.Option(None, "--config", help="Reference model: a UNet config JSON.")
REF_MODEL = typer.Option(None, "--model", help="Reference model: your factory, package.module:function (imported: it is your code).")
REF_MODEL_KWARGS = typer.Option(None, "--model-kwargs", help="JSON object of keyword arguments for --model.")
REF_CHECKPOINT = typer.Option(None, "--checkpoint", help="Reference checkpoint; its sha256 must be the one recorded at export.")
REF_CHECKPOINT_KEY = typer.Option(None, "--checkpoint-key", help="Key of the state dict inside --checkpoint.")
REF_ALLOW_MISMATCH = typer.Option(False, "--allow-checkpoint-mismatch", help="Compare even if the checkpoint is not the one recorded at export.")
REF_TRUST = typer.Option(False, "--trust-artifact", "--trust-model", help=(
    "Use what the artifact records about its reference: import the factory it names (exported with --model) and "
    "read the checkpoint path it records. Default: refuse both; name them with --model/--checkpoint instead."))


MAX_MEMORY = typer.Option(None, "--max-memory", help=(
    "Refuse shapes whose estimated memory (activations, attention scores, weights) exceeds this, e.g. 16GiB; "
    "default: this machine's memory; 0: no limit."))


def _max_memory(text: Optional[str]) -> Optional[int]:
    from .graph.memory import parse_memory

    return None if text is None else parse_memory(text)


def _reference_options(preset: Optional[str], config: Optional[Path], model: Optional[str], model_kwargs: Optional[str],
                       checkpoint: Optional[Path], checkpoint_key: Optional[str], allow_checkpoint_mismatch: bool,
                       trust_artifact: bool) -> Any:
    from .spec import ReferenceOptions

    return ReferenceOptions(preset=preset, config=config, model=model,
                            model_kwargs=_json_option(model_kwargs, "--model-kwargs") or None, checkpoint=checkpoint,
                            checkpoint_key=checkpoint_key, allow_checkpoint_mismatch=allow_checkpoint_mismatch,
                            trust_artifact=trust_artifact)


@command("onnx", help=(
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
    allow_unfused: bool = typer.Option(False, "--allow-unfused", help="Write the file even when an attention site cannot be rewritten into the --attention form, and list each such site (default: exit 1 naming it)."),
    exporter: str = typer.Option("torchscript", "--exporter", help="torchscript (default, PyTorch's TorchScript tracer, deprecated by PyTorch) or dynamo (torch.export based; slower, same passes and checks)."),
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
                             allow_unfused=allow_unfused, exporter=exporter,
                             progress=lambda step: prog.update(task, description=f"export: {step}"))
    _print_export_summary(result)


def _print_export_summary(r: Any) -> None:
    from rich.markup import escape
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
    table.add_row("attention", f"{r.attention_nodes} x {'Attention op' if r.attention == 'op' else 'MatMul/Softmax/MatMul (scale on q)'}"
                  + (f", {len(r.unfused)} site(s) NOT rewritten" if r.unfused else ""))
    for u in r.unfused:
        table.add_row("[bold red]unfused[/]", escape(f"{u['site']} (Softmax {u['node']}): {u['reason']}"))
    table.add_row("H/W multiple", str(r.spec.hw_multiple))
    if r.check:
        s = r.check["shapes"][0]["shape"]
        table.add_row("check vs PyTorch", f"max abs err {r.check['max_abs_err']:.2e} at {s[0]}x{s[1]}x{s[2]} (ONNX Runtime CPU)")
    table.add_row("time", f"{r.seconds:.1f} s")
    console.print(table)


# ---------------------------------------------------------------------------------------------------------------------
# attn-export optimize
# ---------------------------------------------------------------------------------------------------------------------
@command("optimize", help=(
    "Rewrite the attention of an ONNX file (ours or exported elsewhere) into the form TensorRT fuses.\n\n"
    "Every attention site the analysis finds (Einsum or MatMul forms, scale anywhere, FP16 with Casts, ...) "
    "becomes one ONNX Attention node (--attention op, opset raised to 23) or the canonical "
    "Mul(q, scale) -> MatMul -> Softmax -> MatMul (--attention decomposed). The result is compared with the input "
    "in ONNX Runtime before it is written; external data is kept.\n\n"
    "Examples:\n\n"
    "  attn-export optimize unet.onnx -o unet.opt.onnx --input-shapes noisy:1x1x128x128,sigma:1\n\n"
    "  attn-export optimize unet.onnx -o unet.dec.onnx --attention decomposed --input-shapes x:2x3x64x64,t:2\n\n"
    "Exit status: 0 written, 1 a site could not be rewritten or the check failed (nothing written), 2 bad input."
))
def optimize_cmd(
    model: Path = typer.Argument(..., help="ONNX file to optimize."),
    output: Path = typer.Option(..., "-o", "--output", help="ONNX file to write (atomically)."),
    attention: str = typer.Option("op", "--attention", help="op (ONNX Attention, opset 23) or decomposed (MatMul/Softmax/MatMul)."),
    input_shapes: Optional[list[str]] = typer.Option(None, "--input-shapes", help=INPUT_SHAPES_HELP + " Used for the check."),
    input_range: Optional[list[str]] = typer.Option(None, "--input-range", help=INPUT_RANGE_HELP),
    allow_unfused: bool = typer.Option(False, "--allow-unfused", help="Write the file even when a site cannot be rewritten, listing it."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare with the input in ONNX Runtime before writing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .exporter.foreign import parse_input_ranges
    from .exporter.optimize import optimize_onnx

    with _spinner("optimize") as prog:
        task = prog.add_task("optimize", total=None)
        r = optimize_onnx(model, output, attention=attention, force=force, allow_unfused=allow_unfused,
                          input_shapes=input_shapes or None, input_ranges=parse_input_ranges(input_range), check=check,
                          progress=lambda step: prog.update(task, description=f"optimize: {step}"))
    table = Table(title="attn-export optimize", show_header=False, title_justify="left")
    table.add_row("file", escape(str(r.path)) + (f" (+ {escape(r.external_data.name)})" if r.external_data else ""))
    table.add_row("opset", f"{r.opset_before} -> {r.opset}" if r.opset != r.opset_before else str(r.opset))
    table.add_row("attention", f"{r.sites} site(s): {len(r.rewritten)} rewritten, {len(r.unchanged)} already "
                               f"{'Attention op' if r.attention == 'op' else 'canonical'}"
                  + (f", {len(r.unfused)} NOT rewritten" if r.unfused else ""))
    for u in r.unfused:
        table.add_row("[bold red]unfused[/]", escape(f"{u['site']} ({u['node']}): {u['reason']}"))
    for c in r.check:
        table.add_row(f"check {'x'.join(map(str, c['shape']))}", f"{'pass' if c['passed'] else 'FAIL'}, max abs err "
                                                                  f"{c['max_abs_err']:.2e} vs the input (ONNX Runtime CPU)")
    table.add_row("time", f"{r.seconds:.1f} s")
    console.print(table)


# ---------------------------------------------------------------------------------------------------------------------
# attn-export bench
# ---------------------------------------------------------------------------------------------------------------------
@command("bench", help=(
    "Measure latency, throughput and peak memory of an artifact on several backends.\n\n"
    "Examples:\n\n"
    "  attn-export bench unet.onnx --shapes 1x32x32,8x32x32 --iterations 20\n\n"
    "  attn-export bench unet.onnx --backend pytorch,pytorch-sdpa,onnxruntime --time-budget 10 --json bench.json\n\n"
    "  attn-export bench unet.plan --backend pytorch,tensorrt --provider cuda\n\n"
    "Reports mean/median/p90/p99 latency, images/s, peak host memory growth (and device memory on a GPU) and the "
    "ratio to the PyTorch reference measured in the same run. It never decides pass or fail."
))
def bench_cmd(
    artifact: Path = typer.Argument(..., help="ONNX file, or TensorRT engine (.plan/.engine with its .json sidecar)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Comma-separated: pytorch, pytorch-sdpa, pytorch-decomposed, onnxruntime, tensorrt (default: pytorch and the artifact's own backend)."),
    shapes: Optional[str] = typer.Option(None, "--shapes", help="Comma-separated BxHxW, e.g. 1x32x32,4x64x64 (default: batch 1 at the export size)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed calls before timing."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Timed calls per backend and shape (default 10)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Instead of --iterations: time calls for this many seconds (at least one call)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads for PyTorch and ONNX Runtime (default: each library's own)."),
    provider: str = typer.Option("cpu", "--provider", help="ONNX Runtime provider: cpu, cuda or tensorrt. cuda/tensorrt also put the PyTorch reference on the GPU."),
    attention_impl: str = typer.Option("reference", "--attention-impl", help="Attention formulation of the 'pytorch' backend: reference, sdpa or decomposed."),
    graph_optimization: str = typer.Option("all", "--graph-optimization", help="ONNX Runtime graph optimization level: disable, basic, extended, all."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full report as JSON (atomically)."),
    preset: Optional[str] = REF_PRESET,
    config: Optional[Path] = REF_CONFIG,
    model: Optional[str] = REF_MODEL,
    model_kwargs: Optional[str] = REF_MODEL_KWARGS,
    checkpoint: Optional[Path] = REF_CHECKPOINT,
    checkpoint_key: Optional[str] = REF_CHECKPOINT_KEY,
    allow_checkpoint_mismatch: bool = REF_ALLOW_MISMATCH,
    trust_artifact: bool = REF_TRUST,
    max_memory: Optional[str] = MAX_MEMORY,
) -> None:
    from .bench import parse_backends, run_bench, write_json
    from .models.attention import ATTENTION_IMPLS
    from .spec import parse_shapes

    if attention_impl not in ATTENTION_IMPLS:
        raise UsageError(f"--attention-impl must be one of {', '.join(ATTENTION_IMPLS)} (got {attention_impl!r})")
    if graph_optimization not in ("disable", "basic", "extended", "all"):
        raise UsageError(f"--graph-optimization must be disable, basic, extended or all (got {graph_optimization!r})")
    if json_out is not None and not json_out.parent.exists():
        raise UsageError(f"folder of --json does not exist: {json_out.parent}")
    with _spinner("benchmarking") as prog:
        task = prog.add_task("benchmarking", total=None)
        report = run_bench(
            artifact, backends=parse_backends(backend) if backend else None,
            shapes=parse_shapes(shapes) if shapes else None, warmup=warmup, iterations=iterations,
            time_budget=time_budget, threads=threads, provider=provider.lower(), attention_impl=attention_impl,
            graph_optimization=graph_optimization, progress=lambda what: prog.update(task, description=f"bench: {what}"),
            reference_model=_reference_options(preset, config, model, model_kwargs, checkpoint, checkpoint_key,
                                               allow_checkpoint_mismatch, trust_artifact),
            max_memory=_max_memory(max_memory),
        )
    _print_bench(report)
    if json_out is not None:
        write_json(report, json_out)
        console.print(f"wrote {json_out}")


def _print_bench(report: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .spec import format_shape

    host = report["host"]
    table = Table(title=f"attn-export bench {Path(report['artifact']).name}", title_justify="left")
    for col in ("backend", "shape", "mean ms", "median ms", "p90 ms", "p99 ms", "images/s", "peak host", "peak device",
                "vs pytorch", "settings"):
        table.add_column(col, justify="left" if col in ("backend", "shape", "settings") else "right")
    for r in report["results"]:
        shape = format_shape(r["shape"])
        if r["status"] != "ok":
            # Status where the numbers go, the reason in the wide last column.
            table.add_row(r["backend"], shape, f"[yellow]{r['status']}[/]", *[""] * 7, escape(r["error"] or ""))
            continue
        lat = r["latency_ms"]
        mib = lambda v: "—" if v is None else f"{v:.0f} MiB"  # noqa: E731
        s = r["settings"]
        detail = ", ".join(f"{k}={s[k]}" for k in ("device", "attention_impl", "threads", "providers", "graph_optimization")
                           if k in s)
        table.add_row(r["backend"], shape, f"{lat['mean']:.2f}", f"{lat['median']:.2f}", f"{lat['p90']:.2f}",
                      f"{lat['p99']:.2f}", f"{r['throughput_images_per_s']:.1f}", mib(r["peak_host_mib"]),
                      mib(r["peak_device_mib"]), "—" if r["ratio_to_pytorch"] is None else f"{r['ratio_to_pytorch']:.2f}x",
                      detail)
    console.print(table)
    st = report["settings"]
    console.print(f"{host.get('processor', '?')}, {host.get('cpu_count')} CPUs; torch {host.get('torch', '-')}, "
                  f"onnxruntime {host.get('onnxruntime', '-')}; warm-up {st['warmup']}, "
                  + (f"time budget {st['time_budget_s']} s" if st["time_budget_s"] else f"{st['iterations'] or 10} timed calls")
                  + "; latency is per call, numpy in and out", highlight=False)


# ---------------------------------------------------------------------------------------------------------------------
# attn-export triton
# ---------------------------------------------------------------------------------------------------------------------
@command("triton", help=(
    "Write a Triton Inference Server model repository entry for an ONNX file or a TensorRT engine.\n\n"
    "Examples:\n\n"
    "  attn-export triton unet.plan --repo models --name ddpm --instances 2\n\n"
    "  attn-export triton unet.onnx --repo models --kind cpu --max-batch 16\n\n"
    "Writes REPO/NAME/config.pbtxt and REPO/NAME/VERSION/model.plan (platform tensorrt_plan) or model.onnx "
    "(platform onnxruntime_onnx, external data copied alongside); the config is checked with tritonclient's ModelConfig."
))
def triton_cmd(
    artifact: Path = typer.Argument(..., help="ONNX file, or TensorRT engine with its .json sidecar."),
    repo: Path = typer.Option(..., "--repo", help="Model repository folder (created if missing)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name (default: the artifact's file stem)."),
    version: int = typer.Option(1, "--version", help="Version folder to put the model file in."),
    instances: int = typer.Option(1, "--instances", help="Model instances (instance_group count)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="gpu or cpu (default: gpu for engines, cpu for ONNX)."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="max_batch_size (default: the engine profile's max batch; 8 for ONNX). 0 disables batching."),
    force: bool = typer.Option(False, "--force", help="Replace an existing model folder."),
    attention: str = typer.Option("onnxruntime", "--attention", help=(
        "ONNX files: onnxruntime (default) writes attention as ONNX Runtime's MultiHeadAttention, flash attention "
        "on CPU and CUDA with memory linear in the sequence; as-is copies the file unchanged.")),
) -> None:
    from rich.markup import escape

    from .triton import write_model_repository

    m = write_model_repository(artifact, repo, name=name, version=version, instances=instances, kind=kind,
                               max_batch=max_batch, force=force, attention=attention)
    console.print(f"wrote Triton model [bold]{escape(m.name)}[/] ({m.platform}, max_batch_size {m.max_batch_size}) "
                  f"in {escape(str(m.model_dir))}", highlight=False)
    if m.attention_rewritten:
        console.print(f"  attention: {m.attention_rewritten} site(s) as MultiHeadAttention (ONNX Runtime's flash attention)",
                      highlight=False)
    console.print(f"  {escape(str(m.config_path))}", highlight=False)
    for p in [m.model_file, *m.copied]:
        console.print(f"  {escape(str(p))}", highlight=False)
    if not m.validated:
        err_console.print("note: tritonclient is not installed, so config.pbtxt was not checked "
                          "(pip install 'attn-export[triton]')")


# ---------------------------------------------------------------------------------------------------------------------
# attn-export verify
# ---------------------------------------------------------------------------------------------------------------------
def _fmt_err(value: float) -> str:
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf"
    return f"{value:.2e}"


@command("verify", help=(
    "Compare an artifact with the PyTorch model it was exported from, over a sweep of shapes.\n\n"
    "ARTIFACT is an ONNX file (run in ONNX Runtime) or a TensorRT engine (.plan/.engine with its .json sidecar). "
    "The reference model, seed and checkpoint come from the artifact; a checkpoint whose sha256 changed is refused.\n\n"
    "Pass rule (Polygraphy's): a value fails only when it exceeds both --atol and --rtol under --stat; "
    "NaN/Inf in the candidate where PyTorch is finite always fails. Defaults: fp32 atol 1e-4 rtol 1e-3 elemwise; "
    "fp16 atol 1e-2 rtol 1e-2 mean (NVIDIA's guidance).\n\n"
    "Examples:\n\n"
    "  attn-export verify unet.onnx\n\n"
    "  attn-export verify unet.onnx --shapes 2x64x96,1x128x128 --report verify.json\n\n"
    "  attn-export verify unet.plan --stat quantile --quantile 0.99\n\n"
    "  attn-export verify foreign.fp16.onnx --reference foreign.onnx --input-shapes noisy:1x1x128x128,sigma:1\n\n"
    "Exit status: 0 all shapes pass, 1 a comparison failed, 2 bad usage or input."
))
def verify_cmd(
    artifact: Path = typer.Argument(..., help="ONNX file or TensorRT engine (.plan/.engine, with its sidecar)."),
    shapes: Optional[str] = typer.Option(None, "--shapes", help="Comma-separated BxHxW shapes, e.g. 2x64x96,1x128x128 (default: a sweep derived from the artifact)."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance (default by precision: fp32 1e-4, fp16 1e-2)."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance (default by precision: fp32 1e-3, fp16 1e-2)."),
    stat: Optional[str] = typer.Option(None, "--stat", help="Error statistic: elemwise, max, mean, median or quantile (default: fp32 elemwise, fp16 mean)."),
    quantile: float = typer.Option(0.99, "--quantile", help="Quantile level for --stat quantile."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random inputs."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write every figure as JSON to this file (atomically)."),
    preset: Optional[str] = REF_PRESET,
    config: Optional[Path] = REF_CONFIG,
    model: Optional[str] = REF_MODEL,
    model_kwargs: Optional[str] = REF_MODEL_KWARGS,
    checkpoint: Optional[Path] = REF_CHECKPOINT,
    checkpoint_key: Optional[str] = REF_CHECKPOINT_KEY,
    allow_checkpoint_mismatch: bool = REF_ALLOW_MISMATCH,
    trust_artifact: bool = REF_TRUST,
    provider: Optional[str] = typer.Option(None, "--provider", help="ONNX Runtime execution provider: cpu (default), cuda or tensorrt."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Compare against this ONNX file in ONNX Runtime instead of PyTorch (needed for files this tool did not export)."),
    input_shapes: Optional[list[str]] = typer.Option(None, "--input-shapes", help=INPUT_SHAPES_HELP),
    input_range: Optional[list[str]] = typer.Option(None, "--input-range", help=INPUT_RANGE_HELP),
    max_memory: Optional[str] = MAX_MEMORY,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from .exporter.foreign import parse_input_ranges
    from .verify import verify

    if report is not None and (not report.parent.exists() or report.is_dir()):
        raise UsageError(f"cannot write the report to {report}: " + ("it is a folder" if report.is_dir() else f"folder {report.parent} does not exist"))
    with _progress_type()(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=True, disable=not err_console.is_terminal) as prog:
        task = prog.add_task("verify", total=None)
        result = verify(
            artifact, shapes=shapes, atol=atol, rtol=rtol, stat=stat, quantile=quantile, seed=seed,
            reference_model=_reference_options(preset, config, model, model_kwargs, checkpoint, checkpoint_key,
                                               allow_checkpoint_mismatch, trust_artifact),
            providers=[provider] if provider else None,
            progress=lambda done, total, text: prog.update(task, completed=done, total=total, description=text),
            reference=reference, input_shapes=input_shapes or None, input_ranges=parse_input_ranges(input_range),
            max_memory=_max_memory(max_memory),
        )
    _print_verify(result)
    if report is not None:
        from .atomic import write_text_atomic

        write_text_atomic(report, result.to_json() + "\n")
        console.print(f"report written to {report}", highlight=False)
    if not result.passed:
        raise typer.Exit(1)


def _print_verify(r: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]verify[/] {escape(r.artifact)}: {r.candidate} vs {r.reference}, {r.precision}, seed {r.seed}", highlight=False)
    console.print(f"tolerances: {r.tolerances.describe()}", highlight=False)
    table = Table(title_justify="left")
    for col in ("shape", "output", "max abs", "mean abs", "max rel", "p99 abs", "cosine", "NaN/Inf ref", "NaN/Inf cand",
                "min atol", "min rtol", "result"):
        # Shape and verdict never wrap; the figures may wrap on narrow terminals rather than be cut.
        table.add_column(col, justify="left" if col in ("shape", "output", "result") else "right",
                         no_wrap=col in ("shape", "result"), overflow="fold")
    for s in r.shapes:
        for o in s.outputs:
            table.add_row(
                "x".join(map(str, s.shape)), o.name, _fmt_err(o.max_abs), _fmt_err(o.mean_abs), _fmt_err(o.max_rel),
                _fmt_err(o.p99_abs), "nan" if o.cosine != o.cosine else f"{o.cosine:.6f}", f"{o.nan_ref}/{o.inf_ref}",
                f"{o.nan_cand}/{o.inf_cand}", _fmt_err(o.min_atol), _fmt_err(o.min_rtol),
                "[green]PASS[/]" if o.passed else "[bold red]FAIL[/]",
            )
    console.print(table)
    times = ", ".join(f"{name} {sec:.2f} s" for name, sec in r.timings.items())
    setup = ", ".join(f"{name} {sec:.2f} s" for name, sec in r.setup_seconds.items())
    console.print(f"time: {times} (loading: {setup})", highlight=False)
    if r.checkpoint and r.checkpoint.get("path") and not r.checkpoint.get("matches"):
        console.print(f"[yellow]warning:[/] reference checkpoint {escape(str(r.checkpoint['path']))} is not the one recorded at export", highlight=False)
    if r.passed:
        console.print(f"[bold green]PASSED[/]: {len(r.shapes)} shape(s), every output within tolerance", highlight=False)
    else:
        console.print(f"[bold red]FAILED[/]: {len(r.failures())} mismatched output(s)", highlight=False)
        for line in r.failures():
            console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------------------------------
# attn-export inspect
# ---------------------------------------------------------------------------------------------------------------------
@command("inspect", help=(
    "Show what is inside an ONNX file or a TensorRT engine.\n\n"
    "ONNX: inputs/outputs and their dims, opset, size, the embedded model description, op types, the attention "
    "blocks (form, scale placement, sequence length, head size, whether TensorRT can fuse them) and the FP16/FP32 share. "
    "Engine: its sidecar (profiles, precision, TensorRT version, GPU, I/O) and the fused-attention report.\n\n"
    "Examples:\n\n"
    "  attn-export inspect unet.onnx\n\n"
    "  attn-export inspect unet.onnx --trt --target 10.14\n\n"
    "  attn-export inspect unet.plan --json"
))
def inspect_cmd(
    artifact: Path = typer.Argument(..., help="ONNX file or TensorRT engine (.plan/.engine, with its sidecar)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON only."),
    trt: bool = typer.Option(False, "--trt", help="ONNX only: check TensorRT readiness (ops, attention fusion, dims); exit 1 on errors."),
    target: str = typer.Option("10.14", "--target", help=f"TensorRT version for --trt: {TARGETS_HELP}."),
) -> None:
    from .inspection import inspect_artifact

    result = inspect_artifact(artifact)
    readiness = None
    if trt:
        if result.kind != "onnx":
            raise UsageError("--trt checks an ONNX file; an engine is already built")
        from .engines.readiness import check_target, check_trt_readiness

        check_target(target)
        readiness = check_trt_readiness(artifact, target)
    if as_json:
        data = result.to_dict()
        if readiness is not None:
            data["trt_readiness"] = readiness.to_dict()
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        (_print_inspect_engine if result.kind == "engine" else _print_inspect_onnx)(result.to_dict())
        if readiness is not None:
            _print_readiness(readiness)
    if readiness is not None and not readiness.ok:
        raise typer.Exit(1)


def _print_inspect_onnx(d: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"attn-export inspect {escape(d['path'])}", show_header=False, title_justify="left")
    table.add_row("size", _human_size(d["file_size"]) + (f" (with {len(d['external_data'])} external data file(s))" if d["external_data"] else ""))
    table.add_row("opset", str(d["opset"]) + f" (IR {d['ir_version']}, {escape(d['producer'] or 'unknown producer')})")
    for io in d["inputs"]:
        table.add_row(f"input {escape(io['name'])}", f"{io['dtype']} {_dims(io['dims'])}")
    for io in d["outputs"]:
        table.add_row(f"output {escape(io['name'])}", f"{io['dtype']} {_dims(io['dims'])}")
    table.add_row("nodes / weight elements", f"{d['num_nodes']:,} / {d['num_parameters']:,}")
    spec = d.get("spec")
    if spec:
        src = spec.get("source") or {}
        what = src.get("preset") or src.get("model") or src.get("kind", "?")
        ck = spec.get("checkpoint")
        table.add_row("model", escape(f"{what} (seed {src.get('seed')}), H/W multiple {spec['hw_multiple']}, precision {spec['precision']}, "
                                      f"attention {spec['attention']}, attn-export {spec.get('tool_version', '?')}"))
        table.add_row("checkpoint", escape(f"{ck['path']} (sha256 {str(ck.get('sha256'))[:12]})") if ck else "none (seeded initialization)")
    else:
        table.add_row("model", "[yellow]no attn-export description[/]")
    for key, value in d["metadata"].items():
        table.add_row(f"metadata {escape(key)}", escape(str(value)[:80]))
    hist = d["op_histogram"]
    table.add_row("ops", escape(", ".join(f"{op} {n}" for op, n in hist.items())))
    for name, part in (("initializers", "initializers"), ("activations", "activations")):
        shares = d["precision"][part]
        table.add_row(f"dtypes ({name})", ", ".join(
            f"{dt} {v['tensors']} tensors ({v['tensor_share']:.0%}), {v['element_share']:.1%} of elements" for dt, v in shares.items()))
    console.print(table, soft_wrap=True)

    att = Table(title=f"attention: {d['attention_summary']['count']} site(s)", title_justify="left")
    for col in ("site", "form", "scale", "seq len", "heads x size", "dtype", "TensorRT fusion"):
        att.add_column(col, overflow="fold")  # fold rather than cut names on narrow terminals
    for a in d["attention"]:
        scale = f"{a['scale']:.4g} on {a['scale_placement']}" if a["scale"] is not None else f"? on {a['scale_placement']}"
        if a["scale_source"] == "shape":
            scale += " (from the shape)"
        att.add_row(escape(a["name"]), a["form_description"] + ("" if a["problem"] is None else " [red](cannot rewrite)[/]"),
                    escape(scale), escape(str(a["seq_len"] or "?")), f"{a['heads'] or '?'} x {a['head_size'] or '?'}",
                    str(a["dtype"] or "?"), escape(a["trt_fusion"]))
    console.print(att)


def _print_inspect_engine(d: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"attn-export inspect {escape(d['path'])}", show_header=False, title_justify="left")
    table.add_row("size", _human_size(d["file_size"]))
    table.add_row("sidecar", escape(d["sidecar"]))
    table.add_row("TensorRT", str(d["tensorrt_version"]))
    gpu = d.get("gpu") or {}
    table.add_row("GPU", escape(f"{gpu.get('name', '?')} (compute capability {gpu.get('compute_capability', '?')}), "
                                f"hardware compatibility {d.get('hardware_compatibility') or 'none'}"))
    table.add_row("precision", str(d["precision"]))
    for i, p in enumerate(d.get("profiles") or []):
        fmt = lambda t: "x".join(map(str, t))  # noqa: E731
        table.add_row(f"profile {i}", f"min {fmt(p['min'])}, opt {fmt(p['opt'])}, max {fmt(p['max'])}")
    for io in d.get("io") or []:
        table.add_row(f"{io.get('mode', 'tensor')} {escape(str(io.get('name')))}", escape(f"{io.get('dtype')} {io.get('shape')}"))
    onnx_src = d.get("onnx") or {}
    if onnx_src:
        table.add_row("built from", escape(f"{onnx_src.get('path')} (sha256 {str(onnx_src.get('sha256'))[:12]})"))
    fusion = d.get("fusion") or {}
    if fusion:
        summary = fusion.get("summary") or ", ".join(f"{k}: {v}" for k, v in fusion.items() if not isinstance(v, (list, dict)))
        table.add_row("fused attention", escape(str(summary)))
    else:
        table.add_row("fused attention", "no report recorded")
    console.print(table, soft_wrap=True)
    blocks = fusion.get("blocks") if isinstance(fusion, dict) else None
    if blocks:
        bt = Table(title="attention fusion", title_justify="left")
        keys = [k for k in blocks[0] if not isinstance(blocks[0][k], (list, dict))]
        for k in keys:
            bt.add_column(k)
        for b in blocks:
            bt.add_row(*[escape(str(b.get(k))) for k in keys])
        console.print(bt)


def _print_readiness(report: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"TensorRT {report.target} readiness", title_justify="left")
    for col in ("level", "check", "where", "finding"):
        table.add_column(col)
    colors = {"error": "bold red", "warning": "yellow", "ok": "green"}
    for f in report.findings:
        table.add_row(f"[{colors.get(f.level, 'white')}]{f.level}[/]", f.code, escape(f.node or ""), escape(f.message))
    console.print(table)
    verdict = report.verdict
    color = "bold green" if verdict == "ready" else ("bold red" if report.errors else "bold yellow")
    console.print(f"[{color}]{escape(verdict)}[/]")


# ---------------------------------------------------------------------------------------------------------------------
# attn-export fp16 / attn-export trt
# ---------------------------------------------------------------------------------------------------------------------
def _fp16_progress():  # noqa: ANN202 - rich Progress
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    return _progress_type()(TextColumn("[progress.description]{task.description}"), BarColumn(), TimeElapsedColumn(),
                    console=err_console, transient=True, disable=not err_console.is_terminal)


def _run_fp16(model: Path, out: Path, *, keep_io_types: bool = True, threshold: float = 4096.0,
              calibration_shapes: Optional[str] = None, fp32_ops: Optional[list[str]] = None, force: bool = False,
              check: bool = True, input_shapes: Optional[list[str]] = None, input_range: Optional[list[str]] = None,
              reference_model: Any = None, max_memory: Optional[str] = None) -> Any:
    from .exporter.foreign import parse_input_ranges
    from .exporter.fp16 import convert_fp16
    from .spec import parse_shapes

    shapes = parse_shapes(calibration_shapes) if calibration_shapes else None
    with _fp16_progress() as prog:
        task = prog.add_task("fp16", total=None)
        return convert_fp16(model, out, keep_io_types=keep_io_types, threshold=threshold, calibration_shapes=shapes,
                            extra_fp32_ops=tuple(fp32_ops or ()), force=force, check=check,
                            input_shapes=input_shapes or None, input_ranges=parse_input_ranges(input_range),
                            reference_model=reference_model, max_memory=_max_memory(max_memory),
                            progress=lambda text: prog.update(task, description=f"fp16: {text}"))


def _print_fp16(r: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    a = r.audit
    shapes = ", ".join("x".join(map(str, s)) for s in a.calibration_shapes)
    console.print(f"[bold]FP16 range audit[/] of {escape(str(r.source))}: calibration {shapes}, threshold {a.threshold:g} "
                  f"(FP16 max 65504)", highlight=False)
    islands = Table(title=f"FP32 islands: {len(r.fp32_nodes)} node(s)", title_justify="left")
    for col in ("node", "op", "kind", "why"):
        islands.add_column(col, overflow="fold")
    by_kind: dict[str, list[Any]] = {}
    for i in r.fp32_nodes:
        by_kind.setdefault(i.kind, []).append(i)
    for kind, items in by_kind.items():
        if kind == "normalization" and len(items) > 3:
            # Every norm layer is listed in --report; here one row says it.
            ops = sorted({i.op_type for i in items})
            islands.add_row(f"{len(items)} nodes", ", ".join(ops), kind, escape(items[0].reason))
            continue
        for i in items:
            islands.add_row(escape(i.node), i.op_type, kind, escape(i.reason))
    console.print(islands)
    flagged = a.flagged
    near = Table(title=f"tensors over the threshold: {len(flagged)}" + (f" ({len(a.overflowing)} overflow FP16)" if a.overflowing else ""),
                 title_justify="left")
    for col in ("tensor", "node", "op", "absmax", "at"):
        near.add_column(col, overflow="fold")
    for t in flagged[:15]:
        near.add_row(escape(t.name), escape(t.producer or "(input)"), t.op_type,
                     f"[red]{t.absmax:.3g}[/]" if t.overflows else f"{t.absmax:.3g}", "x".join(map(str, t.shape)))
    if flagged:
        console.print(near)
    att = Table(title="attention logits (q·kᵀ·scale)", title_justify="left")
    for col in ("block", "form", "logits absmax", "|q·√s| / |k·√s|", "at", "keys", "Q/K/V dtype"):
        att.add_column(col)
    dtypes = {d["block"]: d for d in r.attention}
    for s in a.attention:
        d = dtypes.get(s.name, {})
        att.add_row(escape(s.name), s.form, f"{s.logits_absmax:.3g}", f"{s.q_prescaled_absmax:.3g} / {s.k_prescaled_absmax:.3g}",
                    "x".join(map(str, s.shape)), str(s.keys), f"{d.get('q', '?')}/{d.get('k', '?')}/{d.get('v', '?')}")
    if a.attention:
        console.print(att)
    ma = a.max_activation
    summary = Table(title=f"attn-export fp16 -> {escape(str(r.path))}", show_header=False, title_justify="left")
    summary.add_row("nodes", f"{r.nodes_fp16} FP16, {r.nodes_fp32} FP32, {r.nodes_other} without float output")
    summary.add_row("casts added", str(r.casts_added))
    summary.add_row("initializers", f"{r.initializers_fp16} FP16, {r.initializers_fp32} FP32"
                    + (f", {len(r.clamped_initializers)} clamped to ±65504" if r.clamped_initializers else ""))
    if ma is not None:
        summary.add_row("max activation", escape(f"{ma.absmax:.3g} ({ma.name}, {ma.op_type}) at {'x'.join(map(str, ma.shape))}"))
    if r.forced_fp16:
        summary.add_row("forced FP16", escape(", ".join(r.forced_fp16)))
    if r.check:
        errs = ", ".join(f"{'x'.join(map(str, s['shape']))}: {s['max_abs_err']:.2e}" for s in r.check["shapes"])
        from .exporter.foreign import is_foreign

        summary.add_row("vs the FP32 file" if is_foreign(r.spec) else "vs PyTorch", f"max abs err {errs} ({r.check['tolerances']}; ONNX Runtime CPU computes FP16 ops in FP32)")
    if r.emulation is not None:
        e = r.emulation
        summary.add_row("FP16 emulation", ("[green]no overflow[/]" if e.ok else f"[red]{len(e.non_finite)} non-finite[/]")
                        + f" in {e.fp16_tensors} FP16 tensors at {', '.join('x'.join(map(str, s)) for s in e.shapes)}")
    summary.add_row("size / time", f"{_human_size(r.size_bytes)}, {r.seconds:.1f} s")
    console.print(summary)


@command("fp16", help=(
    "Convert an exported FP32 ONNX file to FP16, keeping FP32 islands where FP16 is unsafe.\n\n"
    "An FP16 range audit runs the model in ONNX Runtime on realistic inputs at several shapes and measures every "
    "activation and attention logit. Normalization layers, the sinusoidal time embedding and every node whose "
    "inputs or outputs exceed --threshold stay FP32; the rest (attention Q/K/V included) becomes FP16. The result is "
    "compared with PyTorch and run through an FP16 overflow emulation before it is written.\n\n"
    "Examples:\n\n"
    "  attn-export fp16 unet.onnx -o unet.fp16.onnx\n\n"
    "  attn-export fp16 unet.onnx -o unet.fp16.onnx --calibration-shapes 1x32x32,2x64x48 --threshold 8192\n\n"
    "Exit status: 0 written, 1 the FP16 model failed its checks (nothing written), 2 bad usage or input."
))
def fp16_cmd(
    model: Path = typer.Argument(..., help="FP32 ONNX file (exported by `attn-export onnx`, or from elsewhere with --input-shapes)."),
    output: Path = typer.Option(..., "-o", "--output", help="FP16 ONNX file to write (atomically)."),
    keep_io_types: bool = typer.Option(True, "--keep-io-types/--no-keep-io-types", help="Keep FP32 inputs and outputs (default) or make them FP16."),
    threshold: float = typer.Option(4096.0, "--threshold", help="Activation absmax above which nodes stay FP32 (FP16 max is 65504)."),
    calibration_shapes: Optional[str] = typer.Option(None, "--calibration-shapes", help="Comma-separated BxHxW shapes for the audit (default: derived from the model)."),
    fp32_op: Optional[list[str]] = typer.Option(None, "--fp32-op", help="Also keep every node of this op type in FP32 (repeatable)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare with PyTorch and run the FP16 overflow emulation before writing."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the audit and conversion summary as JSON."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    input_shapes: Optional[list[str]] = typer.Option(None, "--input-shapes", help=INPUT_SHAPES_HELP + " Used as the calibration shapes."),
    input_range: Optional[list[str]] = typer.Option(None, "--input-range", help=INPUT_RANGE_HELP),
    preset: Optional[str] = REF_PRESET,
    config: Optional[Path] = REF_CONFIG,
    ref_model: Optional[str] = REF_MODEL,
    model_kwargs: Optional[str] = REF_MODEL_KWARGS,
    checkpoint: Optional[Path] = REF_CHECKPOINT,
    checkpoint_key: Optional[str] = REF_CHECKPOINT_KEY,
    allow_checkpoint_mismatch: bool = REF_ALLOW_MISMATCH,
    trust_artifact: bool = REF_TRUST,
    max_memory: Optional[str] = MAX_MEMORY,
) -> None:
    if report is not None and (not report.parent.exists() or report.is_dir()):
        raise UsageError(f"cannot write the report to {report}")
    result = _run_fp16(model, output, keep_io_types=keep_io_types, threshold=threshold,
                       calibration_shapes=calibration_shapes, fp32_ops=fp32_op, force=force, check=check,
                       input_shapes=input_shapes, input_range=input_range,
                       reference_model=_reference_options(preset, config, ref_model, model_kwargs, checkpoint,
                                                          checkpoint_key, allow_checkpoint_mismatch, trust_artifact),
                       max_memory=max_memory)
    _print_fp16(result)
    if report is not None:
        from .atomic import write_text_atomic

        write_text_atomic(report, json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        console.print(f"report written to {report}", highlight=False)


HARDWARE_COMPAT = {"none": "none", "ampere+": "ampere_plus", "same-cc": "same_compute_capability"}


@command("trt", help=(
    "Build a TensorRT engine (plus its .json sidecar) from an exported ONNX file.\n\n"
    "With --fp16 the FP32 ONNX is first converted to FP16 (see `attn-export fp16`; saved as <engine stem>.fp16.onnx "
    "or --fp16-onnx) and the engine is built strongly typed from it: TensorRT 11 has no FP16 builder flag.\n\n"
    "Examples:\n\n"
    "  attn-export trt unet.onnx --fp16 -o unet.plan\n\n"
    "  attn-export trt unet.onnx --fp16 -o unet.plan --min 1x32x32 --opt 4x64x64 --max 8x128x128 --timing-cache tc.bin\n\n"
    "Profiles are validated before the conversion and the build. Needs TensorRT and an NVIDIA GPU for the build "
    "(exit 2 with the missing piece named otherwise).\n\n"
    f"Supported TensorRT: {SUPPORTED_TRT}. Only the Python API is checked, on CPU, against the real bindings of "
    "those releases (names, enum members, signatures); that check builds and runs nothing. No engine has been built "
    "or run on a GPU by this project yet: `make test-gpu` does that on a machine with one."
))
def trt_cmd(
    model: Path = typer.Argument(..., help="ONNX file exported by `attn-export onnx` (FP32, or FP16 from `attn-export fp16`)."),
    output: Path = typer.Option(..., "-o", "--output", help="Engine file to write (.plan), with its sidecar <engine>.json."),
    fp16: bool = typer.Option(False, "--fp16", help="Convert to FP16 ONNX first (FP32 islands from the range audit)."),
    fp16_onnx: Optional[Path] = typer.Option(None, "--fp16-onnx", help="Where to save the FP16 ONNX (default: <engine stem>.fp16.onnx next to the engine)."),
    mins: Optional[list[str]] = typer.Option(None, "--min", help="Profile min BxHxW (repeat --min/--opt/--max per profile)."),
    opts: Optional[list[str]] = typer.Option(None, "--opt", help="Profile opt BxHxW, the shape TensorRT tunes for."),
    maxs: Optional[list[str]] = typer.Option(None, "--max", help="Profile max BxHxW."),
    workspace: Optional[int] = typer.Option(None, "--workspace", help="Workspace memory pool limit in MiB (default: TensorRT's)."),
    opt_level: int = typer.Option(3, "--opt-level", help="Builder optimization level 0-5."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Timing cache file: loaded if present, saved after the build."),
    hardware_compat: str = typer.Option("none", "--hardware-compat", help="Hardware compatibility: none, ampere+ or same-cc."),
    target: str = typer.Option("10.14", "--target", help=f"TensorRT version for the readiness check: {TARGETS_HELP}."),
    threshold: float = typer.Option(4096.0, "--threshold", help="With --fp16: activation absmax above which nodes stay FP32."),
    calibration_shapes: Optional[str] = typer.Option(None, "--calibration-shapes", help="With --fp16: BxHxW shapes for the range audit."),
    input_shapes: Optional[list[str]] = typer.Option(None, "--input-shapes", help="With --fp16: " + INPUT_SHAPES_HELP),
    force: bool = typer.Option(False, "--force", help="Replace existing output files (engine, sidecar, FP16 ONNX)."),
    preset: Optional[str] = REF_PRESET,
    config: Optional[Path] = REF_CONFIG,
    ref_model: Optional[str] = REF_MODEL,
    model_kwargs: Optional[str] = REF_MODEL_KWARGS,
    checkpoint: Optional[Path] = REF_CHECKPOINT,
    checkpoint_key: Optional[str] = REF_CHECKPOINT_KEY,
    allow_checkpoint_mismatch: bool = REF_ALLOW_MISMATCH,
    trust_artifact: bool = REF_TRUST,
    max_memory: Optional[str] = MAX_MEMORY,
) -> None:
    from .atomic import check_output_path
    from .engines.profiles import default_profile, parse_profiles, validate_profiles
    from .engines.readiness import check_target, check_trt_readiness
    from .exporter.foreign import spec_of_file

    # Cheap checks first: nothing is converted or built for a bad option.
    spec = spec_of_file(model)
    engine = check_output_path(output, force=force)
    if hardware_compat not in HARDWARE_COMPAT:
        raise UsageError(f"--hardware-compat must be one of {', '.join(HARDWARE_COMPAT)} (got {hardware_compat!r})")
    if not 0 <= opt_level <= 5:
        raise UsageError(f"--opt-level must be 0..5 (got {opt_level})")
    if workspace is not None and workspace <= 0:
        raise UsageError(f"--workspace must be a positive number of MiB (got {workspace})")
    check_target(target)
    profiles = parse_profiles(mins or [], opts or [], maxs or []) or [default_profile(spec)]
    for w in validate_profiles(profiles, spec):
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    build_from = model
    if fp16 and spec.precision == "fp32":
        fp16_path = fp16_onnx or engine.with_name(engine.stem + ".fp16.onnx")
        check_output_path(fp16_path, force=force)
        result = _run_fp16(model, fp16_path, threshold=threshold, calibration_shapes=calibration_shapes, force=force,
                           input_shapes=input_shapes,
                           reference_model=_reference_options(preset, config, ref_model, model_kwargs, checkpoint,
                                                              checkpoint_key, allow_checkpoint_mismatch, trust_artifact),
                           max_memory=max_memory)
        _print_fp16(result)
        build_from = result.path
    elif fp16:
        console.print(f"{model} is already {spec.precision}; building from it as is", highlight=False)
    else:
        console.print("[yellow]note:[/] no --fp16: the engine keeps the ONNX's FP32 types (strongly typed build)", highlight=False)
    readiness = check_trt_readiness(build_from, target, profiles, fp16=fp16)
    _print_readiness(readiness)
    readiness.raise_for_errors()
    from .engines.trt_build import build_engine

    built = build_engine(build_from, engine, profiles, workspace=workspace * (1 << 20) if workspace else None,
                         opt_level=opt_level, timing_cache=timing_cache,
                         hardware_compatibility=HARDWARE_COMPAT[hardware_compat], force=force,
                         progress=err_console.is_terminal)
    console.print(f"engine written to {built.engine_path} ({_human_size(built.size_bytes)}, TensorRT {built.tensorrt_version}, "
                  f"{built.gpu.name}) with sidecar {built.sidecar_path} in {built.seconds:.1f} s", highlight=False)
    fusion = getattr(built.fusion, "summary", None)
    if fusion:
        console.print(f"fused attention: {fusion}", highlight=False)
    for w in built.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------------------------------
def main() -> None:
    """Console entry point: run the app, turning library errors into one line and an exit code."""
    # SIGTERM unwinds like Ctrl-C, so every temporary output is removed on the way out.
    # SIGINT is set too: a parent that ignores it (a CI runner, nohup) would pass that on to us.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        app()
    except AttnExportError as exc:
        _print_error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        err_console.print("interrupted; no partial output was left behind")
        sys.exit(143 if isinstance(exc, Terminated) else 130)
    except Exception as exc:  # noqa: BLE001 - last resort: keep the one-line promise
        if os.environ.get("ATTN_EXPORT_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _print_error(f"{type(exc).__name__}: {first} (set ATTN_EXPORT_DEBUG=1 for the traceback)", "internal error:")
        sys.exit(1)


if __name__ == "__main__":
    main()
