#!/usr/bin/env python
"""One 3x3 convolution in ONNX Runtime (CPU): as written against its Winograd F(4x4, 3x3) form, layer by layer.

    python bench/winograd_layers.py [--threads 2] [--rounds 5] [--calls 5]

Each shape is a model of one Conv (random weights, bias); its Winograd form is what the serving form builds
(``attn_export.graph.winograd_convolutions``). Both sessions live in one process and are timed in alternation,
round by round (median of ``--calls`` calls each); the table gives the medians over the rounds, the median of
the per-round ratios, the direct convolution's GFLOP/s and the largest difference between the two outputs
relative to the largest output. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (input channels, output channels, height = width): the layers of ddpm-cifar10 at 64 to 256 px input, and
# two narrower ones.
SHAPES = [(128, 128, 128), (256, 128, 128), (128, 128, 64), (256, 256, 64), (256, 256, 32), (256, 256, 16),
          (64, 64, 128), (64, 64, 64), (32, 32, 64)]


def conv_model(c: int, k: int, seed: int = 0) -> onnx.ModelProto:
    """A model of one 3x3 Conv (padding 1, bias) with random weights and dynamic batch, height and width."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", k, "h", "w"])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=onnx.IR_VERSION_2023_5_5)


def main() -> None:
    from attn_export.graph import winograd_convolutions

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()

    def session(model: onnx.ModelProto) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.enable_mem_pattern = False  # as OrtRunner on the CPU provider
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def timed(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> float:
        sess.run(None, feeds)
        ts = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    print(f"Command: `python bench/winograd_layers.py --threads {args.threads} --rounds {args.rounds} "
          f"--calls {args.calls}` · onnxruntime {ort.__version__}\n")
    print("| C in | C out | H = W | direct ms | direct GFLOP/s | Winograd ms | round ratio: median (min–max) "
          "| max diff / max |")
    print("|---|---|---|---|---|---|---|---|")
    for c, k, hw in SHAPES:
        model = conv_model(c, k)
        direct = session(model)
        result = winograd_convolutions(model, hw_multiple=4, min_channels=1)
        assert result.rewritten == ["conv"], result.skipped
        wino = session(model)
        feeds = {"x": np.random.default_rng(1).standard_normal((1, c, hw, hw)).astype(np.float32)}
        ref = direct.run(None, feeds)[0]
        err = float(np.abs(wino.run(None, feeds)[0] - ref).max() / np.abs(ref).max())
        d_ms, w_ms = [], []
        for _ in range(args.rounds):
            d_ms.append(timed(direct, feeds))
            w_ms.append(timed(wino, feeds))
        ratios = [w / d for w, d in zip(w_ms, d_ms)]
        gflop = 2 * c * k * 9 * hw * hw / 1e9
        d, w = statistics.median(d_ms), statistics.median(w_ms)
        print(f"| {c} | {k} | {hw} | {d:.2f} | {gflop / d * 1e3:.0f} | {w:.2f} | "
              f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
