"""Latency, throughput and peak memory of one artifact on several backends.

``bench`` measures and reports; it never decides pass or fail. For each
backend and shape it warms up, then times single calls through the common
Runner interface (numpy in, numpy out, so every backend pays the same
host-side copies), and records peak host memory growth (VmHWM on Linux) and,
where a CUDA device is visible, peak device memory in use. Each row's
latency ratio is to the fastest PyTorch formulation measured in the same run
at that shape. With isolation (the default) each backend and shape runs in a
fresh process, which also gives the row its total peak memory.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar, cast

import numpy as np

from . import heap
from .host import host_info
from .engines.sidecar import is_engine_path
from .errors import AttnExportError, ProviderUnavailable, UsageError
from .spec import ModelSpec, ReferenceOptions, format_shape

if TYPE_CHECKING:
    from .models.attention import AttentionImpl

# Backend name -> attention formulation of the PyTorch model ("pytorch" uses --attention-impl).
# "pytorch-fp16": the model in FP16 on the GPU (--attention-impl formulation), the baseline for FP16 engines.
# "pytorch-bf16": the model under torch.autocast('cpu', dtype=torch.bfloat16), the eager bf16 baseline on CPUs with
# bf16 units (AVX512_BF16 or AMX).
_R = TypeVar("_R")
TORCH_BACKENDS = {"pytorch": None, "pytorch-fp16": None, "pytorch-bf16": None, "pytorch-reference": "reference",
                  "pytorch-sdpa": "sdpa", "pytorch-decomposed": "decomposed"}
# OpenVINO's CPU plugin at each explicit inference precision; "openvino" names the f32 and bf16 rows (and, where the
# CPU has bf16 units, the pytorch-bf16 baseline beside them).
OPENVINO_BACKENDS = {"openvino-f32": "f32", "openvino-bf16": "bf16", "openvino-f16": "f16"}
# "onnxruntime": the file exactly as written; "onnxruntime-serving": ONNX Runtime's serving form built from it in
# memory (a file from `optimize --for onnxruntime` already is one, and both run it as written).
BACKENDS = tuple(TORCH_BACKENDS) + ("onnxruntime", "onnxruntime-serving", "tensorrt") + tuple(OPENVINO_BACKENDS)
ORT_BACKENDS = {"onnxruntime": "as-is", "onnxruntime-serving": "onnxruntime"}
BACKEND_ALIASES = {"torch": "pytorch", "ort": "onnxruntime", "ort-serving": "onnxruntime-serving", "trt": "tensorrt",
                   "ov": "openvino"}
DEFAULT_ITERATIONS = 10
# Calls whose p90/p10 latency ratio exceeds this were disturbed (a shared machine, frequency changes): say so.
NOISY_SPREAD = 1.5


# ---------------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------------
def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakHostMemory:
    """Peak resident-set growth over a block of code.

    On Linux the kernel's high-water mark (VmHWM) is reset through
    /proc/self/clear_refs, which catches short spikes that polling would miss;
    elsewhere (or if the reset is refused) a thread samples RSS every 2 ms.
    """

    def __init__(self) -> None:
        self.baseline_kib = 0
        self.peak_kib = 0
        self.method = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakHostMemory":
        heap.release()  # an earlier run's garbage must not hide this run's growth
        self.baseline_kib = _status_kib("VmRSS") or 0
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.method = "VmHWM"
        except OSError:
            if self.baseline_kib:
                self.method = "sampled VmRSS"
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        self.peak_kib = self.baseline_kib
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, _status_kib("VmRSS") or 0)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self.method == "VmHWM":
            self.peak_kib = max(self.peak_kib, _status_kib("VmHWM") or 0)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()

    @property
    def growth_mib(self) -> float | None:
        if self.method == "none":
            return None
        return max(0, self.peak_kib - self.baseline_kib) / 1024


class PeakDeviceMemory:
    """Peak device memory in use (whole device, via cudaMemGetInfo) over a block, sampled every 2 ms.

    Works for every backend (PyTorch, ONNX Runtime CUDA, TensorRT) because it
    looks at the device rather than at one allocator; other processes on the
    same GPU would add noise. ``growth_mib`` is None where no CUDA device is visible.
    """

    def __init__(self) -> None:
        self.available = False
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free

    def __enter__(self) -> "PeakDeviceMemory":
        # Only where PyTorch is loaded already (its backends, or a CUDA run): importing it here would add its
        # own ~190 MiB to the host memory measured for ONNX Runtime in the same block.
        torch = sys.modules.get("torch")
        try:
            self.available = torch is not None and torch.cuda.is_available()
        except Exception:  # noqa: BLE001 - a broken CUDA setup just means "not measured"
            self.available = False
        if self.available:
            self.baseline = self.peak = self._used()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._used())

    @property
    def growth_mib(self) -> float | None:
        return (self.peak - self.baseline) / 2**20 if self.available else None


# ---------------------------------------------------------------------------------------------------------------------
# runners
# ---------------------------------------------------------------------------------------------------------------------
def parse_backends(text: str | Sequence[str]) -> list[str]:
    """'pytorch,onnxruntime' -> ['pytorch', 'onnxruntime'], refusing unknown names."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        name = BACKEND_ALIASES.get(item.strip().lower(), item.strip().lower())
        if not name:
            continue
        if name == "openvino":
            from .host import native_bf16

            names = ["openvino-f32", "openvino-bf16"] + (["pytorch-bf16"] if native_bf16() else [])
        elif name not in BACKENDS:
            raise UsageError(f"unknown backend {item!r}; choose from {', '.join(BACKENDS)}, or openvino (its f32 and "
                             "bf16 rows)")
        else:
            names = [name]
        out += [n for n in names if n not in out]
    if not out:
        raise UsageError("no backend given")
    return out


def default_backends(artifact: str | Path, provider: str = "cpu") -> list[str]:
    """PyTorch and every backend attn-export serves the artifact with here: an engine's TensorRT; for an ONNX file
    both ONNX Runtime forms and, on the CPU where OpenVINO is installed, its f32 and bf16 rows (bf16 says why where
    the CPU cannot run it), so that the fastest path shows without being asked for."""
    if is_engine_path(artifact):
        return ["pytorch", "tensorrt"]
    names = ["pytorch", "onnxruntime", "onnxruntime-serving"]
    if provider == "cpu":
        import importlib.util

        if importlib.util.find_spec("openvino") is not None:  # found, not imported: a bench without it stays light
            names += parse_backends("openvino")
    return names


def make_runner(artifact: str | Path, backend: str, spec: ModelSpec, *, provider: str = "cpu",
                threads: int | None = None, attention_impl: str = "sdpa",
                graph_optimization: str = "all",
                reference_model: ReferenceOptions | None = None,
                tuned: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Build the runner for ``backend`` and the settings to report with its results.

    ``tuned`` (from :func:`tuned_form`): the onnxruntime-serving backend runs the form it names, its
    measurements in the settings.
    """
    if backend in TORCH_BACKENDS:
        import torch

        from .runners.torch_runner import TorchRunner
        from .models.loader import source_from_spec

        impl = TORCH_BACKENDS[backend] or attention_impl
        device = "cuda" if provider in ("cuda", "tensorrt") else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ProviderUnavailable(f"--provider {provider} puts PyTorch on CUDA, which torch {torch.__version__} "
                                      "cannot use on this machine; use --provider cpu")
        half = backend == "pytorch-fp16"
        if half and device != "cuda":
            raise UsageError("pytorch-fp16 runs on a CUDA GPU only (--provider cuda); PyTorch's CPU FP16 kernels are no baseline")
        bf16 = backend == "pytorch-bf16"
        if bf16:
            from .host import native_bf16

            if device != "cpu":
                raise UsageError("pytorch-bf16 is the CPU's bf16 autocast baseline; use --provider cpu")
            if not native_bf16():
                raise UsageError("this CPU has no bf16 units (AVX512_BF16 or AMX): PyTorch's bf16 autocast would run "
                                 "emulated, which is no baseline")
        # spec given, so the model is built once (in activate), not also to learn its description.
        torch_runner = TorchRunner(source_from_spec(spec, reference_model), attention_impl=cast("AttentionImpl", impl), device=device,
                                   spec=spec, threads=threads, half=half, autocast_bf16=bf16)
        torch_runner.activate()
        return torch_runner, {"device": device, "attention_impl": impl, "threads": torch.get_num_threads(), "fp16": half,
                              **({"autocast": "bfloat16"} if bf16 else {}), "torch": torch.__version__}
    if backend in ORT_BACKENDS:
        if is_engine_path(artifact):
            raise UsageError(f"the {backend} backend needs the ONNX file; pass the .onnx artifact instead of the engine")
        import onnxruntime as ort

        from .runners.ort_runner import OrtRunner

        attention, winograd = ORT_BACKENDS[backend], True
        if tuned is not None and backend == "onnxruntime-serving":
            attention, winograd = tuned["runner_attention"], tuned["winograd"]
        ort_runner = OrtRunner(artifact, providers=[provider], threads=threads, spec=spec,
                               graph_optimization=graph_optimization, attention=attention, winograd=winograd)
        ort_runner.activate()
        opts = ort_runner.session.get_session_options()
        return ort_runner, {
            "providers": ort_runner.session.get_providers(),
            "provider_options": ort_runner.session.get_provider_options(),
            # 0 means ORT's default: one thread per physical core.
            "threads": opts.intra_op_num_threads or f"default ({os.cpu_count()} cpus)",
            "graph_optimization": graph_optimization,
            "form": "serving" if ort_runner.serving_form_parts() else "as written",
            "attention": spec.attention,
            "serving_form": ort_runner.serving_form_parts(),
            "onnxruntime": ort.__version__,
            **({"form": f"tuned: {tuned['tuning']['chosen']}", "tuning": tuned["tuning"]}
               if tuned is not None and backend == "onnxruntime-serving" else {}),
        }
    if backend in OPENVINO_BACKENDS:
        if is_engine_path(artifact):
            raise UsageError(f"the {backend} backend needs the ONNX file; pass the .onnx artifact instead of the engine")
        if provider != "cpu":
            raise UsageError(f"the {backend} backend runs on the CPU; use --provider cpu")
        from .runners.openvino_runner import OpenVinoRunner  # lazy: OpenVINO is optional

        ov_runner = OpenVinoRunner(artifact, precision=OPENVINO_BACKENDS[backend], threads=threads, spec=spec)
        ov_runner.activate()
        return ov_runner, ov_runner.compiled_settings()
    if backend == "tensorrt":
        if not is_engine_path(artifact):
            raise UsageError("the tensorrt backend needs an engine; build one with `attn-export trt ARTIFACT.onnx` "
                             "and bench the .plan")
        from .runners.trt_runner import TrtRunner  # lazy: raises MissingDependencyError without TensorRT

        trt_runner = TrtRunner(artifact)
        trt_runner.activate()
        return trt_runner, {"precision": trt_runner.precision, "device": "cuda"}
    raise UsageError(f"unknown backend {backend!r}")


# ---------------------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class BenchRow:
    """One backend at one shape."""

    backend: str
    shape: list[int]
    status: str = "ok"
    error: str | None = None
    warmup: int = 0
    iterations: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    throughput_images_per_s: float | None = None
    peak_host_mib: float | None = None     # growth of the resident set during the calls
    total_peak_host_mib: float | None = None  # the backend's whole process at its peak (session, weights included)
    peak_device_mib: float | None = None
    memory_method: str | None = None
    ratio_to_pytorch: float | None = None
    baseline: str | None = None  # the PyTorch backend the ratio is to: the fastest measured at this shape
    ratio_to_file: float | None = None  # onnxruntime-serving only: its median / the file as written's (onnxruntime)
    # With several sessions (--sessions): each fresh process's median call, in the order they ran.
    session_medians_ms: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """mean, median, p10, p90, p99, min, max and coefficient of variation of per-call latencies (milliseconds)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "mean": float(ms.mean()), "median": float(np.median(ms)), "p10": float(np.percentile(ms, 10)),
        "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)), "min": float(ms.min()),
        "max": float(ms.max()), "cv": float(ms.std() / ms.mean()) if ms.mean() > 0 else 0.0,
    }


def is_noisy(latency_ms: dict[str, float]) -> bool:
    """Whether the calls varied too much for the median to be read alone (p90 over p10 above NOISY_SPREAD)."""
    return latency_ms.get("p10", 0) > 0 and latency_ms["p90"] / latency_ms["p10"] > NOISY_SPREAD


def measure(runner: Any, feeds: dict[str, np.ndarray], *, warmup: int = 2, iterations: int | None = None,
            time_budget: float | None = None) -> dict[str, Any]:
    """Warm up, then time calls until ``iterations`` are done or ``time_budget`` seconds have passed (>= 1 call)."""
    if iterations is None and time_budget is None:
        iterations = DEFAULT_ITERATIONS
    batch = int(next(iter(feeds.values())).shape[0])
    with PeakHostMemory() as host, PeakDeviceMemory() as dev:
        for _ in range(warmup):
            runner.infer(feeds)
        times: list[float] = []
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            runner.infer(feeds)
            times.append(time.perf_counter() - t0)
            if iterations is not None and len(times) >= iterations:
                break
            if time_budget is not None and time.perf_counter() - start >= time_budget:
                break
    stats = latency_stats(times)
    return {
        "warmup": warmup, "iterations": len(times), "latency_ms": stats,
        "throughput_images_per_s": batch / (stats["mean"] / 1e3),
        "peak_host_mib": host.growth_mib, "memory_method": host.method, "peak_device_mib": dev.growth_mib,
        "peak_rss_mib": host.peak_kib / 1024 if host.method != "none" else None,
        "calls_s": times,
    }


def _ignore_sigint() -> None:
    # A Ctrl-C reaches the whole process group: the parent stops the child, which must not print its own traceback.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _bench_backend(job: dict[str, Any]) -> list[dict[str, Any]]:
    """One backend at every shape of ``job``; run in a process of its own when isolated.

    Each row records its process's total peak resident memory (``total_peak_host_mib``): the largest of the
    high-water mark before each measurement (session creation and weights) and the peak during the calls.
    """
    spec = ModelSpec.from_dict(job["spec"])
    rows: list[BenchRow] = []
    if job["provider"] in ("cuda", "tensorrt"):
        # Loaded before any measurement: the device memory is read through PyTorch's CUDA runtime.
        import torch  # noqa: F401
    try:
        runner, settings = make_runner(job["artifact"], job["backend"], spec, provider=job["provider"],
                                       threads=job["threads"], attention_impl=job["attention_impl"],
                                       graph_optimization=job["graph_optimization"],
                                       reference_model=job["reference_model"],
                                       tuned=job.get("tuned"))
    except ProviderUnavailable:
        raise  # the device the user named does not exist here: no row can say what was asked
    except (AttnExportError, ImportError) as exc:
        return [asdict(BenchRow(job["backend"], list(shape), status="unavailable", error=str(exc).splitlines()[0]))
                for shape in job["shapes"]]
    total_kib = 0
    try:
        for b, h, w in job["shapes"]:
            row = BenchRow(job["backend"], [b, h, w], settings=settings)
            total_kib = max(total_kib, _status_kib("VmHWM") or 0)
            try:
                row.__dict__.update(measure(runner, spec.make_inputs(b, h, w, seed=job["seed"]), warmup=job["warmup"],
                                            iterations=job["iterations"], time_budget=job["time_budget"]))
            except (AttnExportError, MemoryError, RuntimeError) as exc:
                # ORT and torch raise RuntimeError subclasses when an allocation fails.
                row.status, row.error = "error", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            rows.append(row)
            total_kib = max(total_kib, int(1024 * (row.__dict__.pop("peak_rss_mib", None) or 0)))
    finally:
        runner.deactivate()
    if job["isolated"] and total_kib:
        for row in rows:
            row.total_peak_host_mib = total_kib / 1024
    # The calls themselves too (not a field of the row): sessions of one pair are merged from them.
    return [{**asdict(r), "calls_s": r.__dict__.get("calls_s", [])} for r in rows]


def tuned_form(job: dict[str, Any]) -> dict[str, Any]:
    """The serving form :func:`attn_export.runners.serving_tune.tune_serving_form` keeps at ``job``'s shapes."""
    from .runners.serving_tune import tune_serving_form

    tuning = tune_serving_form(job["artifact"], ModelSpec.from_dict(job["spec"]), [tuple(s) for s in job["shapes"]],
                               provider=job["provider"], threads=job["threads"],
                               graph_optimization=job["graph_optimization"])
    return {"runner_attention": tuning.chosen.runner_attention, "winograd": tuning.chosen.winograd,
            "tuning": tuning.to_dict()}


def _in_own_process(job: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`_bench_backend` in a fresh interpreter (spawn), so neither another backend's libraries and arenas
    nor a larger shape's activations count in this row's total; a process that dies (killed for memory, a
    crash in native code) is an error row, not a hang."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        return _run_in_own_process(_bench_backend, job)
    except BrokenProcessPool:
        return [asdict(BenchRow(job["backend"], list(shape), status="error",
                                error="its process died (killed for memory, or a crash in native code)"))
                for shape in job["shapes"]]


def _run_in_own_process(fn: Callable[[dict[str, Any]], _R], job: dict[str, Any]) -> _R:
    """``fn(job)`` in a fresh interpreter (spawn); BrokenProcessPool when that process dies."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint) as pool:
        return pool.submit(fn, job).result()


def run_bench(artifact: str | Path, *, backends: Sequence[str] | None = None,
              shapes: Sequence[tuple[int, int, int]] | None = None, warmup: int = 2, iterations: int | None = None,
              time_budget: float | None = None, threads: int | None = None, provider: str = "cpu",
              attention_impl: str = "sdpa", graph_optimization: str = "all", seed: int = 0,
              progress: Any = None, reference_model: ReferenceOptions | None = None,
              max_memory: int | None = None, isolate: bool = True,
              input_ranges: dict[str, tuple[float, float]] | None = None, tune: bool = False,
              sessions: int = 1) -> dict[str, Any]:
    """Benchmark ``artifact`` on each backend at each shape; returns the JSON-ready report.

    ``isolate``: each backend runs each shape in a fresh process of its own,
    so its row can report the total peak memory a deployer pays for it at
    that shape (interpreter, libraries, session, weights, activations),
    beside the growth during the calls. The
    default shape is batch 1 at the model's own sample size. Each row's ratio
    is to the fastest PyTorch formulation measured at that shape.

    ``tune``: the onnxruntime-serving backend runs, at each shape, the form
    that measured fastest there among the file as written and its rewrites
    (what ``optimize --for onnxruntime --tune --shapes`` would write for it).

    ``sessions``: each backend and shape is measured in this many fresh
    processes, in rounds whose order alternates (forward, then reversed), and
    its median is the median of the sessions' medians (p10-p90 and the mean
    over all calls): one session of the same graph can be 40 % slower than the
    next on a shared machine, each steady within itself.

    A backend that cannot run here (TensorRT without a GPU, say) is reported
    with status "unavailable" and its reason; the others still run.
    """
    from .shapes import sample_shape

    if iterations is not None and time_budget is not None:
        raise UsageError("give --iterations or --time-budget, not both")
    if iterations is not None and iterations < 1:
        raise UsageError("--iterations must be at least 1")
    if warmup < 0:
        raise UsageError("--warmup must be 0 or more")
    if sessions < 1:
        raise UsageError("--sessions must be at least 1")
    if sessions > 1 and not isolate:
        raise UsageError("--sessions counts fresh processes: it needs --isolate")
    impls = sorted({impl for impl in TORCH_BACKENDS.values() if impl})  # the formulations PyTorch models take
    if attention_impl not in impls:
        raise UsageError(f"--attention-impl must be one of {', '.join(impls)} (got {attention_impl!r})")
    if graph_optimization not in ("disable", "basic", "extended", "all"):
        raise UsageError(f"--graph-optimization must be disable, basic, extended or all (got {graph_optimization!r})")
    from .engines.sidecar import artifact_spec

    spec = artifact_spec(artifact)
    if input_ranges:  # the inputs every backend gets are drawn in these ranges
        spec.input_ranges = {**spec.input_ranges, **{k: [float(v[0]), float(v[1])] for k, v in input_ranges.items()}}
    backends = list(backends) if backends else default_backends(artifact, provider)
    if tune and "onnxruntime-serving" not in backends:
        raise UsageError("--tune tunes the onnxruntime-serving backend: add it to --backend")
    if not shapes and is_engine_path(artifact):
        from .engines.sidecar import read_sidecar, sidecar_profiles

        # The shapes the engine was tuned for: each profile's opt.
        shapes = list(dict.fromkeys((int(p.opt[0]), int(p.opt[1]), int(p.opt[2])) for p in sidecar_profiles(read_sidecar(Path(artifact)))))
    if not shapes:
        shapes = [sample_shape(spec)]
    for b, h, w in shapes:
        spec.check_shape(b, h, w)
    if not is_engine_path(artifact):
        from .exporter.metadata import load_onnx
        from .graph.memory import check_shapes_fit

        check_shapes_fit(load_onnx(artifact, load_external_data=False), spec, shapes, max_memory)
    job: dict[str, Any] = {"artifact": str(artifact), "spec": spec.to_dict(), "shapes": [tuple(s) for s in shapes], "provider": provider,
           "threads": threads, "attention_impl": attention_impl, "graph_optimization": graph_optimization,
           "reference_model": reference_model, "seed": seed, "warmup": warmup, "iterations": iterations,
           "time_budget": time_budget, "isolated": isolate, "tune": tune}
    results: list[dict[str, Any]] = []
    if not isolate:
        for backend in backends:
            if progress:
                progress(f"{backend} {', '.join(format_shape(s) for s in shapes)}")
            tuned = tuned_form(job) if tune and backend == "onnxruntime-serving" else None
            results.extend(_merge_sessions([[r] for r in _bench_backend({**job, "backend": backend, "tuned": tuned})]))
    else:
        results = _isolated_rounds(job, backends, shapes, sessions, tune, progress)
    _fill_ratios(results)
    return {
        "tool": "attn-export bench",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "artifact": str(artifact),
        "model": {"source": spec.source.get("preset") or spec.source.get("kind"), "attention": spec.attention,
                  "precision": spec.precision},
        "host": host_info(),
        "settings": {"warmup": warmup, "iterations": iterations, "time_budget_s": time_budget, "threads": threads,
                     "provider": provider, "attention_impl": attention_impl, "graph_optimization": graph_optimization,
                     "seed": seed, "isolated": isolate, "tune": tune, "sessions": sessions},
        "results": results,
        "fastest": fastest_paths(results),
    }


def _isolated_rounds(job: dict[str, Any], backends: Sequence[str], shapes: Sequence[tuple[int, int, int]],
                     sessions: int, tune: bool, progress: Any) -> list[dict[str, Any]]:
    """Every backend at every shape in processes of their own, ``sessions`` rounds, one row per pair."""
    from concurrent.futures.process import BrokenProcessPool

    pairs = [(backend, tuple(shape)) for backend in backends for shape in shapes]
    jobs: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
    done: dict[tuple[str, tuple[int, ...]], list[dict[str, Any]]] = {pair: [] for pair in pairs}
    for backend, shape in pairs:
        one = {**job, "backend": backend, "shapes": [shape]}
        if tune and backend == "onnxruntime-serving":
            if progress:
                progress(f"{backend} {format_shape(shape)}: tuning")
            # In a process of its own too: the candidates' sessions must not count in the row's peak memory.
            try:
                one["tuned"] = _run_in_own_process(tuned_form, one)
            except (AttnExportError, BrokenProcessPool) as exc:
                why = str(exc).splitlines()[0] if str(exc) else "its process died"
                done[(backend, shape)].append(asdict(BenchRow(backend, list(shape), status="error",
                                                              error=f"tuning: {why}")))
                continue
        jobs[(backend, shape)] = one
    for round_ in range(sessions):
        # Alternate the order so that no pair always runs first (a cold cache) or last (a warm, throttled core).
        for pair in pairs if round_ % 2 == 0 else pairs[::-1]:
            rows = done[pair]
            if pair not in jobs or (rows and rows[-1]["status"] != "ok"):
                continue  # tuning failed, or the backend cannot run here: once is enough to say so
            if progress:
                progress(f"{pair[0]} {format_shape(pair[1])}"
                         + (f" (session {round_ + 1} of {sessions})" if sessions > 1 else ""))
            rows.extend(_in_own_process(jobs[pair]))
    return _merge_sessions([done[pair] for pair in pairs])


def _merge_sessions(per_pair: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per backend and shape from its sessions' rows: the median of their medians, the statistics of all
    their calls, the largest memory figures; a failed session makes the row that failure."""
    merged = []
    for rows in per_pair:
        failed = next((r for r in rows if r["status"] != "ok"), None)
        if failed is not None or len(rows) == 1:
            row = dict(failed or rows[0])
            row.pop("calls_s", None)
            merged.append(row)
            continue
        row = dict(rows[0])
        calls = [t for r in rows for t in r["calls_s"]]
        row.update(measured_over_sessions(calls, [r["latency_ms"]["median"] for r in rows], int(row["shape"][0])))
        row["iterations"] = len(calls)
        for key in ("peak_host_mib", "total_peak_host_mib", "peak_device_mib"):
            values = [r[key] for r in rows if r.get(key) is not None]
            row[key] = max(values) if values else None
        row.pop("calls_s", None)
        merged.append(row)
    return merged


def measured_over_sessions(calls_s: Sequence[float], session_medians_ms: Sequence[float],
                           batch: int) -> dict[str, Any]:
    """Latency statistics of calls made in several sessions: all calls' spread and mean, the sessions' median."""
    stats = latency_stats(calls_s)
    stats["median"] = float(np.median(session_medians_ms))
    return {"latency_ms": stats, "throughput_images_per_s": batch / (stats["mean"] / 1e3),
            "session_medians_ms": [round(float(m), 3) for m in session_medians_ms]}


def _fill_ratios(rows: list[dict[str, Any]]) -> None:
    """Latency median / the fastest PyTorch backend's median at the same shape, and which backend that was."""
    fastest: dict[tuple[int, ...], tuple[float, str]] = {}
    for r in rows:
        if r["backend"] in TORCH_BACKENDS and r["status"] == "ok":
            key, median = tuple(r["shape"]), r["latency_ms"]["median"]
            if key not in fastest or median < fastest[key][0]:
                fastest[key] = (median, r["backend"])
    files = {tuple(r["shape"]): r["latency_ms"]["median"] for r in rows
             if r["backend"] == "onnxruntime" and r["status"] == "ok"}
    for r in rows:
        base = fastest.get(tuple(r["shape"]))
        if r["status"] == "ok" and base:
            r["ratio_to_pytorch"] = r["latency_ms"]["median"] / base[0]
            r["baseline"] = base[1]
        file_ms = files.get(tuple(r["shape"]))
        if r["status"] == "ok" and r["backend"] == "onnxruntime-serving" and file_ms:
            r["ratio_to_file"] = r["latency_ms"]["median"] / file_ms


# PyTorch eager in FP32: the formulations the goal ratios are to (pytorch-bf16 and -fp16 are ratios of their own).
FP32_TORCH_BACKENDS = ("pytorch", "pytorch-sdpa", "pytorch-decomposed", "pytorch-reference")


def fastest_paths(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape, the fastest backend attn-export serves with (any but PyTorch's), and its time against PyTorch
    eager FP32 (the fastest formulation measured) and against PyTorch's bf16 autocast, where those ran."""
    def fastest(names: Sequence[str] | None, shape: list[int]) -> dict[str, Any] | None:
        ok = [r for r in rows if r["status"] == "ok" and r["shape"] == shape
              and (r["backend"] not in TORCH_BACKENDS if names is None else r["backend"] in names)]
        return min(ok, key=lambda r: r["latency_ms"]["median"], default=None)

    out = []
    for shape in [list(s) for s in dict.fromkeys(tuple(r["shape"]) for r in rows)]:
        best = fastest(None, shape)
        if best is None:
            continue
        ms = best["latency_ms"]["median"]
        entry: dict[str, Any] = {"shape": shape, "backend": best["backend"], "median_ms": ms}
        for key, names in (("to_pytorch_fp32", FP32_TORCH_BACKENDS), ("to_pytorch_bf16", ("pytorch-bf16",))):
            base = fastest(names, shape)
            entry[key] = ms / base["latency_ms"]["median"] if base else None
        out.append(entry)
    return out


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """Write the report atomically."""
    from .atomic import write_text_atomic

    write_text_atomic(path, json.dumps(report, indent=2, sort_keys=False) + "\n")
