"""TensorRT-RTX engine builds on this CPU (no GPU): build time, builder memory and engine size per preset.

For each preset: export it (op form), convert it to FP16 (the file `attn-export trt --fp16` builds from), then
build its engine with `attn_export.build_engine(..., runtime="rtx")` under the default profile, RUNS times, each
build in a fresh process. Per build the child reports the build's wall time, its peak resident memory before the
build (imports, the graph, the readiness check) and after it, the engine size and the fused attention sites.
Medians are printed with min-max, and a Markdown table for docs/benchmarks.md.

    python bench/rtx_build.py [--presets tiny,ddpm-cifar10,ddpm-256] [--runs 3] [--json out/rtx_build.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(onnx_path: str, engine: str) -> None:
    """One build in this process; prints one JSON line."""
    from attn_export.engines.readiness import check_trt_readiness
    from attn_export.engines.trt_build import build_plan
    from attn_export.exporter.foreign import spec_of
    from attn_export.engines.profiles import default_profile

    spec = spec_of(onnx_path)
    profile = default_profile(spec)
    readiness = check_trt_readiness(onnx_path, profiles=[profile], runtime="rtx")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    built = build_plan(onnx_path, engine, [profile], readiness, runtime="rtx", allow_unfused=True, force=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "rss_before_mib": before / 1024, "rss_peak_mib": after / 1024,
                      "engine_mib": built.size_bytes / 2**20, "sites": len(built.fusion.blocks),
                      "fused": sum(b.verdict == "fused" for b in built.fusion.blocks),
                      "fused_layers": built.fusion.fused_layer_count, "profile": str(profile),
                      "version": built.tensorrt_version}))


def prepare(preset: str, folder: Path) -> Path:
    """The preset's FP16 file (export, then FP16 conversion, unchecked: only the build is measured here)."""
    from attn_export.exporter.fp16 import convert_fp16
    from attn_export.exporter.onnx_export import export_onnx
    from attn_export.models.loader import ModelSource

    fp32, fp16 = folder / f"{preset}.onnx", folder / f"{preset}.fp16.onnx"
    export_onnx(ModelSource(preset=preset), fp32, check=False)
    convert_fp16(fp32, fp16, check=False)
    return fp16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,ddpm-cifar10,ddpm-256")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", nargs=2, metavar=("ONNX", "ENGINE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from attn_export.bench import host_info

    host = host_info()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for preset in args.presets.split(","):
            path = prepare(preset, folder)
            runs = []
            for _ in range(args.runs):
                out = subprocess.run([sys.executable, __file__, "--child", str(path), str(folder / f"{preset}.plan")],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "rss_before_mib", "rss_peak_mib", "engine_mib")}
            spread = (min(r["seconds"] for r in runs), max(r["seconds"] for r in runs))
            rows.append({"preset": preset, "runs": runs, "median": med, "seconds_range": spread,
                         "onnx_mib": path.stat().st_size / 2**20, **{k: runs[0][k] for k in ("sites", "fused", "fused_layers",
                                                                                                "profile", "version")}})
    print(f"host: {host.get('processor') or platform.processor()} (family/model {host.get('cpu_family_model')}, "
          f"{host.get('simd')}, {host.get('cpu_count')} cores), no GPU; TensorRT-RTX {rows[0]['version'] if rows else '?'}; "
          f"{args.runs} builds each, each in a fresh process")
    print("| preset | FP16 ONNX | profile | build time, median (min-max) | builder peak RSS (before the build) | engine | fused attention |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["median"]
        print(f"| {r['preset']} | {r['onnx_mib']:.1f} MiB | {r['profile']} | {m['seconds']:.1f} s "
              f"({r['seconds_range'][0]:.1f}-{r['seconds_range'][1]:.1f}) | {m['rss_peak_mib']:,.0f} MiB "
              f"({m['rss_before_mib']:,.0f}) | {m['engine_mib']:.1f} MiB | {r['fused']} of {r['sites']} "
              f"({r['fused_layers']} `_gemm_mha_v2` layers) |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"host": host, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
