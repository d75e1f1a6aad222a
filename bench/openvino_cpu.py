"""Which file, which precision and which shape handling for OpenVINO on the CPU (docs/benchmarks.md, "OpenVINO").

For each (file, precision) pair, at bf16 and f16 with the timestep's sinusoidal embedding held in f32 (the runner's
default) and without it: the error against the PyTorch FP32 model on the same inputs (max and mean abs over
SHAPES, timesteps drawn in [0, 1000) and, separately, in [0, 256), where bf16 holds every integer), and the median
latency of single calls at each shape, the model compiled once with dynamic H/W. Then, for the FP32 file, the same
latencies with the model compiled per shape (static H/W) and the compile time each new shape costs. One process
runs everything in turn; the machine may be shared, so rerun before reading small differences.

    python bench/openvino_cpu.py FP32.onnx [FP16.onnx] [--threads 2] [--iterations 7] [--accuracy-only]
        [--json out/openvino_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

SHAPES = ((1, 32, 32), (1, 64, 64), (1, 128, 128))


def median_ms(runner: Any, feeds: dict[str, np.ndarray], iterations: int) -> float:
    """Median latency of ``iterations`` calls after two untimed ones."""
    for _ in range(2):
        runner.infer(feeds)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        runner.infer(feeds)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def feeds_for(spec: Any, shape: tuple[int, int, int], t_high: int, seed: int) -> dict[str, np.ndarray]:
    feeds = spec.make_inputs(*shape, seed=seed)
    feeds["t"] = np.random.default_rng(seed).integers(0, t_high, shape[0]).astype(np.int64)
    return feeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="the FP32 ONNX file, then optionally its FP16 file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=7)
    ap.add_argument("--precisions", default="f32,bf16")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--accuracy-only", action="store_true", help="errors only: no latencies, no static-shape rows")
    args = ap.parse_args()

    from attn_export.engines.sidecar import artifact_spec
    from attn_export.models.loader import source_from_spec
    from attn_export.runners.openvino_runner import OpenVinoRunner
    from attn_export.runners.torch_runner import TorchRunner

    spec = artifact_spec(args.files[0])
    inputs = {(shape, high): feeds_for(spec, shape, high, seed=i) for i, shape in enumerate(SHAPES) for high in (1000, 256)}
    with TorchRunner(source_from_spec(spec), spec=spec, threads=args.threads) as torch_runner:
        expected = {key: torch_runner.infer(feeds)["out"] for key, feeds in inputs.items()}
    rows: list[dict[str, Any]] = []
    for path in args.files:
        for precision, hold in [(p, h) for p in args.precisions.split(",") for h in ((False,) if p == "f32" else (True, False))]:
            with OpenVinoRunner(path, precision=precision, threads=args.threads, hold_f32_islands=hold) as runner:
                row: dict[str, Any] = {"file": path.name, "precision": precision, "shapes": "dynamic",
                                       "f32_islands": runner.compiled_settings().get("f32_islands", {})}
                for high in (1000, 256):
                    errors = [np.abs(runner.infer(inputs[(s, high)])["out"] - expected[(s, high)]) for s in SHAPES]
                    row[f"t<{high}"] = {"max_abs": float(max(e.max() for e in errors)),
                                        "mean_abs": float(np.mean([e.mean() for e in errors]))}
                if not args.accuracy_only:
                    row["median_ms"] = {f"{s[1]}px": median_ms(runner, inputs[(s, 1000)], args.iterations)
                                        for s in SHAPES}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for precision in [] if args.accuracy_only else args.precisions.split(","):
        with OpenVinoRunner(args.files[0], precision=precision, threads=args.threads, static_shapes=True) as runner:
            row = {"file": args.files[0].name, "precision": precision, "shapes": "static per shape", "median_ms": {},
                   "compile_s": {}}
            for s in SHAPES:
                t0 = time.perf_counter()
                runner.infer(inputs[(s, 1000)])  # the first call at a shape compiles it
                row["compile_s"][f"{s[1]}px"] = time.perf_counter() - t0
                row["median_ms"][f"{s[1]}px"] = median_ms(runner, inputs[(s, 1000)], args.iterations)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "iterations": args.iterations, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
