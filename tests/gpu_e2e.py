"""The GPU run, end to end, for a machine with an NVIDIA GPU and TensorRT or TensorRT-RTX: ``make test-gpu``.

With TensorRT-RTX installed and a GPU it targets (an RTX-class GPU), the same presets are built with
``trt --fp16 --runtime rtx`` and their engines verified too (step names end in " rtx").

Runs the ``gpu``-marked tests, then for the ``tiny`` and ``ddpm-cifar10`` presets:
export, ``trt --fp16`` (one profile), ``verify`` of the engine (every profile's
min/opt/max and off-grid shapes, against PyTorch), the fusion report from the
sidecar, the C++ runner (``attn_export_run``, if built) against ``TrtRunner``, and
``bench`` rows for TensorRT next to PyTorch on the same GPU. Writes everything to
one JSON report (default ``out/gpu-report.json``) to attach to a bug.

Never run by this project on a GPU yet: where TensorRT or a GPU is missing it
writes a report that says so and exits 0 (nothing is claimed).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"tiny": ("1x32x32", "2x64x64", "4x96x96"), "ddpm-cifar10": ("1x32x32", "2x32x32", "8x64x64")}


def _run(cmd: list[str], step: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    step.update(cmd=" ".join(cmd), rc=proc.returncode, seconds=round(time.perf_counter() - t0, 2),
                tail=(proc.stdout + proc.stderr)[-3000:])
    return proc


def _environment() -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from attn_export.engines.trt_build import gpu_info

    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    gpu = gpu_info()
    env["gpu"] = None if gpu is None else {"name": gpu.name, "compute_capability": gpu.compute_capability}
    for mod in ("tensorrt", "tensorrt_rtx", "torch", "polygraphy", "onnxruntime"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            env[mod] = f"unavailable ({type(exc).__name__}: {exc})"
    return env


def _cpp_runner(engine: Path, work: Path, step: dict[str, Any]) -> None:
    """attn_export_run on saved inputs vs TrtRunner on the same inputs."""
    import numpy as np

    from attn_export.runners.trt_runner import TrtRunner

    exe = next((p for p in [REPO / "build" / "cpp" / "attn_export_run"] if p.is_file()), None)
    if exe is None:
        build = REPO / "build" / "cpp"
        _run(["cmake", "-S", "attn_export/engines/cpp", "-B", str(build)], step.setdefault("configure", {}))
        _run(["cmake", "--build", str(build), "-j", "4"], step.setdefault("build", {}))
        exe = build / "attn_export_run" if (build / "attn_export_run").is_file() else None
    if exe is None:
        step["result"] = "not built (needs the TensorRT headers and the CUDA toolkit; see attn_export/engines/cpp/README.md)"
        return
    with TrtRunner(engine) as runner:
        feeds = runner.spec.make_inputs(2, 32, 32, seed=7)
        ref = runner.infer(feeds)
    args = [str(exe), "--engine", str(engine)]
    for name, arr in feeds.items():
        np.save(work / f"{name}.npy", arr)
        args += ["--input", f"{name}={work / (name + '.npy')}"]
    for name in ref:
        args += ["--output", f"{name}={work / (name + '.cpp.npy')}"]
    proc = _run(args, step)
    if proc.returncode == 0:
        diffs = {n: float(np.abs(np.load(work / f"{n}.cpp.npy") - v).max()) for n, v in ref.items()}
        step["max_abs_diff_vs_trtrunner"] = diffs
        step["passed"] = all(d <= 1e-3 for d in diffs.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "out" / "gpu-report.json")
    ap.add_argument("--work", type=Path, default=REPO / "out" / "gpu-run")
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": _environment(), "steps": {}}
    env = report["environment"]
    from attn_export.engines.runtime import RTX

    has_trt = not str(env["tensorrt"]).startswith("unavailable")
    has_rtx = (not str(env["tensorrt_rtx"]).startswith("unavailable") and env["gpu"] is not None
               and env["gpu"]["compute_capability"] in RTX.compute_capabilities)
    if env["gpu"] is None or not (has_trt or has_rtx):
        report["skipped"] = "needs TensorRT (or TensorRT-RTX) and an NVIDIA GPU: nothing was built or run"
        args.out.write_text(json.dumps(report, indent=1))
        print(f"{report['skipped']}; report in {args.out}")
        return 0
    cli = [sys.executable, "-c", "from attn_export.cli import main; main()"]
    steps = report["steps"]
    _run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_trt_gpu.py",
          "tests/test_rtx_gpu.py"], steps.setdefault("pytest -m gpu", {}))
    if has_rtx:
        for preset, (lo, op, hi) in PRESETS.items():
            s_rtx: dict[str, Any] = steps.setdefault(f"{preset} rtx", {})
            onnx_path, engine = args.work / f"{preset}.onnx", args.work / f"{preset}.rtx.engine"
            _run(cli + ["onnx", "--preset", preset, "-o", str(onnx_path), "--force"], s_rtx.setdefault("onnx", {}))
            _run(cli + ["trt", str(onnx_path), "--fp16", "--runtime", "rtx", "-o", str(engine), "--fp16-onnx",
                        str(args.work / f"{preset}.rtx.fp16.onnx"), "--min", lo, "--opt", op, "--max", hi, "--force"],
                 s_rtx.setdefault("trt --fp16 --runtime rtx", {}))
            if engine.is_file():
                sidecar = json.loads(Path(str(engine) + ".json").read_text())
                s_rtx["fusion"] = {"all_fused": sidecar["fusion"]["all_fused"], "summary": sidecar["fusion"]["summary"],
                                   "source": sidecar["fusion"]["source"]}
                _run(cli + ["verify", str(engine), "--report", str(args.work / f"{preset}.rtx.verify.json")],
                     s_rtx.setdefault("verify", {}))
    if not has_trt:
        report["passed"] = all(st.get("rc", 0) == 0 for p in steps.values() for st in (p.values() if "rc" not in p else [p])
                               if isinstance(st, dict))
        args.out.write_text(json.dumps(report, indent=1, default=str))
        print(f"{'passed' if report['passed'] else 'FAILED'} (TensorRT-RTX only); report in {args.out}")
        return 0 if report["passed"] else 1
    for preset, (lo, op, hi) in PRESETS.items():
        s: dict[str, Any] = steps.setdefault(preset, {})
        onnx_path, engine = args.work / f"{preset}.onnx", args.work / f"{preset}.plan"
        _run(cli + ["onnx", "--preset", preset, "-o", str(onnx_path), "--force"], s.setdefault("onnx", {}))
        _run(cli + ["trt", str(onnx_path), "--fp16", "-o", str(engine), "--min", lo, "--opt", op, "--max", hi, "--force"],
             s.setdefault("trt --fp16", {}))
        if not engine.is_file():
            continue
        sidecar = json.loads(Path(str(engine) + ".json").read_text())
        s["fusion"] = {"all_fused": sidecar["fusion"]["all_fused"], "summary": sidecar["fusion"]["summary"]}
        verify_json = args.work / f"{preset}.verify.json"
        _run(cli + ["verify", str(engine), "--report", str(verify_json)], s.setdefault("verify", {}))
        if verify_json.is_file():
            s["verify"]["report"] = json.loads(verify_json.read_text())
        _cpp_runner(engine, args.work, s.setdefault("cpp runner", {}))
        bench_json = args.work / f"{preset}.bench.json"
        _run(cli + ["bench", str(engine), "--backend", "pytorch,pytorch-fp16,tensorrt", "--provider", "cuda", "--report", str(bench_json)],
             s.setdefault("bench", {}))
        if bench_json.is_file():
            s["bench"]["report"] = json.loads(bench_json.read_text())
        s["bench"]["note"] = "pytorch: the FP32 eager model, pytorch-fp16: the same model in FP16, both on this GPU"
    report["passed"] = all(
        st.get("rc", 0) == 0 for p in steps.values() for st in (p.values() if "rc" not in p else [p]) if isinstance(st, dict)
    ) and all(steps[p].get("fusion", {}).get("all_fused") for p in PRESETS)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"{'passed' if report['passed'] else 'FAILED'}; report in {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
