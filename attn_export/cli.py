"""The `attn-export` command line. Thin: parse options, call one library function, render its result.

What each result looks like is in :mod:`.render`; what each command does is
in the library (:mod:`.pipeline` for fp16 and trt).

Errors from the library (AttnExportError) become one line on stderr and the
error's exit code (2 for bad input, 1 for a failed check); no tracebacks
unless ATTN_EXPORT_DEBUG=1.
"""

from __future__ import annotations

import functools
import json
import re
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer

from . import render
from .errors import AttnExportError, Terminated, UsageError
from .progress import ProgressFn
from .render import console, err_console

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


def _version(value: bool) -> None:
    if value:
        from .version import __version__

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
    from .atomic import defer_signal

    _SIGNALS.append(signum)
    if defer_signal(signum):  # inside a critical section: raised when it ends
        return
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


def _bar():  # noqa: ANN202 - rich Progress
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return _progress_type()(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=err_console, transient=True, disable=not err_console.is_terminal)


def _reporter(prog: Any, prefix: str = "") -> ProgressFn:
    """The library's progress callback drawn as one task of a rich Progress (the library draws nothing)."""
    task = prog.add_task(prefix or "working", total=None)

    def report(text: str, done: Optional[int] = None, total: Optional[int] = None, /) -> None:
        prog.update(task, description=f"{prefix}{text}", completed=done, total=total)

    return report






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
RUNTIME = typer.Option("tensorrt", "--runtime", help="tensorrt (NVIDIA TensorRT; building needs a GPU) or rtx (TensorRT for RTX; builds on a CPU, runs on RTX-class GPUs).")
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


# The FP16 options of `fp16` and `trt --fp16`, and the JSON report of `fp16` and `verify`.
FP16_THRESHOLD = typer.Option(4096.0, "--threshold", help=(
    "Activation absmax above which nodes stay FP32 (FP16 max is 65504; trt: with --fp16)."))
FP16_CALIBRATION = typer.Option(None, "--calibration-shapes", help=(
    "Comma-separated BxHxW shapes for the FP16 range audit (default: derived from the model; trt: with --fp16)."))
REPORT = typer.Option(None, "--report", help="Also write the full result as JSON to this file (atomically).")

_T = TypeVar("_T")


def _renamed(old: _T | None, old_name: str, new: _T | None, new_name: str, default: _T) -> _T:
    """An option's value under its new name or, with a deprecation line, its old one (kept for one release)."""
    if old is not None:
        if new is not None:
            raise UsageError(f"give {new_name} only ({old_name} is its old spelling)")
        err_console.print(f"[yellow]deprecated:[/] {old_name} is now {new_name}; the old spelling goes in the next "
                          "release", highlight=False)
        return old
    return default if new is None else new


def _check_report_path(report: Optional[Path]) -> None:
    """Refuse an unwritable --report before any work starts."""
    if report is not None and (not report.parent.exists() or report.is_dir()):
        raise UsageError(f"cannot write the report to {report}: " + ("it is a folder" if report.is_dir() else f"folder {report.parent} does not exist"))


def _static_hw(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--static-hw must be HEIGHTxWIDTH such as 32x32 (got {text!r})")
    return int(m.group(1)), int(m.group(2))


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
    extra_input: Optional[list[str]] = typer.Option(None, "--extra-input", help="NAME:DTYPE:DIMS, repeatable: another input of an imported model's forward, passed by keyword (DIMS comma-separated: batch, a size, or a dynamic axis with its size, seq=77 or seq=1-77-154 for min-opt-max), e.g. encoder_hidden_states:float32:batch,77,768."),
    static_hw: Optional[str] = typer.Option(None, "--static-hw", help="HEIGHTxWIDTH for a model that serves one size: H and W are static in the file (batch stays dynamic), and verify, fp16, profiles and Triton follow."),
    attention: str = typer.Option("op", "--attention", help="op: one ONNX Attention node per block (opset>=23, TensorRT>=10.14). decomposed: Mul(q,scale), MatMul, Softmax, MatMul (any TensorRT 10.x)."),
    opset: int = typer.Option(23, "--opset", help="ONNX opset. 23 is the first with the Attention op; TensorRT 10.14+/11 and ONNX Runtime >= 1.23 read it."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare with PyTorch in ONNX Runtime at an unseen shape before writing."),
    allow_unfused: bool = typer.Option(False, "--allow-unfused", help="Write the file even when an attention site cannot be rewritten into the --attention form, and list each such site (default: exit 1 naming it)."),
    exporter: str = typer.Option("auto", "--exporter", help="auto (default: PyTorch's TorchScript tracer, and its torch.export-based dynamo exporter where the tracer fails), torchscript or dynamo; the one used is recorded in the file."),
) -> None:
    from .exporter.onnx_export import export_onnx
    from .models.loader import ModelSource, parse_extra_inputs

    overrides: dict[str, Any] = {}
    if norm is not None:
        overrides["norm"] = None if norm.lower() in ("none", "null") else norm
    if num_classes is not None and model is None:
        overrides["num_classes"] = num_classes
    extras, extra_axes = parse_extra_inputs(extra_input or [])
    source = ModelSource(
        preset=preset, config=config, model=model, model_kwargs=_json_option(model_kwargs, "--model-kwargs"),
        checkpoint=checkpoint, checkpoint_key=checkpoint_key, seed=seed, overrides=overrides,
        num_classes=num_classes if model is not None else None, hw_multiple=hw_multiple,
        static_hw=_static_hw(static_hw), extra_inputs=extras, extra_axes=extra_axes,
    )
    with _spinner("exporting") as prog:
        result = export_onnx(source, output, attention=attention, opset=opset, force=force, check=check,
                             allow_unfused=allow_unfused, exporter=exporter, progress=_reporter(prog, "export: "))
    render.export_summary(result)




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
    from .exporter.foreign import parse_input_ranges
    from .exporter.optimize import optimize_onnx

    with _spinner("optimize") as prog:
        r = optimize_onnx(model, output, attention=attention, force=force, allow_unfused=allow_unfused,
                          input_shapes=input_shapes or None, input_ranges=parse_input_ranges(input_range), check=check,
                          progress=_reporter(prog, "optimize: "))
    render.optimize(r)


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
    backend: Optional[str] = typer.Option(None, "--backend", help="Comma-separated: pytorch, pytorch-sdpa, pytorch-decomposed, pytorch-fp16 (CUDA only), onnxruntime, tensorrt (default: pytorch and the artifact's own backend)."),
    shapes: Optional[str] = typer.Option(None, "--shapes", help="Comma-separated BxHxW, e.g. 1x32x32,4x64x64 (default: batch 1 at the export size)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed calls before timing."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Timed calls per backend and shape (default 10)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Instead of --iterations: time calls for this many seconds (at least one call)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads for PyTorch and ONNX Runtime (default: each library's own)."),
    provider: str = typer.Option("cpu", "--provider", help="ONNX Runtime provider: cpu, cuda or tensorrt. cuda/tensorrt also put the PyTorch reference on the GPU."),
    attention_impl: str = typer.Option("reference", "--attention-impl", help="Attention formulation of the 'pytorch' backend: reference, sdpa or decomposed."),
    graph_optimization: str = typer.Option("all", "--graph-optimization", help="ONNX Runtime graph optimization level: disable, basic, extended, all."),
    report_path: Optional[Path] = REPORT,
    old_json: Optional[Path] = typer.Option(None, "--json", hidden=True, help="Deprecated spelling of --report."),
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
    json_out = _renamed(old_json, "--json", report_path, "--report", None)
    if json_out is not None and not json_out.parent.exists():
        raise UsageError(f"folder of --report does not exist: {json_out.parent}")
    with _spinner("benchmarking") as prog:
        report = run_bench(
            artifact, backends=parse_backends(backend) if backend else None,
            shapes=parse_shapes(shapes) if shapes else None, warmup=warmup, iterations=iterations,
            time_budget=time_budget, threads=threads, provider=provider.lower(), attention_impl=attention_impl,
            graph_optimization=graph_optimization, progress=_reporter(prog, "bench: "),
            reference_model=_reference_options(preset, config, model, model_kwargs, checkpoint, checkpoint_key,
                                               allow_checkpoint_mismatch, trust_artifact),
            max_memory=_max_memory(max_memory),
        )
    render.bench(report)
    if json_out is not None:
        write_json(report, json_out)
        render.written("wrote", json_out)




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
    model_version: Optional[int] = typer.Option(None, "--model-version", help="Version folder to put the model file in (default 1)."),
    old_version: Optional[int] = typer.Option(None, "--version", hidden=True, help="Deprecated spelling of --model-version."),
    instances: int = typer.Option(1, "--instances", help="Model instances (instance_group count)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="gpu or cpu (default: gpu for engines, cpu for ONNX)."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="max_batch_size (default: the engine profile's max batch; 8 for ONNX). 0 disables batching."),
    force: bool = typer.Option(False, "--force", help="Replace an existing model folder."),
    attention: str = typer.Option("onnxruntime", "--attention", help=(
        "ONNX files: onnxruntime (default) writes ONNX Runtime's serving form: attention as its MultiHeadAttention "
        "(flash attention) or, for CPU instances where that kernel's blocks would be thin (large head sizes), in "
        "query chunks, memory linear in the sequence either way; multiheadattention or chunked puts that form at "
        "every site; as-is copies the file unchanged.")),
) -> None:
    from .triton import write_model_repository

    version = _renamed(old_version, "--version", model_version, "--model-version", 1)
    render.triton(write_model_repository(artifact, repo, name=name, version=version, instances=instances, kind=kind,
                                         max_batch=max_batch, force=force, attention=attention))


# ---------------------------------------------------------------------------------------------------------------------
# attn-export verify
# ---------------------------------------------------------------------------------------------------------------------


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
    report: Optional[Path] = REPORT,
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
    form: str = typer.Option("written", "--form", help="ONNX files: written (default) runs the file exactly as written, the graph TensorRT reads; serving runs ONNX Runtime's serving form built from it in memory (MultiHeadAttention or query-chunked attention, Winograd convolutions), what bench and the Python runners use."),
) -> None:
    from .exporter.foreign import parse_input_ranges
    from .verify import verify

    _check_report_path(report)
    with _bar() as prog:
        result = verify(
            artifact, shapes=shapes, atol=atol, rtol=rtol, stat=stat, quantile=quantile, seed=seed,
            reference_model=_reference_options(preset, config, model, model_kwargs, checkpoint, checkpoint_key,
                                               allow_checkpoint_mismatch, trust_artifact),
            providers=[provider] if provider else None,
            progress=_reporter(prog),
            reference=reference, input_shapes=input_shapes or None, input_ranges=parse_input_ranges(input_range),
            max_memory=_max_memory(max_memory), form=form,
        )
    render.verify(result)
    if report is not None:
        from .atomic import write_text_atomic

        write_text_atomic(report, result.to_json() + "\n")
        render.written("report written to", report)
    if not result.passed:
        raise typer.Exit(1)




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
    target: str = typer.Option("10.14", "--target", help=f"TensorRT version for --trt: {TARGETS_HELP} (not used with --runtime rtx). --trt checks readiness only; `attn-export trt` builds the engine and reports real fusion."),
    runtime: str = RUNTIME,
) -> None:
    from .inspection import inspect_artifact, trt_readiness

    result = inspect_artifact(artifact)
    readiness = None
    if trt:
        if result.kind != "onnx":
            raise UsageError("--trt checks an ONNX file; an engine is already built")
        readiness = trt_readiness(artifact, target, runtime)
    if as_json:
        data = result.to_dict()
        if readiness is not None:
            data["trt_readiness"] = readiness.to_dict()
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        (render.inspect_engine if result.kind == "engine" else render.inspect_onnx)(result.to_dict())
        if readiness is not None:
            render.readiness(readiness)
    if readiness is not None and not readiness.ok:
        raise typer.Exit(1)








# ---------------------------------------------------------------------------------------------------------------------
# attn-export fp16 / attn-export trt
# ---------------------------------------------------------------------------------------------------------------------
def _fp16_progress():  # noqa: ANN202 - rich Progress
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    return _progress_type()(TextColumn("[progress.description]{task.description}"), BarColumn(), TimeElapsedColumn(),
                    console=err_console, transient=True, disable=not err_console.is_terminal)


def _calibration(text: Optional[str]) -> Any:
    from .spec import parse_shapes

    return parse_shapes(text) if text else None


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
    threshold: float = FP16_THRESHOLD,
    calibration_shapes: Optional[str] = FP16_CALIBRATION,
    fp32_op: Optional[list[str]] = typer.Option(None, "--fp32-op", help="Also keep every node of this op type in FP32 (repeatable)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare with PyTorch and run the FP16 overflow emulation before writing."),
    report: Optional[Path] = REPORT,
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
    from .exporter.foreign import parse_input_ranges
    from .pipeline import convert_fp16

    _check_report_path(report)
    reference_model = _reference_options(preset, config, ref_model, model_kwargs, checkpoint, checkpoint_key,
                                         allow_checkpoint_mismatch, trust_artifact)
    with _fp16_progress() as prog:
        result = convert_fp16(model, output, keep_io_types=keep_io_types, threshold=threshold,
                              calibration_shapes=_calibration(calibration_shapes), extra_fp32_ops=tuple(fp32_op or ()),
                              force=force, check=check, input_shapes=input_shapes or None,
                              input_ranges=parse_input_ranges(input_range), reference_model=reference_model,
                              max_memory=_max_memory(max_memory), progress=_reporter(prog, "fp16: "))
    render.fp16(result)
    if report is not None:
        from .atomic import write_text_atomic

        write_text_atomic(report, json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        render.written("report written to", report)


HARDWARE_COMPAT = {"none": "none", "ampere+": "ampere_plus", "same-cc": "same_compute_capability"}


@command("trt", help=(
    "Build a TensorRT engine (plus its .json sidecar) from an exported ONNX file.\n\n"
    "With --fp16 the FP32 ONNX is first converted to FP16 (see `attn-export fp16`; saved as <engine stem>.fp16.onnx "
    "or --fp16-onnx) and the engine is built strongly typed from it: TensorRT 11 has no FP16 builder flag.\n\n"
    "Examples:\n\n"
    "  attn-export trt unet.onnx --fp16 -o unet.plan\n\n"
    "  attn-export trt unet.onnx --fp16 -o unet.plan --min 1x32x32 --opt 4x64x64 --max 8x128x128 --timing-cache tc.bin\n\n"
    "Profiles are validated before the conversion and the build. --runtime tensorrt (default) needs TensorRT and an "
    "NVIDIA GPU for the build; --runtime rtx builds a TensorRT-RTX engine on any machine, GPU or not, for the "
    "--compute-capability targets (exit 2 with the missing piece named otherwise). The fused-attention report comes "
    "from the engine inspector, or from the builder's layer log where no GPU can load the engine.\n\n"
    f"Supported TensorRT: {SUPPORTED_TRT}; its Python API is checked on CPU against the real bindings of those "
    "releases. TensorRT-RTX engines are built in the test suite on CPU; running any engine needs a GPU "
    "(`make test-gpu`), which this project's own machines have not had yet."
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
    target: str = typer.Option("10.14", "--target", help=f"TensorRT version for the readiness check: {TARGETS_HELP} (not used with --runtime rtx)."),
    runtime: str = RUNTIME,
    compute_capability: Optional[list[str]] = typer.Option(None, "--compute-capability", help="TensorRT-RTX: a compute capability X.Y the engine must run on (repeat; default: its own, 8.0, 8.6, 8.9, 12.0)."),
    allow_unfused: bool = typer.Option(False, "--allow-unfused", help="Write the engine even when an attention site the readiness rules expect to fuse was not fused (default: exit 1, nothing written)."),
    threshold: float = FP16_THRESHOLD,
    calibration_shapes: Optional[str] = FP16_CALIBRATION,
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
    from .engines.profiles import parse_profiles
    from .pipeline import build_engine

    # The one option the library takes in its own terms; every other check is the library's, before any work.
    if hardware_compat not in HARDWARE_COMPAT:
        raise UsageError(f"--hardware-compat must be one of {', '.join(HARDWARE_COMPAT)} (got {hardware_compat!r})")
    with _build_progress() as prog:
        result = build_engine(
            model, output, parse_profiles(mins or [], opts or [], maxs or []) or None, fp16=fp16, fp16_onnx=fp16_onnx,
            target=target, threshold=threshold, calibration_shapes=_calibration(calibration_shapes),
            input_shapes=input_shapes or None, max_memory=_max_memory(max_memory),
            reference_model=_reference_options(preset, config, ref_model, model_kwargs, checkpoint, checkpoint_key,
                                               allow_checkpoint_mismatch, trust_artifact),
            workspace=workspace * (1 << 20) if workspace is not None else None, opt_level=opt_level, timing_cache=timing_cache,
            hardware_compatibility=HARDWARE_COMPAT[hardware_compat], runtime=runtime,
            compute_capabilities=compute_capability or None, allow_unfused=allow_unfused, force=force,
            progress=_reporter(prog), on_stage=render.engine_stage)
    render.engine_built(result)


def _build_progress():  # noqa: ANN202 - rich Progress
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    return _progress_type()(TextColumn("[progress.description]{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=err_console,
                            transient=True, disable=not err_console.is_terminal)


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
