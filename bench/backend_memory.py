"""Total peak memory a deployer pays per backend, beside the latency: each backend in a process of its own.

    python bench/backend_memory.py --preset ddpm-cifar10 --sizes 32,64,128,256 --out /tmp/backend_memory.json

Exports the preset, writes ONNX Runtime's serving form as a file (`attn-export optimize --for onnxruntime`) and
runs `attn-export bench` (isolated: a fresh process per backend) on: PyTorch eager (sdpa), ONNX Runtime on the
file as written, ONNX Runtime on the serving form built in memory, and ONNX Runtime on the serving-form file.
Prints a markdown table: median latency and total peak RSS per backend and size, and the serving forms' ratios
to the file as written.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from attn_export import export_onnx, optimize_onnx, run_bench
from attn_export.host import host_info
from attn_export.models.loader import ModelSource


def _rows(report: dict[str, Any], label: dict[str, str]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(label.get(r["backend"], r["backend"]), r["shape"][1]): r for r in report["results"] if r["status"] == "ok"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ddpm-cifar10")
    ap.add_argument("--sizes", default="32,64,128,256")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    shapes = [(1, s, s) for s in sizes]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, serving_path = Path(tmp) / "unet.onnx", Path(tmp) / "unet.serving.onnx"
        export_onnx(ModelSource(preset=args.preset), onnx_path, check=False)
        optimize_onnx(onnx_path, serving_path, target="onnxruntime", check=False)
        common = {"shapes": shapes, "warmup": 2, "iterations": args.iterations, "threads": args.threads, "isolate": True}
        rows = _rows(run_bench(onnx_path, backends=["pytorch", "onnxruntime", "onnxruntime-serving"], **common),
                     {"pytorch": "pytorch (sdpa)", "onnxruntime": "ORT, file as written",
                      "onnxruntime-serving": "ORT, serving form in memory"})
        rows.update(_rows(run_bench(serving_path, backends=["onnxruntime"], **common),
                          {"onnxruntime": "ORT, serving-form file"}))
    backends = ["pytorch (sdpa)", "ORT, file as written", "ORT, serving form in memory", "ORT, serving-form file"]
    lines = ["| size | " + " | ".join(backends) + " | serving in memory / written: peak RSS | serving file / written: peak RSS |",
             "|---|" + "---|" * (len(backends) + 2)]
    for s in sizes:
        cells = []
        for b in backends:
            r = rows.get((b, s))
            cells.append("—" if r is None else
                         f"{r['latency_ms']['median']:.1f} ms, {r['total_peak_host_mib']:.0f} MiB")
        base = rows.get(("ORT, file as written", s))
        ratios = []
        for b in backends[2:]:
            r = rows.get((b, s))
            ratios.append("—" if r is None or base is None else
                          f"{r['total_peak_host_mib'] / base['total_peak_host_mib']:.2f}×")
        lines.append(f"| {s} px | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    host = host_info()
    print(f"host: {host.get('processor')} ({host.get('simd')}, L2 {host.get('l2_bytes', 0) // 1024} KiB), "
          f"{host.get('cpu_count')} CPUs; versions {host['versions']}")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"host": host, "rows": {f"{b}|{s}": r for (b, s), r in rows.items()}},
                                       indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
