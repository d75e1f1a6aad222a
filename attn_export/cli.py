"""The `attn-export` command line. Thin: parse options, call one library function, render its result.

Option groups shared by several commands (reference model, shapes, FP16,
engine build, report) are declared once in :mod:`.cli_args`; how a command
runs (errors, exit codes, signals, progress) is :mod:`.cli_support`; what each
result looks like is :mod:`.render`; what each command does is the library.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from . import render
from .cli_args import (ATTENTION, BACKEND, BUILD, FORCE, FP16, SERVING_ATTENTION, THREADS, TUNE, REFERENCE, REPORT, SHAPES, SUPPORTED_TRT, TRAJECTORY, BackendArgs, BuildArgs,
                       Fp16Args, Group, ShapeArgs, TrajectoryArgs, calibration, command_with, json_object, parse_hw,
                       renamed, triton_form)
from .cli_support import PathOrder, print_version, progress, reporter, run_app, write_report
from .errors import UsageError
from .render import console
from .spec import ReferenceOptions

__all__ = ["app", "console", "main", "SUPPORTED_TRT"]

app = typer.Typer(
    name="attn-export", cls=PathOrder, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode="rich", help=(
        "Take a diffusion UNet with self-attention from PyTorch to ONNX and TensorRT.\n\n"
        "Typical path:  attn-export onnx --preset ddpm-cifar10 -o unet.onnx  ->  "
        "attn-export verify unet.onnx  ->  attn-export trt unet.onnx --fp16 -o unet.plan"))


def command(name: str, *groups: Group, **settings: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command taking ``groups``; library errors become one line and an exit code."""
    return command_with(app, name, *groups, **settings)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True, metavar="",
                                       help="Print the version and exit.")) -> None:
    """Diffusion UNets with self-attention, from PyTorch to ONNX and TensorRT."""


# ---------------------------------------------------------------------------------------------------------------------
@command("onnx", help=(
    "Export a UNet to ONNX with dynamic batch, height and width.\n\n"
    "Examples:\n\n"
    "  attn-export onnx --preset ddpm-cifar10 -o unet.onnx\n\n"
    "  attn-export onnx --config unet.json --checkpoint ema.safetensors -o unet.onnx\n\n"
    "  attn-export onnx --model mypkg.unet:build --model-kwargs '{\"ch\": 64}' --checkpoint ckpt.pt -o unet.onnx\n\n"
    "The model description (config, seed, checkpoint sha256, inputs, valid H/W multiple) is stored in the file, so "
    "inspect and trt (without --fp16) need nothing more. Commands that run the PyTorch reference (verify, fp16, "
    "trt --fp16) rebuild it from that description: a preset or config with no checkpoint needs nothing more; a "
    "checkpoint export needs the checkpoint named again (--checkpoint FILE, checked against the recorded sha256); "
    "an imported model needs --model again, or --trust-artifact."))
def onnx_cmd(
    output: Path = typer.Option(..., "-o", "--output", help="ONNX file to write (written atomically)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Built-in model: tiny, ddpm-cifar10 or ddpm-256."),
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
    attention: str = ATTENTION,
    opset: int = typer.Option(23, "--opset", help="ONNX opset. 23 is the first with the Attention op; TensorRT 10.14+/11 and ONNX Runtime >= 1.23 read it."),
    force: bool = FORCE,
    check: bool = typer.Option(True, "--check/--no-check", help="Compare with PyTorch in ONNX Runtime at an unseen shape before writing."),
    allow_unfused: bool = typer.Option(False, "--allow-unfused", help="Write the file even when an attention site cannot be rewritten into the --attention form, and list each such site (default: exit 1 naming it)."),
    exporter: str = typer.Option("auto", "--exporter", help="auto (PyTorch's TorchScript tracer, and its torch.export-based dynamo exporter where the tracer fails), torchscript or dynamo; the one used is recorded in the file."),
) -> None:
    from .exporter.onnx_export import export_onnx
    from .models.loader import ModelSource, parse_extra_inputs

    if preset is None and config is None and model is None:
        raise UsageError("name the model to export: --preset tiny|ddpm-cifar10|ddpm-256, --config FILE.json or "
                         "--model package.module:factory")
    overrides: dict[str, Any] = {}
    if norm is not None:
        overrides["norm"] = None if norm.lower() in ("none", "null") else norm
    if num_classes is not None and model is None:
        overrides["num_classes"] = num_classes
    extras, extra_axes = parse_extra_inputs(extra_input or [])
    source = ModelSource(
        preset=preset, config=config, model=model, model_kwargs=json_object(model_kwargs, "--model-kwargs"),
        checkpoint=checkpoint, checkpoint_key=checkpoint_key, seed=seed, overrides=overrides,
        num_classes=num_classes if model is not None else None, hw_multiple=hw_multiple,
        static_hw=parse_hw(static_hw, "--static-hw"),
        extra_inputs=extras, extra_axes=extra_axes)
    with progress() as prog:
        result = export_onnx(source, output, attention=attention, opset=opset, force=force, check=check,
                             allow_unfused=allow_unfused, exporter=exporter, progress=reporter(prog, "export: "))
    render.export_summary(result)


# ---------------------------------------------------------------------------------------------------------------------
@command("optimize", SHAPES, help=(
    "Rewrite an ONNX file (ours or exported elsewhere) for the runtime that will serve it.\n\n"
    "--for tensorrt (default): every attention site the analysis finds (Einsum or MatMul forms, scale anywhere, "
    "FP16 with Casts, ...) becomes one ONNX Attention node (--attention op, opset raised to 23) or the canonical "
    "Mul(q, scale) -> MatMul -> Softmax -> MatMul (--attention decomposed).\n\n"
    "--for onnxruntime: ONNX Runtime's serving form, tuned to this CPU: attention as its MultiHeadAttention or in "
    "query chunks, 3x3 convolutions as Winograd. The file records what it holds; runners run it as written; "
    "TensorRT does not read it.\n\n"
    "The result is compared with the input in ONNX Runtime before it is written; external data is kept.\n\n"
    "Examples:\n\n"
    "  attn-export optimize unet.onnx -o unet.opt.onnx --shapes noisy:1x1x128x128,sigma:1\n\n"
    "  attn-export optimize unet.onnx --for onnxruntime -o unet.serving.onnx\n\n"
    "Exit status: 0 written, 1 a site could not be rewritten or the check failed (nothing written), 2 bad input."))
def optimize_cmd(
    model: Path = typer.Argument(..., help="ONNX file to optimize."),
    output: Path = typer.Option(..., "-o", "--output", help="ONNX file to write (atomically)."),
    target: str = typer.Option("tensorrt", "--for", help="tensorrt (the form TensorRT fuses) or onnxruntime (ONNX Runtime's serving form)."),
    attention: str = ATTENTION,
    provider: str = typer.Option("cpu", "--provider", help="--for onnxruntime: the provider the form is built for, cpu or cuda."),
    serving_attention: str = SERVING_ATTENTION,
    allow_unfused: bool = typer.Option(False, "--allow-unfused", help="Write the file even when a site cannot be rewritten, listing it."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare with the input in ONNX Runtime before writing."),
    force: bool = FORCE, tune: bool = TUNE, threads: Optional[int] = THREADS,
    shape_args: ShapeArgs = None,  # type: ignore[assignment]
) -> None:
    from .pipeline import optimize_artifact

    if shape_args.max_memory is not None:
        raise UsageError("--max-memory does not apply to optimize (its check runs at the shapes given)")
    with progress() as prog:
        r = optimize_artifact(model, output, attention=attention, target=target, provider=provider, tune=tune,
                              threads=threads, serving_attention=serving_attention, force=force,
                              allow_unfused=allow_unfused, input_shapes=shape_args.input_shapes,
                              shapes=shape_args.shapes,
                              input_ranges=shape_args.input_ranges, check=check, progress=reporter(prog, "optimize: "))
    render.optimize(r)


# ---------------------------------------------------------------------------------------------------------------------
@command("fp16", SHAPES, FP16, REFERENCE, REPORT, help=(
    "Convert an exported FP32 ONNX file to FP16, keeping FP32 islands where FP16 is unsafe.\n\n"
    "An FP16 range audit runs the model in ONNX Runtime on realistic inputs at several shapes and measures every "
    "activation and attention logit. Normalization layers, the sinusoidal time embedding and every node whose "
    "inputs or outputs exceed --threshold stay FP32; the rest (attention Q/K/V included) becomes FP16. The result is "
    "compared with PyTorch and run through an FP16 overflow emulation before it is written.\n\n"
    "Examples:\n\n"
    "  attn-export fp16 unet.onnx -o unet.fp16.onnx\n\n"
    "  attn-export fp16 unet.onnx -o unet.fp16.onnx --calibration-shapes 1x32x32,2x64x48 --threshold 8192\n\n"
    "Exit status: 0 written, 1 the FP16 model failed its checks (nothing written), 2 bad usage or input."))
def fp16_cmd(
    model: Path = typer.Argument(..., help="FP32 ONNX file (exported by `attn-export onnx`, or from elsewhere with --shapes)."),
    output: Path = typer.Option(..., "-o", "--output", help="FP16 ONNX file to write (atomically)."),
    keep_io_types: bool = typer.Option(True, "--keep-io-types/--no-keep-io-types", help="Keep FP32 inputs and outputs, or make them FP16."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare with PyTorch and run the FP16 overflow emulation before writing."),
    force: bool = FORCE,
    shape_args: ShapeArgs = None,  # type: ignore[assignment]
    fp16_args: Fp16Args = None,  # type: ignore[assignment]
    reference_model: ReferenceOptions = None,  # type: ignore[assignment]
    report: Optional[Path] = None,
) -> None:
    from .pipeline import convert_fp16

    shapes, sets = calibration(fp16_args, shape_args)
    with progress("bar") as prog:
        result = convert_fp16(
            model, output, keep_io_types=keep_io_types, threshold=fp16_args.threshold, calibration_shapes=shapes,
            extra_fp32_ops=fp16_args.fp32_ops, extra_fp32_nodes=fp16_args.fp32_nodes,
            force=force, check=check, input_shapes=sets,
            input_ranges=shape_args.input_ranges, reference_model=reference_model, max_memory=shape_args.max_memory,
            progress=reporter(prog, "fp16: "))
    render.fp16(result)
    write_report(report, result.to_dict())


# ---------------------------------------------------------------------------------------------------------------------
@command("trt", BUILD, FP16, SHAPES, REFERENCE, help=(
    "Build a TensorRT engine (plus its .json sidecar) from an exported ONNX file.\n\n"
    "With --fp16 the FP32 ONNX is first converted to FP16 (see `attn-export fp16`; saved as <engine stem>.fp16.onnx, "
    "or <engine>.fp16.onnx where a file of yours has that name, or --fp16-onnx; an FP16 file there made from the same "
    "source with the same settings is reused) and the engine is built strongly typed from it: TensorRT 11 has no "
    "FP16 builder flag.\n\n"
    "Examples:\n\n"
    "  attn-export trt unet.onnx --fp16 -o unet.plan\n\n"
    "  attn-export trt unet.onnx --fp16 -o unet.plan --min 1x32x32 --opt 4x64x64 --max 8x128x128 --timing-cache tc.bin\n\n"
    "Profiles are validated before the conversion and the build. --runtime tensorrt (default) needs TensorRT and an "
    "NVIDIA GPU for the build; --runtime rtx builds a TensorRT-RTX engine on any machine, GPU or not, for the "
    "--compute-capability targets (exit 2 with the missing piece named otherwise). The fused-attention report comes "
    "from the engine inspector, or from the builder's layer log where no GPU can load the engine.\n\n"
    f"Supported TensorRT: {SUPPORTED_TRT}; its Python API is checked on CPU against the real bindings of those "
    "releases. TensorRT-RTX engines are built in the test suite on CPU; running any engine needs a GPU "
    "(`make test-gpu`), which this project's own machines have not had yet."))
def trt_cmd(
    model: Path = typer.Argument(..., help="ONNX file exported by `attn-export onnx` (FP32, or FP16 from `attn-export fp16`)."),
    output: Path = typer.Option(..., "-o", "--output", help="Engine file to write (.plan), with its sidecar <engine>.json."),
    fp16: bool = typer.Option(False, "--fp16", help="Convert to FP16 ONNX first (FP32 islands from the range audit)."),
    fp16_onnx: Optional[Path] = typer.Option(None, "--fp16-onnx", help="Where to save the FP16 ONNX (default: <engine stem>.fp16.onnx next to the engine)."),
    force: bool = typer.Option(False, "--force", help="Replace existing output files (engine, sidecar, FP16 ONNX)."),
    build_args: BuildArgs = None,  # type: ignore[assignment]
    fp16_args: Fp16Args = None,  # type: ignore[assignment]
    shape_args: ShapeArgs = None,  # type: ignore[assignment]
    reference_model: ReferenceOptions = None,  # type: ignore[assignment]
) -> None:
    from .pipeline import build_engine

    shapes, sets = calibration(fp16_args, shape_args)
    with progress("steps") as prog:
        result = build_engine(
            model, output, fp16=fp16, fp16_onnx=fp16_onnx, threshold=fp16_args.threshold, calibration_shapes=shapes,
            input_shapes=sets, extra_fp32_ops=fp16_args.fp32_ops, extra_fp32_nodes=fp16_args.fp32_nodes,
            input_ranges=shape_args.input_ranges, max_memory=shape_args.max_memory, reference_model=reference_model, force=force, progress=reporter(prog), on_stage=render.engine_stage,
            **build_args.kwargs)
    render.engine_built(result)


# ---------------------------------------------------------------------------------------------------------------------
@command("verify", SHAPES, REFERENCE, TRAJECTORY, REPORT, BACKEND, help=(
    "Compare an artifact with the PyTorch model it was exported from, over a sweep of shapes.\n\n"
    "ARTIFACT is an ONNX file (run in ONNX Runtime, exactly as written unless --form serving) or a TensorRT engine "
    "(.plan/.engine with its .json sidecar). The reference model, seed and checkpoint come from the artifact; a "
    "checkpoint whose sha256 changed is refused.\n\n"
    "Pass rule (Polygraphy's): a value fails only when it exceeds both --atol and --rtol under --stat; "
    "NaN/Inf in the candidate where PyTorch is finite always fails. Defaults: fp32 atol 1e-4 rtol 1e-3 elemwise; "
    "fp16 atol 1e-2 rtol 1e-2 mean (NVIDIA's guidance).\n\n"
    "Examples:\n\n"
    "  attn-export verify unet.onnx\n\n"
    "  attn-export verify unet.onnx --shapes 2x64x96,1x128x128 --report verify.json\n\n"
    "  attn-export verify unet.plan --stat quantile --quantile 0.99\n\n"
    "  attn-export verify foreign.fp16.onnx --reference foreign.onnx --shapes noisy:1x1x128x128,sigma:1\n\n"
    "  attn-export verify unet.fp16.onnx --trajectory 50 --images grid.png   (whole DDIM runs; docs/trajectory.md)\n\n"
    "Exit status: 0 all shapes pass, 1 a comparison failed, 2 bad usage or input."))
def verify_cmd(
    artifact: Path = typer.Argument(..., help="ONNX file or TensorRT engine (.plan/.engine, with its sidecar)."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance (default by precision: fp32 1e-4, fp16 1e-2)."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance (default by precision: fp32 1e-3, fp16 1e-2)."),
    stat: Optional[str] = typer.Option(None, "--stat", help="Error statistic: elemwise, max, mean, median or quantile (default: fp32 elemwise, fp16 mean)."),
    quantile: float = typer.Option(0.99, "--quantile", help="Quantile level for --stat quantile."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random inputs."),
    provider: Optional[str] = typer.Option(None, "--provider", help="ONNX Runtime execution provider: cpu (default), cuda or tensorrt; one it cannot create is exit 2."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Compare against this ONNX file in ONNX Runtime instead of PyTorch (needed for files this tool did not export)."),
    form: str = typer.Option("written", "--form", help="ONNX files: written runs the file exactly as written, the graph TensorRT reads; serving runs ONNX Runtime's serving form built from it in memory."),
    localize: bool = typer.Option(False, "--localize", help="On a failure, find the first node whose output diverges beyond the tolerances (what marking every layer and reducing the model do in Polygraphy, in one step) and the fix to try."),
    save_inputs: Optional[Path] = typer.Option(None, "--save-inputs", help="Write the inputs of the first failing shape (else the first shape) to this .npz."),
    load_inputs: Optional[Path] = typer.Option(None, "--load-inputs", help="Verify on these inputs (.npz, one array per model input, e.g. your real data) instead of the seeded sweep."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --save-inputs or --images file."),
    shape_args: ShapeArgs = None,  # type: ignore[assignment]
    reference_model: ReferenceOptions = None,  # type: ignore[assignment]
    trajectory_args: TrajectoryArgs = None,  # type: ignore[assignment]
    report: Optional[Path] = None,
    backend_args: BackendArgs = None,  # type: ignore[assignment]
) -> None:
    from .pipeline import verify_artifact

    with progress("bar") as prog:
        outcome = verify_artifact(
            artifact, localize=localize, save_inputs=save_inputs, load_inputs=load_inputs, force=force,
            shapes=shape_args.shapes, atol=atol, rtol=rtol, stat=stat, quantile=quantile, seed=seed,
            reference_model=reference_model, providers=[provider] if provider else None, progress=reporter(prog),
            reference=reference, input_shapes=shape_args.input_shapes, input_ranges=shape_args.input_ranges,
            max_memory=shape_args.max_memory, form=form, trajectory=trajectory_args.settings, **backend_args.kwargs)
    render.verify_outcome(outcome)
    write_report(report, outcome.to_dict())
    if not outcome.passed:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------------------------------
@command("inspect", help=(
    "Show what is inside an ONNX file or a TensorRT engine.\n\n"
    "ONNX: inputs/outputs and their dims, opset, size, the embedded model description, op types, the attention "
    "blocks (form, scale placement, sequence length, head size, whether TensorRT can fuse them) and the FP16/FP32 share. "
    "Engine: its sidecar (profiles, precision, TensorRT version, GPU, I/O) and the fused-attention report.\n\n"
    "Examples:\n\n"
    "  attn-export inspect unet.onnx\n\n"
    "  attn-export inspect unet.onnx --trt --target 10.14\n\n"
    "  attn-export inspect unet.plan --json"))
def inspect_cmd(
    artifact: Path = typer.Argument(..., help="ONNX file or TensorRT engine (.plan/.engine, with its sidecar)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON to stdout, and nothing else."),
    trt: bool = typer.Option(False, "--trt", help="ONNX only: check TensorRT readiness (ops, attention fusion, dims); exit 1 on errors. `attn-export trt` builds the engine and reports real fusion."),
    target: str = typer.Option("10.14", "--target", help="TensorRT version for --trt (not used with --runtime rtx)."),
    runtime: str = typer.Option("tensorrt", "--runtime", help="The readiness rules of tensorrt or rtx (TensorRT for RTX)."),
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
@command("bench", SHAPES, REFERENCE, REPORT, help=(
    "Measure latency, throughput and memory of an artifact on several backends.\n\n"
    "Examples:\n\n"
    "  attn-export bench unet.onnx --shapes 1x32x32,8x32x32 --iterations 20\n\n"
    "  attn-export bench unet.onnx --backend pytorch-sdpa,onnxruntime,onnxruntime-serving --time-budget 10\n\n"
    "  attn-export bench unet.plan --backend pytorch,tensorrt --provider cuda\n\n"
    "Reports median and p10-p90 latency (with a warning when calls vary a lot), images/s, each backend's total peak "
    "memory (a process per backend and shape) and its growth during the calls, and the ratio to the fastest PyTorch eager "
    "formulation measured in the same run. It never decides pass or fail."))
def bench_cmd(
    artifact: Path = typer.Argument(..., help="ONNX file, or TensorRT engine (.plan/.engine with its .json sidecar)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Comma-separated: pytorch, pytorch-sdpa, pytorch-decomposed, pytorch-reference, pytorch-fp16 (CUDA only), onnxruntime (the file as written), onnxruntime-serving (its serving form, built in memory), tensorrt, openvino-f32, openvino-bf16, openvino-f16 (OpenVINO's CPU plugin at that precision; openvino names the f32 and bf16 rows, plus pytorch-bf16 where the CPU has bf16 units), pytorch-bf16 (PyTorch eager under bf16 autocast, CPU) (default: PyTorch and every backend that serves the artifact here: TensorRT for an engine; both ONNX Runtime forms for an ONNX file, and OpenVINO's rows on the CPU where it is installed)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed calls before timing."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Timed calls per backend and shape (default 10)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Instead of --iterations: time calls for this many seconds (at least one call)."),
    threads: Optional[int] = THREADS,
    provider: str = typer.Option("cpu", "--provider", help="ONNX Runtime provider: cpu, cuda or tensorrt. cuda/tensorrt also put the PyTorch reference on the GPU."),
    attention_impl: str = typer.Option("sdpa", "--attention-impl", help="Attention formulation of the 'pytorch' backend: sdpa, reference (the seed article's) or decomposed."),
    graph_optimization: str = typer.Option("all", "--graph-optimization", help="ONNX Runtime graph optimization level: disable, basic, extended, all."),
    isolate: bool = typer.Option(True, "--isolate/--no-isolate", help="Run each backend in a process of its own, so its total peak memory is its own."),
    tune: bool = typer.Option(False, "--tune", help="onnxruntime-serving runs, at each shape, the form measured fastest there: the file as written or its rewrites (see optimize --tune)."),
    sessions: int = typer.Option(1, "--sessions", help="Measure each backend and shape in this many fresh processes, in rounds of alternating order; the median is the sessions' median (one session can run 40 % slower than the next on a shared machine)."),
    old_json: Optional[Path] = typer.Option(None, "--json", hidden=True, help="Old spelling of --report."),
    shape_args: ShapeArgs = None,  # type: ignore[assignment]
    reference_model: ReferenceOptions = None,  # type: ignore[assignment]
    report: Optional[Path] = None,
) -> None:
    from .bench import parse_backends, run_bench, write_json

    json_out = renamed(old_json, "--json", report, "--report", None)
    with progress() as prog:
        result = run_bench(
            artifact, backends=parse_backends(backend) if backend else None, shapes=shape_args.images("bench"), warmup=warmup,
            iterations=iterations, time_budget=time_budget, threads=threads, provider=provider.lower(),
            attention_impl=attention_impl, graph_optimization=graph_optimization, progress=reporter(prog, "bench: "),
            reference_model=reference_model, max_memory=shape_args.max_memory, isolate=isolate,
            input_ranges=shape_args.input_ranges, tune=tune, sessions=sessions)
    render.bench(result)
    if json_out is not None:
        write_json(result, json_out)
        render.written("wrote", json_out)


# ---------------------------------------------------------------------------------------------------------------------
@command("triton", BACKEND, help=(
    "Write a Triton Inference Server model repository entry for an ONNX file or a TensorRT engine.\n\n"
    "Examples:\n\n"
    "  attn-export triton unet.plan --repo models --name ddpm --instances 2\n\n"
    "  attn-export triton unet.onnx --repo models --kind cpu --max-batch 16 --form serving\n\n"
    "Writes REPO/NAME/config.pbtxt and REPO/NAME/VERSION/model.plan (platform tensorrt_plan) or model.onnx "
    "(platform onnxruntime_onnx, external data copied alongside), readable by a server running as another user; "
    "the config is checked with tritonclient's ModelConfig."))
def triton_cmd(
    artifact: Path = typer.Argument(..., help="ONNX file, or TensorRT engine with its .json sidecar."),
    repo: Path = typer.Option(..., "--repo", help="Model repository folder (created if missing)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name (default: the artifact's file stem)."),
    model_version: Optional[int] = typer.Option(None, "--model-version", help="Version folder to put the model file in (default 1)."),
    old_version: Optional[int] = typer.Option(None, "--version", hidden=True, help="Old spelling of --model-version."),
    instances: int = typer.Option(1, "--instances", help="Model instances (instance_group count)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="gpu or cpu (default: gpu for engines, cpu for ONNX)."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="max_batch_size (default: the engine profile's max batch; 8 for ONNX). 0 disables batching."),
    force: bool = typer.Option(False, "--force", help="Replace an existing model folder."),
    form: Optional[str] = typer.Option(None, "--form", help="ONNX files: written (default) copies the file as it is; serving writes ONNX Runtime's serving form of it for the --kind of instances."),
    serving_attention: str = SERVING_ATTENTION,
    old_attention: Optional[str] = typer.Option(None, "--attention", hidden=True, help="Old spelling of --form serving / --serving-attention."),
    backend_args: BackendArgs = None,  # type: ignore[assignment]
) -> None:
    from .triton import write_model_repository

    version = renamed(old_version, "--version", model_version, "--model-version", 1)
    form, serving_attention = triton_form(old_attention, form, serving_attention)
    render.triton(write_model_repository(artifact, repo, name=name, version=version, instances=instances, kind=kind,
                                         max_batch=max_batch, force=force, form=form, serving_attention=serving_attention,
                                         **backend_args.kwargs))


def main() -> None:
    """Console entry point: run the app, turning library errors into one line and an exit code."""
    run_app(app)


if __name__ == "__main__":
    main()
