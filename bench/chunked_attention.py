"""One attention block alone in ONNX Runtime on CPU: com.microsoft.MultiHeadAttention against the serving form's
query-chunked attention (attn_export.graph.to_chunked_form), side by side.

For each head layout and sequence length, both forms are built from the same canonical graph
(Mul(q, scale) -> MatMul(Kᵀ) -> Softmax -> MatMul(V), q/k/v inputs [1, heads, S, d]) with the product's own
rewrites, and timed in alternating rounds in one process (2 intra-op threads, after a warm-up call each), so
both see the same load. FLOPs: 4·heads·S²·d (Q·Kᵀ and P·V). The last columns give the block sizes ONNX Runtime's
MultiHeadAttention CPU kernel picks from the L2 cache size (kv = L2 / (16·(d + d)), q = min(kv, 2d); its source:
onnxruntime/contrib_ops/cpu/bert/multihead_attention.cc), read here from /sys.

    python bench/chunked_attention.py [--layouts 1x256,8x64] [--lengths 256,1024,4096,16384] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from attn_export.graph import to_chunked_form, to_onnxruntime_form
from attn_export.graph.serving import l2_cache_bytes, mha_cpu_kv_block


def canonical(heads: int, d: int) -> onnx.ModelProto:
    """softmax(q·kᵀ/√d)·v over [1, heads, S, d] inputs of dynamic length."""
    dims = [1, heads, "s", d]
    nodes = [helper.make_node("Mul", ["q", "scale"], ["qs"], name="mul"),
             helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["qs", "kt"], ["logits"], name="qk"),
             helper.make_node("Softmax", ["logits"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"], name="pv")]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims)
                                                   for n in "qkv"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
                              [numpy_helper.from_array(np.array(d ** -0.5, np.float32), "scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default="1x256,8x64", help="HEADSxHEAD_SIZE list")
    ap.add_argument("--lengths", default="256,1024,4096,16384")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    l2 = l2_cache_bytes()
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, L2 {l2} bytes\n")
    print("| heads × head size | S | MultiHeadAttention ms | chunked ms | ratio of medians | round ratio: median "
          "(min–max) | MultiHeadAttention GFLOP/s | chunked GFLOP/s | max abs diff | MHA kernel blocks q × kv |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for layout in args.layouts.split(","):
        heads, d = (int(v) for v in layout.split("x"))
        mha, chunked = canonical(heads, d), canonical(heads, d)
        assert to_onnxruntime_form(mha).rewritten and to_chunked_form(chunked).rewritten
        sessions = {"mha": session(mha, args.threads), "chunked": session(chunked, args.threads)}
        for s in (int(v) for v in args.lengths.split(",")):
            rng = np.random.default_rng(s)
            feeds = {n: rng.standard_normal((1, heads, s, d)).astype(np.float32) for n in "qkv"}
            outs = {k: sess.run(None, feeds)[0] for k, sess in sessions.items()}  # warm-up
            times: dict[str, list[float]] = {k: [] for k in sessions}
            calls = max(1, min(20, int(4e9 / (4 * heads * s * s * d))))
            for r in range(args.rounds):
                for k in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        sessions[k].run(None, feeds)
                    times[k].append((time.perf_counter() - t0) / calls)
            med = {k: statistics.median(v) for k, v in times.items()}
            rr = [c / m for c, m in zip(times["chunked"], times["mha"])]
            flops = 4.0 * heads * s * s * d
            kv = mha_cpu_kv_block(d, l2) if l2 else None
            blocks = f"{min(kv, 2 * d, s)} × {min(kv, s)}" if kv else "?"
            print(f"| {heads} × {d} | {s} | {med['mha'] * 1e3:.2f} | {med['chunked'] * 1e3:.2f} | "
                  f"{med['chunked'] / med['mha']:.2f}× | {statistics.median(rr):.2f}× ({min(rr):.2f}–{max(rr):.2f}) | "
                  f"{flops / med['mha'] / 1e9:.0f} | {flops / med['chunked'] / 1e9:.0f} | "
                  f"{float(np.abs(outs['mha'] - outs['chunked']).max()):.1e} | {blocks} |", flush=True)


if __name__ == "__main__":
    main()
