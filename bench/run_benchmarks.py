#!/usr/bin/env python
"""Produce docs/benchmarks.md: ddpm-cifar10 on this machine's CPU, PyTorch eager vs ONNX Runtime.

    python bench/run_benchmarks.py                      # full run (about 15 minutes on 2 cores)
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

# (label, backend kind, options). Torch kinds take an attention formulation; ORT kinds an export and session options.
MAIN_VARIANTS = [
    ("PyTorch eager, reference attention", "torch", {"impl": "reference"}),
    ("PyTorch eager, sdpa", "torch", {"impl": "sdpa"}),
    ("PyTorch eager, decomposed", "torch", {"impl": "decomposed"}),
    ("ORT, Attention op export", "ort", {"export": "op"}),
    ("ORT, decomposed export", "ort", {"export": "decomposed"}),
]
# Things tried to make ORT faster, at the sizes where they are cheap to measure.
TUNING_VARIANTS = [
    ("ORT op, ORT default threads", "ort", {"export": "op", "threads_ort": 0}),
    ("ORT op, graph opt basic", "ort", {"export": "op", "opt": "basic"}),
    ("ORT op, graph opt disabled", "ort", {"export": "op", "opt": "disable"}),
    ("ORT op, no CPU memory arena", "ort", {"export": "op", "arena": False}),
]
# warmup, iterations per size: enough for a stable median without spending the whole budget at 256 px.
SCHEDULE = {32: (2, 10), 64: (1, 5), 128: (1, 3), 256: (1, 3)}
QUICK_SCHEDULE = {32: (1, 5), 64: (1, 2), 128: (0, 1), 256: (0, 1)}


# ---------------------------------------------------------------------------------------------------------------------
# worker (runs in a subprocess)
# ---------------------------------------------------------------------------------------------------------------------
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
    if job["kind"] == "torch":
        from attn_export.runners.torch_runner import TorchRunner
        from attn_export.models.loader import source_from_spec

        runner = TorchRunner(source_from_spec(spec), attention_impl=job["impl"], spec=spec, threads=threads)
        settings = {"threads": torch.get_num_threads(), "attention_impl": job["impl"]}
    else:
        runner = _ort_runner(job, spec)
        settings = {"threads": job.get("threads_ort", threads), "opt": job.get("opt", "all"),
                    "arena": job.get("arena", True)}
    runner.activate()
    load_s = time.perf_counter() - t0
    result = measure(runner, feeds, warmup=job["warmup"], iterations=job["iterations"])
    result.update(load_s=load_s, settings=settings)
    return result


def interleaved_worker(job: dict[str, Any]) -> dict[str, Any]:
    """PyTorch (reference attention) and ORT (Attention op) called alternately in one process.

    On a shared machine, load from other jobs changes over minutes; alternating
    the two backends call by call exposes both to the same conditions, which
    makes their ratio much more trustworthy than two separate cells.
    """
    import numpy as np
    import torch

    from attn_export.runners.torch_runner import TorchRunner
    from attn_export.models.loader import source_from_spec
    from attn_export.spec import ModelSpec

    threads = job["threads"]
    torch.set_num_threads(threads)
    spec = ModelSpec.from_dict(job["spec"])
    pt = TorchRunner(source_from_spec(spec), attention_impl="reference", spec=spec, threads=threads).activate()
    ort_runner = _ort_runner(job, spec).activate()
    feeds = spec.make_inputs(1, job["size"], job["size"], seed=0)
    for _ in range(2):
        pt.infer(feeds), ort_runner.infer(feeds)
    times: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
    for _ in range(job["pairs"]):
        for name, r in (("pytorch", pt), ("onnxruntime", ort_runner)):
            t0 = time.perf_counter()
            r.infer(feeds)
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    return {"size": job["size"], "threads": threads, "pairs": job["pairs"], "median_ms": med,
            "min_ms": {k: min(v) * 1e3 for k, v in times.items()}, "ratio": med["onnxruntime"] / med["pytorch"]}


def _ort_runner(job: dict[str, Any], spec: Any) -> Any:
    import onnxruntime as ort

    from attn_export.runners.ort_runner import OrtRunner

    class TunedOrtRunner(OrtRunner):
        """OrtRunner with the extra session switches tried here (memory arena)."""

        def _activate(self) -> None:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.intra_op_num_threads = job.get("threads_ort", job["threads"])
            opts.enable_cpu_mem_arena = job.get("arena", True)
            levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                      "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                      "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                      "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
            opts.graph_optimization_level = levels[job.get("opt", "all")]
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])

    return TunedOrtRunner(job["onnx"], spec=spec)


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


def attention_need_gib(size: int, kind: str, impl_or_export: str) -> float:
    """Rough peak memory of one forward at batch 1: ~1.5 GiB of weights, activations and runtime,
    plus the live N x N fp32 matrices of the largest attention block (3 for the reference: product,
    scaled product, softmax; 2 for the others)."""
    n = (size // ATTN_DOWNSAMPLE) ** 2
    copies = 3 if (kind == "torch" and impl_or_export == "reference") else 2
    return 1.5 + copies * n * n * 4 / 2**30


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
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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


def matmul_peak(threads: int, n: int = 2048, runs: int = 15) -> dict[str, Any]:
    """Single-precision matmul throughput (GFLOP/s) of torch.matmul n x n on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.matmul(a, b)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t0)
    flops = 2 * n**3
    return {"n": n, "threads": threads, "runs": runs, "median_s": statistics.median(times),
            "gflops_median": flops / statistics.median(times) / 1e9, "gflops_best": flops / min(times) / 1e9}


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
    from attn_export.exporter.metadata import read_spec

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
    spec = read_spec(onnx_paths["op"]).to_dict()
    report["macs"] = mac_counts(onnx_paths["op"], [int(v) for v in args.sizes.split(",")])
    guard = min(args.guard_gib, 0.8 * _mem_available_gib())
    report["memory_guard_gib"] = guard
    schedule = QUICK_SCHEDULE if args.quick else SCHEDULE
    rows = []
    sizes = [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        variants = MAIN_VARIANTS + (TUNING_VARIANTS if size <= args.tune_up_to else [])
        if size >= 256 and args.skip_decomposed_torch_at_256:
            variants = [v for v in variants if v[2].get("impl") != "decomposed"]
        warmup, iterations = schedule[size]
        for label, kind, opts in variants:
            form = opts.get("impl") or opts.get("export")
            need = attention_need_gib(size, kind, form)
            row: dict[str, Any] = {"size": size, "label": label, "kind": kind, "opts": opts, "estimate_gib": need}
            if need > guard:
                row.update(status="not run", error=f"not run: would need about {need:.1f} GiB (guard {guard:.1f} GiB)")
            else:
                job = {"kind": kind, "spec": spec, "shape": [1, size, size], "threads": args.threads,
                       "warmup": warmup, "iterations": iterations, **opts}
                if kind == "torch":
                    job["impl"] = opts["impl"]
                else:
                    job["onnx"] = onnx_paths[opts["export"]]
                print(f"{size:>4} px  {label} ...", end=" ", flush=True)
                row.update(run_job(job, guard, args.timeout))
                med = row.get("latency_ms", {}).get("median")
                print(f"{row['status']} {'' if med is None else f'{med:.1f} ms'}", flush=True)
            rows.append(row)
            report["rows"] = rows
            Path(args.json).write_text(json.dumps(report, indent=1))
    report["elapsed_s"] = time.perf_counter() - started
    Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def run_interleaved(args: argparse.Namespace, report: dict[str, Any]) -> list[dict[str, Any]]:
    """The alternating PyTorch/ORT check at each SIZE:THREADS of ``--interleaved``."""
    from attn_export.exporter.metadata import read_spec

    onnx_op = report["export"]["op"]["path"]
    spec = read_spec(onnx_op).to_dict()
    out = []
    for item in [i for i in args.interleaved.split(",") if i.strip()]:
        size, threads = (int(v) for v in item.split(":"))
        pairs = {32: 15, 64: 5}.get(size, 2)
        job = {"kind": "interleaved", "spec": spec, "size": size, "threads": threads, "pairs": pairs,
               "onnx": onnx_op, "threads_ort": threads}
        print(f"interleaved {size} px, {threads} thread(s) ...", end=" ", flush=True)
        row = run_job(job, args.guard_gib, args.timeout)
        print(row["status"], f"ratio {row.get('ratio', float('nan')):.2f}", flush=True)
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------------------------
def _fmt(v: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{unit}"


def render(report: dict[str, Any]) -> str:
    """docs/benchmarks.md from a saved report."""
    host, ver = report["host"], report["versions"]
    date = report["date"][:10]
    th = report["threads"]
    stamp = (f"Command: `{report['command']}` · date {date} · torch {ver['torch']}, onnxruntime {ver['onnxruntime']} · "
             f"{host.get('processor', '?')}, {host.get('cpu_count')} CPUs · threads: torch.set_num_threads({th}), "
             f"ORT intra_op_num_threads={th} unless stated · batch 1, fp32, inputs from ModelSpec.make_inputs(seed=0).")
    rows = report.get("rows", [])
    peak = report["matmul_peak"]
    sizes_all = sorted({r["size"] for r in rows})
    if "macs" not in report:  # a report saved before the counts were recorded: count from its export
        report["macs"] = mac_counts(report["export"]["op"]["path"], sizes_all)
    gmac = {int(s): c["gmac"] for s, c in report["macs"].items()}
    L: list[str] = []
    a = L.append
    a("# Benchmarks: ddpm-cifar10 on CPU (PyTorch eager vs ONNX Runtime)\n")
    a("Produced by `bench/run_benchmarks.py`; the numbers below are from one run on a shared 2-core machine "
      "(the *load avg* column shows whether other jobs competed for the cores); treat differences under "
      "~10-20 % as noise. "
      "Each cell is one subprocess: model build, warm-up, then timed calls through the Runner interface "
      "(numpy in, numpy out). Memory is the peak RSS growth during warm-up and timed calls "
      "(`/proc/self/clear_refs` + VmHWM), i.e. activations and workspace, not weights.\n")
    a("## Latency and memory\n")
    a(stamp + "\n")
    sizes = sorted({r["size"] for r in rows})
    ref_med = {s: next((r["latency_ms"]["median"] for r in rows if r["size"] == s and r["status"] == "ok"
                        and r["opts"].get("impl") == "reference"), None) for s in sizes}
    a("| size | backend | median ms | mean ms | p90 ms | timed calls | ratio to PyTorch reference | achieved GFLOP/s | "
      "% of matmul peak | peak RSS growth | load avg (max) |")
    a("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["label"] not in [v[0] for v in MAIN_VARIANTS]:
            continue
        s = r["size"]
        if r["status"] != "ok":
            a(f"| {s}×{s} | {r['label']} | {r.get('error', r['status'])} | | | | | | | | {_fmt(r.get('load_max'))} |")
            continue
        lat = r["latency_ms"]
        gflops = 2 * gmac[s] / (lat["median"] / 1e3)
        ratio = lat["median"] / ref_med[s] if ref_med.get(s) else None
        a(f"| {s}×{s} | {r['label']} | {lat['median']:.1f} | {lat['mean']:.1f} | {lat['p90']:.1f} | {r['iterations']} | "
          f"{_fmt(ratio, '.2f', '×')} | {gflops:.1f} | {100 * gflops / peak['gflops_median']:.0f} % | "
          f"{_fmt(r.get('peak_host_mib'), '.0f', ' MiB')} | {_fmt(r.get('load_max'))} |")
    a("")
    a("*load avg (max)*: the highest 1-minute load average seen during the cell (2 CPUs; the measurement itself "
      "contributes about 2). Values well above 2 mean other jobs competed for the cores.\n")
    a("GFLOP per image = 2 × the multiply-accumulates of Conv, Gemm and attention (Q·Kᵀ, P·V) counted from the "
      "exported graph at each size by `attn_export.graph.flops.count_macs` (`python bench/flops.py FILE.onnx`) "
      f"({', '.join(f'{s}: {2 * gmac[s]:.1f}' for s in sorted(gmac))}). "
      f"Matmul peak of this machine: torch.matmul {peak['n']}×{peak['n']} fp32 on {peak['threads']} threads, median of "
      f"{peak['runs']} runs: **{peak['gflops_median']:.1f} GFLOP/s** (best run {peak['gflops_best']:.1f}).\n")

    # Goal check.
    a("## Goal check\n")
    a("Goal: ONNX Runtime at most 0.8× PyTorch eager latency at every size; attention memory that "
      "does not grow with the square of H·W at 256 px.\n")
    a("| size | best ORT median ms | PyTorch reference median ms | ratio | ≤ 0.8×? | best PyTorch (any formulation) | ratio to that |")
    a("|---|---|---|---|---|---|---|")
    for s in sizes:
        ort = [r for r in rows if r["size"] == s and r["status"] == "ok" and r["kind"] == "ort"
               and r["label"] in [v[0] for v in MAIN_VARIANTS]]
        tor = [r for r in rows if r["size"] == s and r["status"] == "ok" and r["kind"] == "torch"]
        if not ort or not ref_med.get(s):
            a(f"| {s}×{s} | not measured | | | | | |")
            continue
        best = min(ort, key=lambda r: r["latency_ms"]["median"])
        bt = min(tor, key=lambda r: r["latency_ms"]["median"])
        ratio = best["latency_ms"]["median"] / ref_med[s]
        ratio2 = best["latency_ms"]["median"] / bt["latency_ms"]["median"]
        a(f"| {s}×{s} | {best['latency_ms']['median']:.1f} ({best['label']}) | {ref_med[s]:.1f} | {ratio:.2f}× | "
          f"{'yes' if ratio <= 0.8 else 'no'} | {bt['latency_ms']['median']:.1f} ({bt['label']}) | {ratio2:.2f}× |")
    a("")
    a("Attention matrix per block for this model (attention sits at level 1, so a 256×256 input gives 128×128 "
      "feature maps, N = 16,384 tokens): "
      + ", ".join(f"{s}×{s} → N = {(s // 2) ** 2:,}, {((s // 2) ** 2) ** 2 * 4 / 2**20:,.0f} MiB"
                  for s in sizes) + " (fp32, batch 1, one head).\n")
    a("| size | backend | peak RSS growth | N² fp32 matrix | growth / matrix |")
    a("|---|---|---|---|---|")
    for r in rows:
        if r["status"] == "ok" and r["label"] in [v[0] for v in MAIN_VARIANTS] and r.get("peak_host_mib") is not None:
            m = ((r["size"] // 2) ** 2) ** 2 * 4 / 2**20
            a(f"| {r['size']}×{r['size']} | {r['label']} | {r['peak_host_mib']:.0f} MiB | {m:,.0f} MiB | "
              f"{r['peak_host_mib'] / m:.2f} |")
    a("")
    a("<!-- GOAL-NOTES -->\n")

    inter = report.get("interleaved") or []
    if inter:
        a("### Side by side, call by call\n")
        a(f"Command: `{report.get('interleaved_command', report['command'])}` · same versions and date as above.\n")
        a("Both backends in one process, calls alternating PyTorch, ORT, PyTorch, ORT, … so that both see the same "
          "background load (`interleaved_worker` in the script). PyTorch uses reference attention, ORT the Attention-op "
          "export, both with the thread count shown.\n")
        a("| size | threads | pairs | PyTorch median ms | ORT median ms | ORT / PyTorch | PyTorch min ms | ORT min ms | load avg (max) |")
        a("|---|---|---|---|---|---|---|---|---|")
        for r in inter:
            if r.get("status") != "ok":
                a(f"| {r.get('size', '?')} | {r.get('threads', '?')} | | {r.get('error')} | | | | | |")
                continue
            m, mn = r["median_ms"], r["min_ms"]
            a(f"| {r['size']}×{r['size']} | {r['threads']} | {r['pairs']} | {m['pytorch']:.1f} | {m['onnxruntime']:.1f} | "
              f"{r['ratio']:.2f}× | {mn['pytorch']:.1f} | {mn['onnxruntime']:.1f} | {_fmt(r.get('load_max'))} |")
        a("")
        a("<!-- INTERLEAVED-NOTES -->\n")

    tuning = [r for r in rows if r["label"] in [v[0] for v in TUNING_VARIANTS]]
    if tuning:
        a("## What was tried to make ONNX Runtime faster\n")
        a(stamp + "\n")
        a("| size | variant | median ms | ratio to ORT op (2 threads, opt all) | peak RSS growth |")
        a("|---|---|---|---|---|")
        for s in sizes:
            base = next((r for r in rows if r["size"] == s and r["label"] == "ORT, Attention op export"
                         and r["status"] == "ok"), None)
            for r in [base] + [t for t in tuning if t["size"] == s]:
                if r is None:
                    continue
                if r["status"] != "ok":
                    a(f"| {s}×{s} | {r['label']} | {r.get('error')} | | |")
                    continue
                ratio = r["latency_ms"]["median"] / base["latency_ms"]["median"] if base else None
                a(f"| {s}×{s} | {r['label']} | {r['latency_ms']['median']:.1f} | {_fmt(ratio, '.2f', '×')} | "
                  f"{_fmt(r.get('peak_host_mib'), '.0f', ' MiB')} |")
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
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32,64,128,256")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="one or two timed calls per cell (smoke run)")
    ap.add_argument("--tune-up-to", type=int, default=64, help="try the ORT tuning variants at sizes up to this")
    ap.add_argument("--skip-decomposed-torch-at-256", action="store_true",
                    help="save ~2 minutes: at 256 px the sdpa form stands for the deployment formulation")
    ap.add_argument("--export-runs", type=int, default=3)
    ap.add_argument("--reuse-export", metavar="RESULTS_JSON", help="take export timing and files from an earlier run")
    ap.add_argument("--guard-gib", type=float, default=12.0, help="RSS limit per measurement subprocess")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement subprocess")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "attn-export-bench"))
    ap.add_argument("--json", default=os.path.join(tempfile.gettempdir(), "attn-export-bench", "results.json"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--render", metavar="RESULTS_JSON", help="only rewrite the page from saved results")
    ap.add_argument("--add-interleaved", metavar="RESULTS_JSON", help="run only the alternating check, adding it to saved results")
    ap.add_argument("--interleaved", default="32:1,32:2,64:2", help="SIZE:THREADS list for the alternating "
                    "PyTorch/ORT check ('' to skip)")
    ap.add_argument("--notes", metavar="NOTES_JSON", help="JSON {goal, tuning} text spliced into the page")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        result = interleaved_worker(job) if job.get("kind") == "interleaved" else worker(job)
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
    if args.notes:
        notes = json.loads(Path(args.notes).read_text())
        text = text.replace("<!-- GOAL-NOTES -->", notes.get("goal", "")).replace("<!-- TUNING-NOTES -->",
                                                                                  notes.get("tuning", ""))
        text = text.replace("<!-- INTERLEAVED-NOTES -->", notes.get("interleaved", ""))
    from attn_export.atomic import write_text_atomic

    write_text_atomic(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
