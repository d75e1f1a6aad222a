"""PyTorch to ONNX: dynamic batch/height/width, attention in a form TensorRT fuses.

Pipeline: build the model (attention in its deployment form, scale on q),
trace it with the TorchScript exporter (a few seconds, where the dynamo
exporter takes close to a minute for ddpm-cifar10 on a small CPU), fold
constants and drop dead nodes, convert to the target opset, fuse each
MatMul/Softmax/MatMul chain into one ONNX ``Attention`` node when asked, infer
shapes, check, embed the model description, save atomically, and compare
the result with PyTorch in ONNX Runtime at a shape the trace never saw.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import gc
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import onnx
import onnx.external_data_helper
import torch

from ..atomic import check_output_path, staging_dir
from ..compare import Tolerances, compare_arrays, resolve_tolerances
from ..errors import CheckFailed, ExportFailed, UsageError
from ..graph import canonicalize_attention
from ..models.loader import LoadedModel, ModelSource, load_model, model_raised
from ..spec import ModelSpec
from . import passes, weights
from .metadata import embed_spec
from .weights import EXTERNAL_DATA_THRESHOLD

ATTENTION_FORMS = ("op", "decomposed")
DEFAULT_OPSET = 23
MIN_OPSET = 17
TORCHSCRIPT_MAX_OPSET = 20
# "torchscript": torch.onnx's TorchScript tracer (the default; PyTorch deprecates it). "dynamo": torch.export
# based, the exporter PyTorch keeps; slower to run, and its graph goes through the same passes and checks.
EXPORTERS = ("auto", "torchscript", "dynamo")
# "auto" tries them in this order: the TorchScript tracer is several times faster (docs/export.md), and the
# dynamo exporter takes what it cannot (autograd.Function wrappers, kernels computed at run time).
AUTO_ORDER = ("torchscript", "dynamo")
T = TypeVar("T")
# Protobuf cannot serialize a message of 2 GiB or more; stay clear of it.

ProgressFn = Callable[[str], None]


@dataclass
class ExportResult:
    """What an export produced, for the summary and for tests."""

    path: Path
    size_bytes: int
    opset: int
    attention: str
    attention_nodes: int
    inputs: list[tuple[str, str, list[int | str]]]
    outputs: list[tuple[str, str, list[int | str]]]
    num_parameters: int
    seconds: float
    external_data: Path | None
    spec: ModelSpec
    check: dict[str, Any] | None = None
    steps: dict[str, float] = field(default_factory=dict)
    unfused: list[dict[str, str]] = field(default_factory=list)  # attention sites left as they were (see allow_unfused)
    exporter: str = "torchscript"                 # the PyTorch exporter that wrote the graph
    fallback: str | None = None                   # why the first exporter of "auto" did not (its first line)


def _max_opset() -> int:
    return int(onnx.defs.onnx_opset_version())


def validate_export_options(attention: str, opset: int) -> None:
    """Reject bad --attention / --opset combinations before any work."""
    if attention not in ATTENTION_FORMS:
        raise UsageError(f"--attention must be one of {', '.join(ATTENTION_FORMS)} (got {attention!r})")
    top = _max_opset()
    if not MIN_OPSET <= opset <= top:
        raise UsageError(f"--opset must be between {MIN_OPSET} and {top} (got {opset})")
    if attention == "op" and opset < 23:
        raise UsageError(f"--attention op needs --opset 23 or later (the ONNX Attention op); got {opset}")


def example_shape(spec: ModelSpec) -> tuple[int, int, int]:
    """Trace shape: batch 2 and a non-square H/W, so no dynamic dim can be frozen at 1 or tied to another.

    A model with static H/W is traced at its size.
    """
    if spec.fixed_hw is not None:
        return 2, *spec.fixed_hw
    m = spec.hw_multiple
    return 2, 2 * m, 3 * m


def check_shape_for(spec: ModelSpec) -> tuple[int, int, int]:
    """A shape the trace never saw, for the post-export check (another batch, for a model with static H/W)."""
    if spec.fixed_hw is not None:
        return 3, *spec.fixed_hw
    m = spec.hw_multiple
    return 3, 4 * m, 2 * m


def _dynamic_axes(spec: ModelSpec) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for t in spec.inputs + spec.outputs:
        named = {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
        if named:
            axes[t.name] = named
    return axes


def _dynamic_shapes(module: torch.nn.Module, spec: ModelSpec) -> tuple[Any, ...]:
    """The named dynamic dims of each input, shaped like ``module.forward``'s positional parameters.

    PyTorch's own conversion from ``dynamic_axes`` assumes one parameter per
    input; a forward that takes the extra inputs as ``*rest`` needs them as one
    nested tuple.
    """
    axes = _dynamic_axes(spec)
    per_input = [axes.get(t.name) for t in spec.inputs]
    shaped: list[Any] = []
    for param in inspect.signature(module.forward).parameters.values():
        if param.kind == param.VAR_POSITIONAL:
            if len(per_input) > len(shaped):
                shaped.append(tuple(per_input[len(shaped):]))
            break
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) and len(shaped) < len(per_input):
            shaped.append(per_input[len(shaped)])
    return tuple(shaped)


def _torch_feeds(spec: ModelSpec, batch: int, h: int, w: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in spec.make_inputs(batch, h, w, seed=seed).items()}


def _export_kwargs(loaded: LoadedModel, opset: int) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    spec = loaded.spec
    b, h, w = example_shape(spec)
    feeds = _torch_feeds(spec, b, h, w)
    args = tuple(feeds[t.name] for t in spec.inputs)
    kwargs = dict(dynamo=False, opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
                  input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                  dynamic_axes=_dynamic_axes(spec), do_constant_folding=True)
    return args, kwargs


@contextlib.contextmanager
def _expected_trace_warnings() -> Iterator[None]:
    """Silence only the tracer warnings a trace of these models is expected to give.

    ``TracerWarning``: Python-side shape checks (``assert h % m == 0``, ``if x.shape[1] != c``) become
    constants in the trace; they are the model's input checks, and the dynamic dims are checked after
    export at a shape the trace never saw. Everything else, PyTorch's DeprecationWarning for this
    exporter included, goes to the caller's filters (``tests/test_export.py`` asserts it is raised).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _trace(loaded: LoadedModel, opset: int, workdir: Path) -> onnx.ModelProto:
    """The traced graph with its weights inside (TorchScript exporter)."""
    args, kwargs = _export_kwargs(loaded, opset)
    path = workdir / "traced.onnx"
    with _expected_trace_warnings(), torch.no_grad():
        torch.onnx.export(loaded.module, args, str(path), **kwargs)
    return onnx.load(str(path))


def _types_inference_cannot_recover(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Element-type-only value infos for outputs of ops whose type ONNX inference leaves unset."""
    wanted = {o for n in model.graph.node if n.op_type == "GroupNormalization" for o in n.output}
    return [onnx.helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, None)
            for vi in model.graph.value_info if vi.name in wanted and vi.type.tensor_type.elem_type]


def _trace_dynamo(loaded: LoadedModel, opset: int, workdir: Path) -> onnx.ModelProto:
    """The graph from the dynamo (torch.export) exporter, weights inside; dims named as the spec says."""
    args, kwargs = _export_kwargs(loaded, opset)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("dynamo", "do_constant_folding", "dynamic_axes")}
    kwargs["dynamic_shapes"] = _dynamic_shapes(loaded.module, loaded.spec)
    kwargs["opset_version"] = max(opset, 18)  # dynamo's lowest; _convert_opset brings it to ``opset``
    path = workdir / "exported.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        # Its progress lines and internal deprecation notes say nothing about the user's model.
        warnings.simplefilter("ignore", FutureWarning)
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(loaded.module, args, str(path), dynamo=True, external_data=False, **kwargs)
    return onnx.load(str(path))


# The TorchScript exporter hands its final name -> tensor table (module parameters and constant-folded
# results, deduplicated) to this pass; wrapping it is the one way to get that table without the exporter
# also copying every weight into a protobuf, serializing it and returning the bytes (about 3 copies).
_PARAMS_PASS = "_jit_pass_onnx_deduplicate_initializers"


def _trace_weightless(loaded: LoadedModel, opset: int, workdir: Path) -> tuple[onnx.ModelProto, dict[str, torch.Tensor]] | None:
    """The traced graph without weights, and the tensors its extra graph inputs stand for.

    Same trace as :func:`_trace` (``export_params=False`` changes only where
    the weights go: the nodes are the same). None when this torch build does
    not expose the table, or it misses an input: the caller then traces with
    the weights inside.
    """
    original = getattr(torch._C, _PARAMS_PASS, None)
    if original is None:
        return None
    captured: dict[str, torch.Tensor] = {}

    def capture(*a: Any, **kw: Any) -> Any:
        table = original(*a, **kw)
        captured.clear()
        captured.update(table)
        return table

    args, kwargs = _export_kwargs(loaded, opset)
    path = workdir / "traced.onnx"
    setattr(torch._C, _PARAMS_PASS, capture)
    try:
        with _expected_trace_warnings(), torch.no_grad():
            torch.onnx.export(loaded.module, args, str(path), export_params=False, **kwargs)
    finally:
        setattr(torch._C, _PARAMS_PASS, original)
    model = onnx.load(str(path))
    path.unlink()
    user = {t.name for t in loaded.spec.inputs}
    extra = [vi.name for vi in model.graph.input if vi.name not in user]
    if any(name not in captured for name in extra):
        return None
    return model, {name: captured[name] for name in extra}


def _shapes_text(loaded: LoadedModel, shape: Sequence[int]) -> str:
    """'x:2x3x16x24, t:2': the inputs the model is called with at (batch, height, width) ``shape``."""
    b, h, w = (int(v) for v in shape)
    feeds = loaded.spec.make_inputs(b, h, w, seed=0)
    return ", ".join(f"{name}:{'x'.join(map(str, a.shape)) or 'scalar'}" for name, a in feeds.items())


def call_model(fn: Callable[[], T], loaded: LoadedModel, shape: Sequence[int]) -> T:
    """``fn()``, which runs the model at ``shape``; an exception from it is the model's: UsageError (exit 2) naming the shapes."""
    try:
        return fn()
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - the user's forward can raise anything
        raise model_raised(exc, _shapes_text(loaded, shape)) from None


def call_model_once(loaded: LoadedModel, shape: Sequence[int]) -> None:
    """Run the model once at the export shape, so that its own errors are reported as its own before any exporter runs."""
    b, h, w = (int(v) for v in shape)

    def run() -> None:
        feeds = _torch_feeds(loaded.spec, b, h, w)
        with torch.no_grad():
            loaded.module(*(feeds[t.name] for t in loaded.spec.inputs))

    call_model(run, loaded, shape)


@contextlib.contextmanager
def _diagnostics_to(log: Path) -> Iterator[None]:
    """Send what the exporters print (Python and C++ alike: file descriptors 1 and 2) to ``log`` while they run."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _trace_one(loaded: LoadedModel, opset: int, stage: Path, raw: Path, exporter: str) -> onnx.ModelProto:
    """The graph from one exporter, its weights detached to ``raw``."""
    if exporter == "dynamo":
        model = _trace_dynamo(loaded, opset, stage)
        passes.name_nodes_by_module(model)
        weights.detach_inline(model, raw)
        return model
    traced = _trace_weightless(loaded, opset, stage)
    if traced is not None:
        model, params = traced
        weights.attach_external(model, params, raw)
        return model
    model = _trace(loaded, opset, stage)
    weights.detach_inline(model, raw)
    return model


def _trace_with(loaded: LoadedModel, opset: int, stage: Path, raw: Path,
                exporter: str) -> tuple[onnx.ModelProto, str, str | None]:
    """(graph, the exporter that wrote it, why the one before it failed) for ``exporter`` ("auto" tries both).

    The exporters' output goes to a log file; it is removed when an exporter
    succeeds (kept with ``ATTN_EXPORT_DEBUG``) and named when none does.
    """
    order = AUTO_ORDER if exporter == "auto" else (exporter,)
    fd, name = tempfile.mkstemp(prefix="attn-export-", suffix=".export.log")
    os.close(fd)
    log = Path(name)
    failures: list[str] = []
    keep = bool(os.environ.get("ATTN_EXPORT_DEBUG"))
    try:
        for which in order:
            try:
                with _diagnostics_to(log):
                    model = _trace_one(loaded, opset, stage, raw, which)
            except (UsageError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - an exporter's failure on a model that runs in PyTorch
                with open(log, "a") as f:
                    f.write(f"\n==== the {which} exporter failed ====\n{traceback.format_exc()}\n")
                raw.unlink(missing_ok=True)
                failures.append(f"{which}: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}")
                continue
            return model, which, failures[0] if failures else None
        keep = True
        raise ExportFailed(f"no exporter could export the model ({'; '.join(failures)}); the exporters' output is in {log}")
    finally:
        if not keep:
            log.unlink(missing_ok=True)


def _convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current == opset:
        return model
    # The converter copies the whole model through C++ several times; weights make that slow and the
    # adapters never read them (only small shape/axes constants), so large initializers travel aside.
    aside: dict[str, bytes] = {}
    for init in model.graph.initializer:
        if init.HasField("raw_data") and len(init.raw_data) > 4096:
            aside[init.name] = init.raw_data
            init.ClearField("raw_data")
    try:
        converted = onnx.version_converter.convert_version(model, opset)
    finally:
        for init in model.graph.initializer:
            if init.name in aside:
                init.raw_data = aside[init.name]
    for init in converted.graph.initializer:
        if init.name in aside:
            init.raw_data = aside[init.name]
    return converted


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(i.raw_data) if i.HasField("raw_data") else int(np.prod(i.dims)) * 4 for i in model.graph.initializer)


def _save(model: onnx.ModelProto, out: Path, external: bool) -> Path | None:
    """Save through the one write transaction (:func:`.weights.write_model`); returns the data file, if any."""
    from .weights import write_model

    return write_model(model, out, external=external)


Reference = list[tuple[tuple[int, int, int], dict[str, np.ndarray], np.ndarray]]


def torch_reference(loaded: LoadedModel, shapes: list[tuple[int, int, int]]) -> Reference:
    """PyTorch's output at each shape, with the inputs it was given (seed 1)."""
    out = []
    for b, h, w in shapes:
        feeds = loaded.spec.make_inputs(b, h, w, seed=1)
        with torch.no_grad():
            ref = loaded.module(*[torch.from_numpy(feeds[t.name]) for t in loaded.spec.inputs]).numpy()
        out.append(((b, h, w), feeds, ref))
    return out


# The export check: FP32 artifact against FP32 PyTorch, under the one comparison rule (attn_export.compare).
EXPORT_TOLERANCES: Tolerances = resolve_tolerances("fp32")


def compare_with_reference(model_bytes_or_path: bytes | str, reference: Reference,
                           tol: Tolerances = EXPORT_TOLERANCES) -> dict[str, Any]:
    """ONNX Runtime (CPU) against a :func:`torch_reference` at each of its shapes, under ``tol``.

    Returns ``passed``, ``max_abs_err``, ``tolerances`` (one line) and ``shapes``: per shape its
    ``shape``, ``passed``, ``max_abs_err`` and the pass rule's ``reason`` when it failed.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes_or_path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_outputs()[0].name
    results: list[dict[str, Any]] = []  # JSON-bound, one per shape
    for shape, feeds, ref in reference:
        got = sess.run(None, feeds)[0]
        c = compare_arrays(name, ref, got, tol)
        results.append({"shape": list(shape), "passed": c.passed, "max_abs_err": c.max_abs, "reason": c.reason})
    return {"passed": all(r["passed"] for r in results), "max_abs_err": max(r["max_abs_err"] for r in results),
            "tolerances": tol.describe(), "shapes": results}


def compare_with_torch(model_bytes_or_path: bytes | str, loaded: LoadedModel, shapes: list[tuple[int, int, int]],
                       tol: Tolerances = EXPORT_TOLERANCES) -> dict[str, Any]:
    """:func:`compare_with_reference` against PyTorch's output at each shape."""
    return compare_with_reference(model_bytes_or_path, torch_reference(loaded, shapes), tol)


@contextlib.contextmanager
def _step(steps: dict[str, float], name: str, progress: ProgressFn | None) -> Iterator[None]:
    if progress:
        progress(name)
    t0 = time.perf_counter()
    yield
    steps[name] = time.perf_counter() - t0


def export_onnx(
    source: ModelSource,
    output: str | Path,
    *,
    attention: str = "op",
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    check: bool = True,
    progress: ProgressFn | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    allow_unfused: bool = False,
    exporter: str = "auto",
) -> ExportResult:
    """Export the model described by ``source`` to an ONNX file at ``output``.

    ``attention``: "op" (one ONNX Attention node per block, opset >= 23) or
    "decomposed" (Mul(q, scale), MatMul, Softmax, MatMul): every attention site
    the graph analysis finds is rewritten into that form, and a site it cannot
    rewrite fails the export (:class:`CheckFailed`) unless ``allow_unfused``,
    which writes the file and lists the site in ``ExportResult.unfused``.
    ``exporter``: "auto" (default: the TorchScript tracer, and the dynamo
    exporter where it fails), "torchscript" or "dynamo" (torch.export
    based); the one that wrote the file is recorded in its spec. The model is
    called once in PyTorch before the export: an exception raised there is
    the model's own (UsageError naming the input shapes, exit 2). The
    exporters' diagnostics go to a log file named in the error line.
    ``check`` runs the result in ONNX Runtime against PyTorch at an unseen
    shape before the file is put in place.
    """
    validate_export_options(attention, opset)
    if exporter not in EXPORTERS:
        raise UsageError(f"--exporter must be one of {', '.join(EXPORTERS)} (got {exporter!r})")
    out = check_output_path(output, force=force)
    for given in (source.checkpoint, source.config if not isinstance(source.config, dict) else None):
        if given is not None and Path(given).exists() and Path(given).resolve() == out.resolve():
            raise UsageError(f"the output {out} is the model's own input file; write the ONNX file elsewhere")
    steps: dict[str, float] = {}
    t_start = time.perf_counter()
    with _step(steps, "build model", progress):
        loaded = load_model(source, attention_impl="decomposed")
    spec = loaded.spec
    spec.attention = attention
    spec.opset = opset
    spec.export_shape = list(example_shape(spec))
    num_parameters = loaded.num_parameters
    reference: Reference | None = None
    call_model_once(loaded, example_shape(spec))
    if check:
        # PyTorch's answer is taken now, so the model can be freed before the graph work starts.
        with _step(steps, "PyTorch reference", progress):
            reference = call_model(lambda: torch_reference(loaded, [check_shape_for(spec)]), loaded, check_shape_for(spec))
    data_name = out.name + ".data"
    # Everything is written in a hidden folder next to the output: the weights go there once, straight from
    # PyTorch, and the graph passes run on the weightless graph. Only a checked result is moved into place;
    # on failure or interruption the folder goes, and nothing is left behind.
    with staging_dir(out) as tmpdir:
        stage = Path(tmpdir)
        raw = stage / "traced.data"
        with _step(steps, "trace", progress):
            model, used, fallback = _trace_with(loaded, opset, stage, raw, exporter)
        spec.exporter = used
        # The PyTorch model is not needed any more (its reference output is kept): free its weights.
        # LoadedModel.module is an nn.Module for every other reader; after the export nothing reads it again.
        loaded.module = None  # type: ignore[assignment]
        gc.collect()
        with _step(steps, "optimize", progress):
            model = passes.optimize(model)
        with _step(steps, "convert opset", progress):
            model = _convert_opset(model, opset)
        with _step(steps, "fuse attention", progress):
            rewrite = canonicalize_attention(model, attention)
            if any("dynamic dim" in (u.problem or "") for u in rewrite.unfused):
                # A scale computed at run time from a shape is learnt by running the graph once in ONNX Runtime,
                # which needs the weights: only then are they read back in, and written out again afterwards.
                onnx.external_data_helper.load_external_data_for_model(model, str(stage))
                rewrite = canonicalize_attention(model, attention)
                raw.unlink()
                weights.detach_inline(model, raw)
            n_attention = rewrite.count
            unfused = [{"site": s.name, "node": s.anchor, "reason": s.problem or "not recognized"} for s in rewrite.unfused]
            if unfused and not allow_unfused:
                first = unfused[0]
                more = f" (and {len(unfused) - 1} more site(s))" if len(unfused) > 1 else ""
                raise CheckFailed(
                    f"attention site {first['site']} (Softmax {first['node']}) could not be rewritten into the "
                    f"{attention!r} form: {first['reason']}{more}; nothing was written. Pass --allow-unfused to write "
                    "the file anyway and list the unfused sites")
        with _step(steps, "shape inference + check", progress):
            passes.keep_declared_inputs(model, [(t.name, t.dtype, list(t.dims)) for t in spec.inputs])
            passes.name_dynamic_dims(model, {t.name: t.dims for t in spec.inputs + spec.outputs})
            # ONNX shape inference cannot type GroupNormalization-21's output on its own (dynamo emits the op):
            # its element types are kept, every shape is inferred afresh.
            typed_only = _types_inference_cannot_recover(model)
            del model.graph.value_info[:]
            model.graph.value_info.extend(typed_only)
            model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
            embed_spec(model, spec)
            staged, external = weights.save_staged(model, stage, out.name, data_name, [raw.name],
                                                   external_data_threshold)
            # The path form of the checker reads the data file's references itself: weights never in memory.
            onnx.checker.check_model(str(staged), full_check=True)
        check_result = None
        if reference is not None:
            with _step(steps, "check against PyTorch", progress):
                # ONNX Runtime reads the staged file with its weights in the data file: the same tensors the
                # output holds, at about 1.6x their size where the single-file form costs 2.5x.
                check_result = compare_with_reference(str(staged), reference)
                if not check_result["passed"]:
                    bad = next(r for r in check_result["shapes"] if not r["passed"])
                    raise CheckFailed(
                        f"exported model disagrees with PyTorch at {bad['shape']} (max abs error "
                        f"{bad['max_abs_err']:.3g}; {bad['reason'] or 'pass rule failed'}; {check_result['tolerances']}); "
                        "nothing was written"
                    )
        with _step(steps, "save", progress):
            data_path = weights.publish_staged(model, stage, staged, out, data_name, external)
    seconds = time.perf_counter() - t_start
    size = out.stat().st_size + (data_path.stat().st_size if data_path else 0)
    io = lambda vis: [(vi.name, onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name, passes.dims_of(vi)) for vi in vis]  # noqa: E731
    return ExportResult(
        path=out, size_bytes=size, opset=opset, attention=attention, attention_nodes=n_attention,
        inputs=io(model.graph.input), outputs=io(model.graph.output), num_parameters=num_parameters,
        seconds=seconds, external_data=data_path, spec=spec, check=check_result, steps=steps, unfused=unfused,
        exporter=used, fallback=fallback,
    )
