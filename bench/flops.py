#!/usr/bin/env python
"""GMAC / GFLOP per image of an exported ONNX file, counted from its graph at concrete shapes.

    python bench/flops.py unet.onnx --sizes 32,64,128,256 [--batch 1] [--json out.json]

Counts Conv, MatMul/Gemm, Einsum and attention (Q·Kᵀ and P·V) multiply-
accumulates with :func:`attn_export.graph.flops.count_macs`; ``bench/run_benchmarks.py``
uses the same function for its GFLOP/s column.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import onnx

    from attn_export.graph.flops import count_macs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx_file", type=Path)
    ap.add_argument("--sizes", default="32,64,128,256", help="square H = W sizes, comma-separated")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model = onnx.load(str(args.onnx_file), load_external_data=False)
    rows = []
    print("| size | GMAC | of which attention | GFLOP (2 x GMAC) |")
    print("|---|---|---|---|")
    for s in (int(v) for v in args.sizes.split(",")):
        c = count_macs(model, args.batch, s, s)
        if c.unknown:
            print(f"warning: {len(c.unknown)} node(s) with unknown shapes at {s}: {c.unknown[:3]}", file=sys.stderr)
        rows.append(c.to_dict())
        print(f"| {s}×{s} | {c.gmac:.2f} | {c.attention / 1e9:.2f} | {c.gflop:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
