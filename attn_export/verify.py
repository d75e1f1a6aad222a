"""Verify an exported artifact against the PyTorch model it came from.

The artifact is an ONNX file (run in ONNX Runtime) or a TensorRT engine with
its sidecar (run by TensorRT). The reference is the PyTorch model rebuilt
from the description stored in the artifact (preset/config/import path,
seed, checkpoint and its SHA-256). Both run on the same seeded inputs over a
sweep of shapes, and every output is compared with :mod:`attn_export.compare`.

Default shape sweep
-------------------
ONNX (dynamic batch/H/W), with ``m`` the H/W multiple, ``T`` the preset's
typical resolution (capped below the large size) and ``L`` the large size:

* small: ``1 x s x s`` (the smallest multiple of m that is at least 8 px);
* typical, batch > 1: ``2 x T x T``;
* non-square: ``1 x T x 1.5T`` (rounded up to the multiple);
* off-grid: ``3m x 5m`` (multiples that are not powers of two), batch 3 when
  that costs no more pixels than the large shape, else batch 1;
* large: ``1 x L x L``.

``L`` is capped by preset so the sweep stays affordable on a 2-core CPU
(measured, PyTorch + ONNX Runtime): tiny 64 px (well under a second),
ddpm-cifar10 64 px (about 1 s per shape), ddpm-256 128 px (about 8 s at
1x128x128, where 1x256x256 would take over 20 s). Other models: 2T capped at
128 px. Engines: min, opt and max of every profile, plus one off-grid shape
inside each profile.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, cast

import numpy as np

from . import heap
from .host import host_info
from .compare import OutputComparison, Tolerances, compare_outputs, json_number, resolve_tolerances
from .errors import UsageError
from .engines.sidecar import is_engine_path
from .spec import ModelSpec, ReferenceOptions, format_shape, parse_shapes

from .progress import ProgressFn
from .shapes import Shape, accepts as _valid, fit_shapes, large_size, round_up as _round_up, typical_size

if TYPE_CHECKING:

    from .graph.memory import SizeModel
    from .runners.base import Runner
    from .runners.ort_runner import OrtRunner


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ShapeResult:
    """One input shape: the comparison of every output and the time each backend took."""

    shape: Shape
    outputs: list[OutputComparison]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": format_shape(self.shape),
            "batch": self.shape[0], "height": self.shape[1], "width": self.shape[2],
            "passed": self.passed,
            "seconds": dict(self.seconds),
            "outputs": [o.to_dict() for o in self.outputs],
        }


@dataclass
class VerifyReport:
    """Everything a verification found; ``passed`` is the verdict."""

    artifact: str
    kind: str                      # "onnx" | "engine"
    precision: str
    tolerances: Tolerances
    reference: str                 # e.g. "pytorch (cpu)"
    candidate: str                 # e.g. "onnxruntime (CPUExecutionProvider)"
    seed: int
    shape_source: str              # "default" | "user"
    shapes: list[ShapeResult] = field(default_factory=list)
    # Total inference seconds per backend (all shapes), and the one-off load time per backend.
    timings: dict[str, float] = field(default_factory=dict)
    setup_seconds: dict[str, float] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    model: dict[str, Any] = field(default_factory=dict)
    providers: list[str] = field(default_factory=list)  # ONNX Runtime's, as its session really has them
    notes: list[str] = field(default_factory=list)  # what was decided for the user (default shapes left out)

    @property
    def passed(self) -> bool:
        return bool(self.shapes) and all(s.passed for s in self.shapes)

    def failures(self) -> list[str]:
        """One line per failing (shape, output), naming the reason."""
        return [f"{format_shape(s.shape)} {o.name}: {o.reason}" for s in self.shapes for o in s.outputs if not o.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact,
            "kind": self.kind,
            "precision": self.precision,
            "passed": self.passed,
            "tolerances": self.tolerances.to_dict(),
            "reference": self.reference,
            "candidate": self.candidate,
            "seed": self.seed,
            "shape_source": self.shape_source,
            "timings": {k: json_number(v) for k, v in self.timings.items()},
            "setup_seconds": {k: json_number(v) for k, v in self.setup_seconds.items()},
            "checkpoint": self.checkpoint,
            "model": self.model,
            "shapes": [s.to_dict() for s in self.shapes],
            "failures": self.failures(),
            "providers": list(self.providers),
            "notes": list(self.notes),
            "tool": "attn-export verify",
            "host": host_info(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


# ---------------------------------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------------------------------
def _dedupe(shapes: Sequence[Shape]) -> list[Shape]:
    return list(dict.fromkeys(shapes))


def default_shapes(spec: ModelSpec) -> list[Shape]:
    """The default sweep for an ONNX artifact (see the module doc)."""
    m = spec.hw_multiple
    typical = _round_up(typical_size(spec), m)
    large = large_size(spec)
    if typical >= large:
        typical = max(m, (large // 2) // m * m)
    small = _round_up(max(8, m), m)
    off_h, off_w = 3 * m, 5 * m
    off_b = 3 if 3 * off_h * off_w <= large * large else 1
    return fit_shapes(spec, [
        (1, small, small),
        (2, typical, typical),
        (1, typical, _round_up(typical * 1.5, m)),
        (off_b, off_h, off_w),
        (1, large, large),
    ])


# A default sweep shape whose live activations (attention scores included) would pass this is scaled down.
SWEEP_ACTIVATIONS = 2 << 30  # graph.memory.DEFAULT_SHAPE_ACTIVATIONS (not imported at module load: onnx is heavy)


def affordable_sweep(sizes: "SizeModel", sweep: Sequence[Shape]) -> tuple[list[Shape], list[str]]:
    """The default sweep with each shape whose activations (attention scores included) pass
    :data:`SWEEP_ACTIVATIONS` scaled down until they do (or left out), and a note for each one changed."""
    from .graph.memory import human_bytes

    kept, changed = sizes.scaled_to_fit(sweep, SWEEP_ACTIVATIONS)
    notes = []
    for asked, used, need in changed:
        what = f"scaled down to {format_shape(used)}" if used is not None else "left out"
        notes.append(f"{format_shape(asked)} {what} in the default sweep: it needs about {human_bytes(need)} of "
                     f"activations and attention scores; --shapes {format_shape(asked)} checks it")
    return kept, notes


def _off_grid_value(lo: int, hi: int, m: int, avoid: set[int], target: float) -> int | None:
    """A multiple of m in [lo, hi], not a power of two and not in ``avoid``, closest to ``target``."""
    values = [v for v in range(_round_up(lo, m), hi + 1, m) if v not in avoid]
    if not values:
        return None
    non_pow2 = [v for v in values if v & (v - 1)]
    pool = non_pow2 or values
    return min(pool, key=lambda v: (abs(v - target), v))


def engine_shapes(profiles: Sequence[Any], spec: ModelSpec) -> list[Shape]:
    """min, opt and max of every profile, plus an off-grid shape inside each profile."""
    m = spec.hw_multiple
    out: list[Shape] = []
    for p in profiles:
        out.extend([tuple(p.min), tuple(p.opt), tuple(p.max)])
        h = _off_grid_value(p.min[1], p.max[1], m, {p.min[1], p.opt[1], p.max[1]}, (p.min[1] + p.max[1]) / 2)
        w = _off_grid_value(p.min[2], p.max[2], m, {p.min[2], p.opt[2], p.max[2]}, p.min[2] + (p.max[2] - p.min[2]) / 3)
        b = (p.min[0] + p.max[0] + 1) // 2
        if h is not None or w is not None:
            off = (b, h if h is not None else p.opt[1], w if w is not None else p.opt[2])
            if _valid(spec, off):
                out.append(off)
    return _dedupe([s for s in out if _valid(spec, s)])


def check_user_shapes(shapes: Sequence[Shape], spec: ModelSpec, profiles: Sequence[Any] | None = None) -> None:
    """UsageError (exit 2, one line) for the first shape the artifact cannot serve."""
    from .engines.profiles import check_servable

    for s in shapes:
        check_servable(s, spec, profiles)


# ---------------------------------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------------------------------
def artifact_kind(path: str | Path) -> str:
    """'engine' for .plan/.engine/.trt files or anything with an engine sidecar, else 'onnx'."""
    return "engine" if is_engine_path(path) else "onnx"


def _checkpoint_info(spec: ModelSpec, source: Any) -> dict[str, Any] | None:
    from .files import file_sha256

    recorded = spec.checkpoint or None
    if source.checkpoint is None and not recorded:
        return None
    info: dict[str, Any] = {"recorded": recorded}
    if source.checkpoint is not None:
        path = Path(source.checkpoint)
        sha = file_sha256(path) if path.is_file() else None
        info.update(path=str(path), sha256=sha,
                    matches=bool(recorded) and sha == (recorded or {}).get("sha256"))
    else:
        info.update(path=None, sha256=None, matches=False)
    return info


VERIFY_FORMS = ("written", "serving")
VERIFY_BACKENDS = ("onnxruntime", "openvino")


def verify(
    artifact: str | Path,
    *,
    shapes: str | Sequence[str] | Sequence[Shape] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    stat: str | None = None,
    quantile: float = 0.99,
    seed: int = 0,
    reference_model: ReferenceOptions | None = None,
    providers: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
    reference: str | Path | None = None,
    input_shapes: str | Sequence[str] | None = None,
    input_ranges: dict[str, tuple[float, float]] | None = None,
    max_memory: int | None = None,
    form: str = "written",
    inputs: Mapping[str, np.ndarray] | None = None,
    backend: str = "onnxruntime",
    precision: str | None = None,
) -> VerifyReport:
    """Compare ``artifact`` (ONNX file or TensorRT engine) with its PyTorch reference over a sweep of shapes.

    ``form`` (ONNX files): "written" (default) runs the file exactly as
    written, the graph TensorRT and every other consumer reads; "serving"
    runs ONNX Runtime's serving form built from it in memory (its
    MultiHeadAttention or query-chunked attention, Winograd convolutions).
    The report's candidate line says which ran.

    Raises UsageError/ShapeError/CheckpointError (exit 2) for bad input: an
    unreadable artifact, a shape it cannot serve, a checkpoint whose SHA-256
    is not the recorded one (unless ``allow_checkpoint_mismatch``);
    MissingDependencyError (exit 2) for an engine where TensorRT is missing.
    A comparison that runs and fails is not an exception: check
    ``report.passed``.

    ``reference``: compare against this ONNX file in ONNX Runtime instead of
    PyTorch (the only reference for a file this tool did not export).
    ``input_shapes``: Polygraphy-style shape sets (``x:1x3x64x64,sigma:1``),
    one per sweep entry; ``input_ranges``: data ranges per input name.
    ``reference_model``: the user's choice of PyTorch reference (preset,
    config, factory, checkpoint) and whether to trust what the artifact
    records about it (:class:`attn_export.spec.ReferenceOptions`).
    ``max_memory``: bytes a shape may need (estimated before anything runs;
    None: this machine's memory, 0: no limit); larger shapes are refused.
    ``inputs``: one call's inputs (name -> array, e.g. from
    :func:`attn_export.inputs.load_inputs`) to verify on instead of the
    seeded random sweep; checked against the artifact's inputs first.
    ``backend``: "onnxruntime" (default) or "openvino" (ONNX files, the file as
    written on OpenVINO's CPU plugin at ``precision``, f32, bf16 or f16, which
    it then requires; bf16 and f16 are held to the FP16 tolerances).
    """
    path = Path(artifact)
    if inputs is not None and (shapes or input_shapes):
        raise UsageError("give inputs or shapes, not both: the inputs set the shape")
    if form not in VERIFY_FORMS:
        raise UsageError(f"--form must be one of {', '.join(VERIFY_FORMS)} (got {form!r})")
    if backend not in VERIFY_BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(VERIFY_BACKENDS)} (got {backend!r})")
    ov_precision = None
    if backend == "openvino":
        from .runners.openvino_runner import import_openvino, parse_precision

        ov_precision = parse_precision(precision)
        if providers or form != "written":
            raise UsageError("--provider and --form serving are ONNX Runtime's; OpenVINO runs the file as written")
        import_openvino()  # a missing OpenVINO is said before anything is parsed
    elif precision is not None:
        raise UsageError("--precision sets OpenVINO's inference precision: add --backend openvino")
    if not path.is_file():
        raise UsageError(f"artifact not found: {path}")
    kind = artifact_kind(path)
    if kind == "engine" and backend != "onnxruntime":
        raise UsageError(f"--backend {backend} runs ONNX files; an engine always runs in TensorRT")
    profiles = None
    if kind == "engine":
        from .engines.sidecar import read_sidecar, sidecar_profiles, sidecar_spec

        if providers:
            raise UsageError("--provider applies to ONNX files; an engine always runs in TensorRT")
        sidecar = read_sidecar(path)
        spec = sidecar_spec(sidecar)
        profiles = sidecar_profiles(sidecar)
        precision = str(sidecar.get("precision") or spec.precision)
    else:
        from .exporter.foreign import spec_of
        from .exporter.metadata import load_onnx

        # Parsed once: the description and the memory estimate both read this graph.
        graph = load_onnx(path, load_external_data=False)
        spec = spec_of(graph, origin=str(path), input_ranges=input_ranges)
        from .exporter.serving import written_parts

        file_parts = written_parts(graph)
        precision = spec.precision
    from .exporter.foreign import is_foreign, resolve_shapes

    foreign = is_foreign(spec)
    if reference is None and foreign:
        raise UsageError(f"{path} has no attn-export description, so there is no PyTorch model to compare it with; "
                         "pass --reference model.onnx (for example the FP32 file it was made from)")
    if reference is not None and not Path(reference).is_file():
        raise UsageError(f"reference ONNX file not found: {reference}")
    if inputs is None and (input_shapes or (foreign and not shapes)):
        # A list of "BxHxW" strings is passed on as it is (resolve_shapes types its argument Sequence[Shape]).
        shapes = resolve_shapes(spec, parse_shapes(shapes) if isinstance(shapes, str) else shapes,  # type: ignore[arg-type]
                                input_shapes, what="verify", option="--shapes")
    if ov_precision is not None and ov_precision != "f32":
        # The compute precision decides the tolerances when it is lower than the file's (an FP32 file run in bf16).
        from .runners.openvino_runner import PROJECT_PRECISION

        precision = PROJECT_PRECISION[ov_precision]
    tol = resolve_tolerances(precision, atol=atol, rtol=rtol, stat=stat, quantile=quantile)

    # Shapes are checked before anything expensive is built.
    if shapes is not None and not (isinstance(shapes, str) and not shapes.strip()):
        if isinstance(shapes, str) or (shapes and isinstance(next(iter(shapes)), str)):
            sweep = parse_shapes(cast("str | Sequence[str]", shapes))  # text, as the test above found
        else:
            # (batch, H, W) triples: check_user_shapes unpacks each into spec.check_shape(b, h, w).
            sweep = [cast(Shape, tuple(int(v) for v in s)) for s in shapes]
        if not sweep:
            raise UsageError("no shapes given")
        check_user_shapes(sweep, spec, profiles)
        shape_source = "user"
    elif inputs is not None:
        from .inputs import check_inputs

        shape, given = check_inputs(inputs, spec, "the given inputs")
        sweep = [shape]
        check_user_shapes(sweep, spec, profiles)
        shape_source = "given inputs"
    else:
        sweep = engine_shapes(profiles, spec) if profiles is not None else default_shapes(spec)
        shape_source = "default"
        if not sweep:
            raise UsageError("no shape of the default sweep fits this artifact; pass --shapes")
    notes: list[str] = []
    if kind == "onnx":
        from .graph.memory import SizeModel, check_shapes_fit

        sizes = SizeModel(graph, spec)
        check_shapes_fit(graph, spec, sweep, max_memory, sizes=sizes)
        if shape_source == "default":
            sweep, notes = affordable_sweep(sizes, sweep)
        del graph, sizes  # its inline weights are not needed while the runners hold their own

    options = reference_model or ReferenceOptions()
    if reference is not None and options.names_model:
        raise UsageError("--reference replaces the PyTorch model; drop --preset/--config/--model/--checkpoint")
    from .models.loader import source_from_spec

    source = source_from_spec(spec, options) if reference is None else None
    setup: dict[str, float] = {}
    total = 2 * len(sweep) + 2
    step = lambda i, text: progress(text, i, total) if progress else None  # noqa: E731

    # The candidate first: a missing TensorRT should fail before the (slow) reference is built.
    step(0, f"loading {kind}")
    t0 = time.perf_counter()
    cand: Runner
    ort_cand: OrtRunner | None = None
    if kind == "engine":
        from .runners.trt_runner import TrtRunner

        cand = TrtRunner(path)
        cand_desc = f"tensorrt ({precision})"
    elif backend == "openvino":
        from .runners.openvino_runner import OpenVinoRunner

        assert ov_precision is not None
        ov_cand = OpenVinoRunner(path, precision=ov_precision, spec=spec)
        cand = ov_cand
    else:
        from .runners.ort_runner import OrtRunner

        cand = ort_cand = OrtRunner(path, providers=providers, spec=spec,
                                    attention="as-is" if form == "written" else "onnxruntime")
        cand_desc = f"onnxruntime ({ort_cand.provider})"
    cand.activate()
    if backend == "openvino":
        cand_desc = f"{ov_cand.describe()}, the file as written"
    if ort_cand is not None:
        # What ran: the file's own graph, or the serving form (its attention and Winograd convolutions, by count).
        parts = file_parts if form == "written" else ["serving form", *ort_cand.serving_form_parts()]
        cand_desc = f"onnxruntime ({', '.join([ort_cand.provider, *parts])})"
    setup[cand.name] = time.perf_counter() - t0
    # The two never hold memory at once: the reference runs every shape first and is freed before the
    # candidate comes back (its first activation only proved it loads). Peak memory is the larger of the two
    # models, not their sum, at the cost of loading the candidate twice.
    cand.deactivate()
    heap.release()

    t0 = time.perf_counter()
    ref: Any
    if reference is not None:
        step(1, "loading the reference ONNX")
        from .runners.ort_runner import OrtRunner
        from .exporter.foreign import spec_of

        ref = OrtRunner(reference, spec=spec_of(reference, input_ranges=input_ranges),
                        attention="as-is" if form == "written" else "onnxruntime")
        ref.name = "reference"
        ref_desc = f"onnxruntime ({Path(reference).name}, {ref.provider})"
        ref_inputs = {t.name for t in ref.spec.inputs}
        missing = sorted({t.name for t in spec.inputs} ^ ref_inputs)
        if missing:
            raise UsageError(f"--reference {reference} does not take the same inputs (differing: {', '.join(missing)})")
    else:
        step(1, "building the PyTorch reference")
        from .runners.torch_runner import TorchRunner
        from .models.loader import check_reference_fits, load_model

        assert source is not None
        loaded = load_model(source, attention_impl="reference")
        check_reference_fits(spec, loaded.spec)
        ref = TorchRunner.from_loaded(loaded)
        del loaded  # the runner holds the model; it goes with the runner once the reference has run
        if kind == "engine":
            import torch

            if torch.cuda.is_available():
                ref.device = "cuda"  # the engine's shapes can be large; the GPU is there anyway
        ref_desc = f"pytorch ({ref.device})"
    ref.activate()
    setup[ref.name] = time.perf_counter() - t0

    report = VerifyReport(
        artifact=str(path), kind=kind, precision=precision, tolerances=tol, reference=ref_desc,
        candidate=cand_desc, seed=seed, shape_source=shape_source, setup_seconds=setup,
        checkpoint=_checkpoint_info(spec, source) if source is not None else None, model=dict(spec.source or {}),
        timings={ref.name: 0.0, cand.name: 0.0}, notes=notes,
    )
    out_names = [t.name for t in spec.outputs]
    all_feeds = [given] if inputs is not None else [spec.make_inputs(*shape, seed=seed + i) for i, shape in enumerate(sweep)]
    expected: list[dict[str, np.ndarray]] = []
    ref_seconds: list[float] = []
    try:
        for i, shape in enumerate(sweep):
            step(2 + i, f"reference at {format_shape(shape)}")
            feeds = all_feeds[i]
            ref_feeds = {t.name: np.asarray(feeds[t.name]).astype(t.dtype) for t in ref.spec.inputs}
            t0 = time.perf_counter()
            ref_out = ref.infer(ref_feeds)
            ref_seconds.append(time.perf_counter() - t0)
            # The reference names its outputs after its own spec; align them with the artifact's by position.
            expected.append(dict(zip(out_names, ref_out.values())))
    finally:
        ref.deactivate()
    ref_name = ref.name
    del ref
    heap.release()

    t0 = time.perf_counter()
    cand.activate()
    setup[cand.name] += time.perf_counter() - t0
    report.providers = list(ort_cand.providers) if ort_cand is not None else []
    try:
        for i, shape in enumerate(sweep):
            step(2 + len(sweep) + i, f"comparing at {format_shape(shape)}")
            t0 = time.perf_counter()
            cand_out = cand.infer(all_feeds[i])
            seconds = {ref_name: ref_seconds[i], cand.name: time.perf_counter() - t0}
            outputs = compare_outputs(expected[i], {k: np.asarray(v) for k, v in cand_out.items()}, tol, out_names)
            for k, v in seconds.items():
                report.timings[k] += v
            report.shapes.append(ShapeResult(shape=shape, outputs=outputs, seconds=seconds))
    finally:
        cand.deactivate()
    step(total, "done")
    return report


__all__ = [
    "ShapeResult", "VerifyReport", "default_shapes", "engine_shapes", "check_user_shapes", "artifact_kind", "verify",
]
