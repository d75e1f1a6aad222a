"""``attn-export optimize``: rewrite any ONNX file, ours or from elsewhere, for the runtime that will serve it.

For TensorRT: load the file (with its external data), raise the opset to 23
when the ONNX ``Attention`` op is wanted, rewrite every attention site through
the one attention analysis (:func:`attn_export.graph.canonicalize_attention`)
and infer shapes. For ONNX Runtime: build its serving form and record it in
the file (:mod:`.serving`). Either way the result goes through the one write
transaction (:func:`.weights.write_model`): staged, checked by the ONNX checker
and against the input file in ONNX Runtime under the FP32 pass rule, and only
then put in place (external data next to it when the input had some, or when
it is over 2 GB).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnx.external_data_helper

from ..atomic import check_output_path
from ..compare import compare_outputs, resolve_tolerances
from ..errors import CheckFailed, UsageError
from ..graph import canonicalize_attention, find_attention
from ..graph.index import default_opset
from ..spec import METADATA_KEY, ModelSpec, format_shape
from .foreign import is_foreign, need_shapes, parse_input_shapes, spec_of
from .metadata import embed_spec, external_data_locations, load_onnx
from .serving import ServingChoice

Shape = tuple[int, int, int]
# "tensorrt": the attention form TensorRT fuses; "onnxruntime": ONNX Runtime's serving form.
OPTIMIZE_TARGETS = ("tensorrt", "onnxruntime")


@dataclass
class OptimizeResult:
    """What :func:`optimize_onnx` wrote and checked."""

    path: Path
    source: Path
    attention: str
    sites: int
    rewritten: list[str]
    unchanged: list[str]
    unfused: list[dict[str, str]]
    opset_before: int
    opset: int
    external_data: Path | None
    check: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    target: str = "tensorrt"
    serving: dict[str, Any] | None = None  # the serving form's own record (target onnxruntime)


def _session(model_or_path: onnx.ModelProto | Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = str(model_or_path) if isinstance(model_or_path, Path) else model_or_path.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _check(src: Path, candidate: onnx.ModelProto | Path, spec: ModelSpec, shapes: Sequence[Shape]) -> list[dict[str, Any]]:
    tol = resolve_tolerances(spec.precision)
    ref, cand = _session(src), _session(candidate)
    names = [o.name for o in ref.get_outputs()]
    results = []
    for i, shape in enumerate(shapes):
        feeds = spec.make_inputs(*shape, seed=i)
        try:
            want = dict(zip(names, ref.run(None, feeds)))
        except Exception as exc:  # noqa: BLE001 - the input model itself cannot run at this shape
            raise UsageError(f"{src} does not run at {format_shape(shape)} in ONNX Runtime "
                             f"({str(exc).splitlines()[0][:160]}); give shapes it serves with --shapes") from None
        got = dict(zip(names, cand.run(None, feeds)))
        outs = compare_outputs(want, {k: np.asarray(v) for k, v in got.items()}, tol, names)
        results.append({"shape": list(shape), "passed": all(o.passed for o in outs),
                        "max_abs_err": max(float(o.max_abs) for o in outs)})
    return results


def optimize_onnx(
    onnx_in: str | Path,
    output: str | Path,
    *,
    attention: str = "op",
    target: str = "tensorrt",
    provider: str = "cpu",
    serving_attention: str = "auto",
    force: bool = False,
    allow_unfused: bool = False,
    input_shapes: str | Sequence[str] | None = None,
    shapes: Sequence[Shape] | None = None,
    input_ranges: dict[str, tuple[float, float]] | None = None,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
    choose_form: Callable[[ModelSpec, list[Shape] | None], ServingChoice] | None = None,
) -> OptimizeResult:
    """Rewrite ``onnx_in`` for ``target`` and write ``output`` after comparing the two in ONNX Runtime.

    ``target="tensorrt"`` (default): every attention site becomes
    ``attention`` ("op": one ONNX Attention node, opset 23; "decomposed":
    the canonical MatMul/Softmax/MatMul). ``target="onnxruntime"``: the file
    becomes ONNX Runtime's serving form for ``provider`` (cpu or cuda), a
    self-described artifact (:mod:`.serving`) that runners run as written.
    ``choose_form`` (``--tune``), given the description and the shapes the
    user named (None: none named), says which rewrites to make, from
    measurements: the pipeline passes :func:`attn_export.runners.serving_tune.tune_serving_form`.
    """
    from .fp16 import FP16_KEY
    from .onnx_export import _convert_opset
    from .serving import SERVING_PROVIDERS, build_serving_form, describe_serving_form, serving_description
    from .weights import EXTERNAL_DATA_THRESHOLD, external_bytes, write_model

    t0 = time.perf_counter()
    if target not in OPTIMIZE_TARGETS:
        raise UsageError(f"--for must be one of {', '.join(OPTIMIZE_TARGETS)} (got {target!r})")
    if attention not in ("op", "decomposed"):
        raise UsageError(f"--attention must be op or decomposed (got {attention!r})")
    if provider not in SERVING_PROVIDERS:
        raise UsageError(f"--provider must be one of {', '.join(SERVING_PROVIDERS)} (got {provider!r})")
    if target == "onnxruntime" and (attention != "op" or allow_unfused):
        raise UsageError("--attention and --allow-unfused choose the TensorRT form; --for onnxruntime takes "
                         "--serving-attention")
    if target == "tensorrt" and (provider != "cpu" or serving_attention != "auto" or choose_form is not None):
        raise UsageError("--provider, --serving-attention and --tune apply to --for onnxruntime")
    src = Path(onnx_in)
    out = check_output_path(output, force=force)
    if src.resolve() == out.resolve():
        raise UsageError("the output must be a different file from the input")
    say = progress or (lambda _text: None)
    say("load")
    # One parse: the graph first (its data files are checked by external_data_locations), then its weights.
    model = load_onnx(src, load_external_data=False)
    had_external = bool(external_data_locations(model, src))
    if had_external:
        onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
    if serving_description(model) is not None:
        raise UsageError(f"{src} is already ONNX Runtime's serving form; optimize the file it was made from")
    # The output is another graph: the record of the FP16 conversion that made the input would not describe it.
    keep = [p for p in model.metadata_props if p.key != FP16_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    spec = spec_of(model, origin=str(src), input_ranges=input_ranges)
    named = bool(input_shapes or shapes)
    if input_shapes and shapes:
        raise UsageError("give the check's shapes one way: BxHxW or name:DIMS sets")
    if input_shapes:
        shapes = parse_input_shapes(input_shapes, spec)
    elif shapes and not is_foreign(spec):
        shapes = list(shapes)
    elif is_foreign(spec):
        shapes = need_shapes(spec, "the check against the input")
    else:
        from .onnx_export import check_shape_for

        shapes = [check_shape_for(spec)]
    for s in shapes:
        spec.check_shape(*s)

    before = default_opset(model)
    unfused: list[dict[str, str]] = []
    rewritten: list[str] = []
    unchanged: list[str] = []
    serving: dict[str, Any] | None = None
    if target == "onnxruntime":
        choice = ServingChoice(serving_attention, True)
        if choose_form is not None:
            choice = choose_form(spec, list(shapes) if named else None)
        say("serving form")
        form = build_serving_form(model, src, spec, provider=SERVING_PROVIDERS[provider], attention=choice.attention,
                                  winograd=choice.winograd, one_file=False)
        if not form.changed:
            raise UsageError(f"nothing in {src} has a faster form in ONNX Runtime for {provider} (no FP32 attention "
                             "site, no eligible 3x3 convolution); serve it as it is")
        serving = describe_serving_form(model, form, provider=SERVING_PROVIDERS[provider],
                                        attention=choice.attention, source=src, tuning=choice.tuning)
        rewritten = [p for p in form.parts()]
    else:
        if attention == "op" and before < 23:
            say("convert opset")
            try:
                model = _convert_opset(model, 23)
            except Exception as exc:  # noqa: BLE001 - the converter raises many types
                raise UsageError(f"cannot convert {src} from opset {before} to 23 for the Attention op "
                                 f"({str(exc).splitlines()[0][:160]}); use --attention decomposed") from None
        say("rewrite attention")
        result = canonicalize_attention(model, attention)
        rewritten, unchanged = result.rewritten, result.unchanged
        unfused = [{"site": s.name, "node": s.anchor, "reason": s.problem or "not recognized"} for s in result.unfused]
        if unfused and not allow_unfused:
            first = unfused[0]
            more = f" (and {len(unfused) - 1} more site(s))" if len(unfused) > 1 else ""
            raise CheckFailed(f"attention site {first['site']} (node {first['node']}) could not be rewritten: "
                              f"{first['reason']}{more}; nothing was written (--allow-unfused writes it anyway)")
        say("shape inference")
        del model.graph.value_info[:]
        try:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001 - a foreign graph shape inference cannot follow still runs
            pass
        if any(p.key == METADATA_KEY for p in model.metadata_props) and not is_foreign(spec):
            spec.attention, spec.opset = attention, default_opset(model)
            embed_spec(model, spec)
    external = had_external or external_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    checks: list[dict[str, Any]] = []

    def compare_with_source(staged: Path) -> None:
        if not check:
            return
        say("check against the input")
        checks.extend(_check(src, staged, spec, shapes))
        bad = next((c for c in checks if not c["passed"]), None)
        if bad is not None:
            raise CheckFailed(f"the optimized model disagrees with {src} at {format_shape(bad['shape'])} "
                              f"(max abs error {bad['max_abs_err']:.3g}); nothing was written")

    say("write")
    data_path = write_model(model, out, external=external, check=compare_with_source)
    sites_after = len(find_attention(model, probe=False, run=False)) if serving is None else \
        int(serving["attention_sites"])
    return OptimizeResult(
        path=out, source=src, attention=attention if serving is None else f"onnxruntime serving ({serving_attention})",
        sites=sites_after, rewritten=rewritten, unchanged=unchanged, unfused=unfused, opset_before=before,
        opset=default_opset(model), external_data=data_path, check=checks, seconds=time.perf_counter() - t0,
        target=target, serving=serving,
    )
