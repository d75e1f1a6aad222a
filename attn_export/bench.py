"""Latency, throughput and peak memory of one artifact on several backends.

``bench`` measures and reports; it never decides pass or fail. For each
backend and shape it warms up, then times single calls through the common
Runner interface (numpy in, numpy out, so every backend pays the same
host-side copies), and records peak host memory growth (VmHWM on Linux) and,
where a CUDA device is visible, peak device memory in use. The PyTorch
reference measured in the same run gives each row its latency ratio.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, cast

import numpy as np

from . import heap
from .engines.sidecar import is_engine_path
from .errors import AttnExportError, ProviderUnavailable, UsageError
from .spec import ModelSpec, ReferenceOptions, format_shape

if TYPE_CHECKING:
    from .models.attention import AttentionImpl

# Backend name -> attention formulation of the PyTorch model ("pytorch" uses --attention-impl).
# "pytorch-fp16": the model in FP16 on the GPU (--attention-impl formulation), the baseline for FP16 engines.
TORCH_BACKENDS = {"pytorch": None, "pytorch-fp16": None, "pytorch-reference": "reference", "pytorch-sdpa": "sdpa",
                  "pytorch-decomposed": "decomposed"}
BACKENDS = tuple(TORCH_BACKENDS) + ("onnxruntime", "tensorrt")
BACKEND_ALIASES = {"torch": "pytorch", "ort": "onnxruntime", "trt": "tensorrt"}
DEFAULT_ITERATIONS = 10


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
        try:
            import torch

            self.available = torch.cuda.is_available()
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
def artifact_spec(path: str | Path) -> ModelSpec:
    """The ModelSpec of an ONNX file or of a TensorRT engine (from its sidecar)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"artifact not found: {p}")
    if is_engine_path(p):
        from .engines.sidecar import read_sidecar  # lazy: the engine side is optional

        return ModelSpec.from_dict(read_sidecar(p)["model"])
    from .exporter.metadata import read_spec

    return read_spec(p)


def parse_backends(text: str | Sequence[str]) -> list[str]:
    """'pytorch,onnxruntime' -> ['pytorch', 'onnxruntime'], refusing unknown names."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        name = BACKEND_ALIASES.get(item.strip().lower(), item.strip().lower())
        if not name:
            continue
        if name not in BACKENDS:
            raise UsageError(f"unknown backend {item!r}; choose from {', '.join(BACKENDS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise UsageError("no backend given")
    return out


def default_backends(artifact: str | Path) -> list[str]:
    return ["pytorch", "tensorrt"] if is_engine_path(artifact) else ["pytorch", "onnxruntime"]


def make_runner(artifact: str | Path, backend: str, spec: ModelSpec, *, provider: str = "cpu",
                threads: int | None = None, attention_impl: str = "reference",
                graph_optimization: str = "all",
                reference_model: ReferenceOptions | None = None) -> tuple[Any, dict[str, Any]]:
    """Build the runner for ``backend`` and the settings to report with its results."""
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
        # spec given, so the model is built once (in activate), not also to learn its description.
        torch_runner = TorchRunner(source_from_spec(spec, reference_model), attention_impl=cast("AttentionImpl", impl), device=device,
                                   spec=spec, threads=threads, half=half)
        torch_runner.activate()
        return torch_runner, {"device": device, "attention_impl": impl, "threads": torch.get_num_threads(), "fp16": half,
                        "torch": torch.__version__}
    if backend == "onnxruntime":
        if is_engine_path(artifact):
            raise UsageError("the onnxruntime backend needs the ONNX file; pass the .onnx artifact instead of the engine")
        import onnxruntime as ort

        from .runners.ort_runner import OrtRunner

        ort_runner = OrtRunner(artifact, providers=[provider], threads=threads, spec=spec,
                               graph_optimization=graph_optimization)
        ort_runner.activate()
        opts = ort_runner.session.get_session_options()
        return ort_runner, {
            "providers": ort_runner.session.get_providers(),
            "provider_options": ort_runner.session.get_provider_options(),
            # 0 means ORT's default: one thread per physical core.
            "threads": opts.intra_op_num_threads or f"default ({os.cpu_count()} cpus)",
            "graph_optimization": graph_optimization,
            "attention": spec.attention,
            "serving_form": ort_runner.serving_form_parts(),
            "onnxruntime": ort.__version__,
        }
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
    peak_host_mib: float | None = None
    peak_device_mib: float | None = None
    memory_method: str | None = None
    ratio_to_pytorch: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """mean, median, p90, p99, min, max of per-call latencies, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "mean": float(ms.mean()), "median": float(np.median(ms)), "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)), "min": float(ms.min()), "max": float(ms.max()),
    }


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
    }


def run_bench(artifact: str | Path, *, backends: Sequence[str] | None = None,
              shapes: Sequence[tuple[int, int, int]] | None = None, warmup: int = 2, iterations: int | None = None,
              time_budget: float | None = None, threads: int | None = None, provider: str = "cpu",
              attention_impl: str = "reference", graph_optimization: str = "all", seed: int = 0,
              progress: Any = None, reference_model: ReferenceOptions | None = None,
              max_memory: int | None = None) -> dict[str, Any]:
    """Benchmark ``artifact`` on each backend at each shape; returns the JSON-ready report.

    A backend that cannot run here (TensorRT without a GPU, say) is reported
    with status "unavailable" and its reason; the others still run.
    """
    if iterations is not None and time_budget is not None:
        raise UsageError("give --iterations or --time-budget, not both")
    if iterations is not None and iterations < 1:
        raise UsageError("--iterations must be at least 1")
    if warmup < 0:
        raise UsageError("--warmup must be 0 or more")
    spec = artifact_spec(artifact)
    backends = list(backends) if backends else default_backends(artifact)
    if not shapes:
        if len(spec.export_shape) != 3:
            raise UsageError(f"{artifact} records no export size; pass --shapes")
        shapes = [(1, int(spec.export_shape[1]), int(spec.export_shape[2]))]
    for b, h, w in shapes:
        spec.check_shape(b, h, w)
    if not is_engine_path(artifact):
        from .exporter.metadata import load_onnx
        from .graph.memory import check_shapes_fit

        check_shapes_fit(load_onnx(artifact, load_external_data=False), spec, shapes, max_memory)
    rows: list[BenchRow] = []
    for backend in backends:
        try:
            runner, settings = make_runner(artifact, backend, spec, provider=provider, threads=threads,
                                           attention_impl=attention_impl, graph_optimization=graph_optimization,
                                           reference_model=reference_model)
        except ProviderUnavailable:
            raise  # the device the user named does not exist here: no row can say what was asked
        except (AttnExportError, ImportError) as exc:
            for shape in shapes:
                rows.append(BenchRow(backend, list(shape), status="unavailable", error=str(exc).splitlines()[0]))
            continue
        try:
            for b, h, w in shapes:
                if progress:
                    progress(f"{backend} {format_shape((b, h, w))}")
                row = BenchRow(backend, [b, h, w], settings=settings)
                try:
                    row.__dict__.update(measure(runner, spec.make_inputs(b, h, w, seed=seed), warmup=warmup,
                                                iterations=iterations, time_budget=time_budget))
                except (AttnExportError, MemoryError, RuntimeError) as exc:
                    # ORT and torch raise RuntimeError subclasses when an allocation fails.
                    row.status, row.error = "error", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                rows.append(row)
        finally:
            runner.deactivate()
    _fill_ratios(rows)
    return {
        "tool": "attn-export bench",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "artifact": str(artifact),
        "model": {"source": spec.source.get("preset") or spec.source.get("kind"), "attention": spec.attention,
                  "precision": spec.precision},
        "host": host_info(),
        "settings": {"warmup": warmup, "iterations": iterations, "time_budget_s": time_budget, "threads": threads,
                     "provider": provider, "attention_impl": attention_impl, "graph_optimization": graph_optimization,
                     "seed": seed},
        "results": [asdict(r) for r in rows],
    }


def _fill_ratios(rows: list[BenchRow]) -> None:
    """Latency median / the PyTorch reference's median at the same shape (the first torch backend measured)."""
    ref: dict[tuple[int, ...], float] = {}
    for r in rows:
        if r.backend in TORCH_BACKENDS and r.status == "ok" and tuple(r.shape) not in ref:
            ref[tuple(r.shape)] = r.latency_ms["median"]
    for r in rows:
        base = ref.get(tuple(r.shape))
        if r.status == "ok" and base:
            r.ratio_to_pytorch = r.latency_ms["median"] / base


def host_info() -> dict[str, Any]:
    """Versions and machine facts that a reader needs to interpret the numbers."""
    cpu = _cpu_fields()
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "processor": _cpu_model(cpu), **_cpu_features(cpu)}
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(Exception):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    with contextlib.suppress(Exception):
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    return info


def _cpu_fields() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo, key to value (empty where it cannot be read)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return fields


def _cpu_model(fields: dict[str, str]) -> str:
    return fields.get("model name") or platform.processor()


# The widest vector units decide which kernels ONNX Runtime's MLAS and PyTorch's oneDNN pick; the model name alone
# ("AMD EPYC") does not tell an AVX2 host from an AVX-512 one, and their ratios differ.
_SIMD_LEVELS = ("avx512f", "avx2", "avx", "sse4_2", "asimd")


def _cpu_features(fields: dict[str, str]) -> dict[str, Any]:
    """CPU family/model and the widest SIMD level (none where /proc/cpuinfo could not be read)."""
    if not fields:
        return {}
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    info: dict[str, Any] = {"simd": next((f for f in _SIMD_LEVELS if f in flags), "unknown")}
    if "cpu family" in fields and "model" in fields:
        info["cpu_family_model"] = f"{fields['cpu family']}/{fields['model']}"
    return info


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """Write the report atomically."""
    from .atomic import write_text_atomic

    write_text_atomic(path, json.dumps(report, indent=2, sort_keys=False) + "\n")
