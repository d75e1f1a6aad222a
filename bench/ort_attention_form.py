"""Latency and peak memory of one ONNX file served by OrtRunner in each attention form: as written, ONNX Runtime's
MultiHeadAttention, and the serving form's query-chunked attention.

Each form runs in its own process (peak RSS is per process): one warm-up call, then the median of
--calls timed calls at batch 1 and the given size, with 2 intra-op threads. Only the attention differs:
the serving form's Winograd convolutions are left out of all three (OrtRunner(winograd=False)).

    python bench/ort_attention_form.py unet.onnx --size 256 [--calls 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _child(path: str, form: str, size: int, calls: int) -> None:
    import numpy as np

    from attn_export.runners.ort_runner import OrtRunner

    runner = OrtRunner(path, attention=form, threads=2, winograd=False).activate()
    x = np.random.default_rng(0).standard_normal((1, runner.spec.in_channels, size, size)).astype(np.float32)
    feeds = {t.name: (x if i == 0 else np.full(t.shape_for(1, size, size), 500).astype(t.dtype))
             for i, t in enumerate(runner.spec.inputs)}
    runner.infer(feeds)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        runner.infer(feeds)
        times.append(time.perf_counter() - t0)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"form": form, "size": size, "median_ms": 1000 * sorted(times)[len(times) // 2],
                      "peak_rss_mib": peak_kib / 1024, "sites": runner.attention_rewritten}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.onnx, args.child, args.size, args.calls)
        return
    rows = []
    for form in ("as-is", "multiheadattention", "onnxruntime"):
        out = subprocess.run([sys.executable, __file__, args.onnx, "--size", str(args.size), "--calls", str(args.calls),
                              "--child", form], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| OrtRunner attention | sites rewritten | median ms | peak RSS MiB | latency / as-is | peak RSS / as-is |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['form']} | {r['sites']} | {r['median_ms']:.0f} | {r['peak_rss_mib']:.0f} | "
              f"{r['median_ms'] / rows[0]['median_ms']:.2f} | {r['peak_rss_mib'] / rows[0]['peak_rss_mib']:.2f} |")


if __name__ == "__main__":
    main()
