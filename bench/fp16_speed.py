"""FP16 conversion and verify time against export time, side by side, as a user runs the commands.

Per round, in this order, each a fresh `attn-export` process timed whole (wall clock, imports included):
`onnx --preset ddpm-cifar10`, `fp16` of that file, and for a small SD-layout UNet (diffusers' UNet2DConditionModel,
tiny: 1.7 MiB of weights, 8 attention sites, a [B, 77, 32] context), `onnx`, `fp16` and `verify`. Medians over
ROUNDS with min-max; the ratio fp16/onnx of each round's pair. Also the time to create one ONNX Runtime session of
each FP32 file (the largest per-session cost the commands pay), median of 5.

    python bench/fp16_speed.py [--rounds 3] [--json out/fp16_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "attn_export"]
SD = ["--model", "export_zoo:diffusers_sd", "--extra-input", "encoder_hidden_states:float32:batch,77,32"]


def timed(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    t0 = time.perf_counter()
    proc = subprocess.run(CLI + args, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    return seconds


def session_seconds(path: Path) -> float:
    import onnxruntime as ort

    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for _ in range(args.rounds):
            steps = [
                ("ddpm-cifar10 onnx", ["onnx", "--preset", "ddpm-cifar10", "-o", str(work / "c.onnx"), "--force"]),
                ("ddpm-cifar10 fp16", ["fp16", str(work / "c.onnx"), "--preset", "ddpm-cifar10", "-o",
                                       str(work / "c16.onnx"), "--force"]),
                ("sd-tiny onnx", ["onnx", *SD, "-o", str(work / "sd.onnx"), "--force"]),
                ("sd-tiny fp16", ["fp16", str(work / "sd.onnx"), "--model", "export_zoo:diffusers_sd", "-o",
                                  str(work / "sd16.onnx"), "--force"]),
                ("sd-tiny verify", ["verify", str(work / "sd.onnx"), "--model", "export_zoo:diffusers_sd"]),
            ]
            for name, cmd in steps:
                rows.setdefault(name, []).append(timed(cmd))
        sessions = {"ddpm-cifar10": session_seconds(work / "c.onnx"), "sd-tiny": session_seconds(work / "sd.onnx")}
    ratio = [f / o for f, o in zip(rows["ddpm-cifar10 fp16"], rows["ddpm-cifar10 onnx"])]
    result = {
        "host": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "rounds": args.rounds, "seconds": {k: summary(v) for k, v in rows.items()},
        "fp16_over_onnx_ddpm_cifar10": summary(ratio), "session_create_seconds": sessions,
    }
    print("| step | median s | min-max |\n|---|---|---|")
    for k, v in result["seconds"].items():
        print(f"| {k} | {v['median']:.1f} | {v['min']:.1f}-{v['max']:.1f} |")
    r = result["fp16_over_onnx_ddpm_cifar10"]
    print(f"\nfp16 / onnx (ddpm-cifar10, per round): median {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})")
    print("session creation (median of 5): " + ", ".join(f"{k} {v:.2f} s" for k, v in sessions.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
