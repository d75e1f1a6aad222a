"""Everything the command line shows: rich tables and lines for each library result.

The library returns results and reports progress through a callback; this
module (used by :mod:`.cli` only) decides how they look. Tests match the
table text, so wording changes here are user-visible.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

# Piped output (logs, CI) gets a wide console: rich's default of 80 columns folds the verify and bench tables.
_PIPED_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160
console = Console(width=_PIPED_WIDTH)
err_console = Console(stderr=True)


def warning(message: str) -> None:
    """One yellow 'warning:' line on stderr."""
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def _dims(dims: list) -> str:


    return escape("[" + ", ".join(str(d) for d in dims) + "]")


def export_summary(r: Any) -> None:
    from rich.table import Table

    table = Table(title="attn-export onnx", show_header=False, title_justify="left")
    table.add_row("file", str(r.path) + (f" (+ {r.external_data.name})" if r.external_data else ""))
    table.add_row("size", _human_size(r.size_bytes))
    table.add_row("opset", str(r.opset))
    shown = {"torchscript": "TorchScript tracer", "dynamo": "dynamo (torch.export)"}
    table.add_row("exporter", shown.get(r.exporter, r.exporter)
                  + (escape(f", after the TorchScript tracer failed ({r.fallback})") if r.fallback else ""))
    table.add_row("parameters", f"{r.num_parameters:,}")
    for name, dtype, dims in r.inputs:
        table.add_row(f"input {name}", f"{dtype} {_dims(dims)}")
    for name, dtype, dims in r.outputs:
        table.add_row(f"output {name}", f"{dtype} {_dims(dims)}")
    table.add_row("attention", f"{r.attention_nodes} x {'Attention op' if r.attention == 'op' else 'MatMul/Softmax/MatMul (scale on q)'}"
                  + (f", {len(r.unfused)} site(s) NOT rewritten" if r.unfused else ""))
    for u in r.unfused:
        table.add_row("[bold red]unfused[/]", escape(f"{u['site']} (Softmax {u['node']}): {u['reason']}"))
    table.add_row("H/W multiple", str(r.spec.hw_multiple))
    if r.check:
        s = r.check["shapes"][0]["shape"]
        table.add_row("check vs PyTorch", f"max abs err {r.check['max_abs_err']:.2e} at {s[0]}x{s[1]}x{s[2]} (ONNX Runtime CPU)")
    table.add_row("time", f"{r.seconds:.1f} s")
    console.print(table)


def bench(report: dict[str, Any]) -> None:
    from rich.table import Table

    from .bench import is_noisy
    from .spec import format_shape

    host = report["host"]
    table = Table(title=f"attn-export bench {Path(report['artifact']).name}", title_justify="left")
    for col in ("backend", "shape", "median ms", "p10-p90 ms", "images/s", "total peak", "growth", "peak device",
                "vs fastest pytorch", "settings"):
        table.add_column(col, justify="left" if col in ("backend", "shape", "settings") else "right")
    sessions = report["settings"].get("sessions", 1)
    if sessions > 1:
        table.add_column("sessions ms", justify="right")
    noisy, serving = [], []
    for r in report["results"]:
        shape = format_shape(r["shape"])
        if r["status"] != "ok":
            # Status where the numbers go, the reason in the wide last column.
            table.add_row(r["backend"], shape, f"[yellow]{r['status']}[/]", *[""] * 6, escape(r["error"] or ""),
                          *[""] * (sessions > 1))
            continue
        lat = r["latency_ms"]
        mib = lambda v: "—" if v is None else f"{v:.0f} MiB"  # noqa: E731
        s = r["settings"]
        detail = ", ".join(f"{k}={s[k]}" for k in ("precision", "autocast", "form", "device", "attention_impl", "threads",
                                                   "streams", "shapes", "providers", "graph_optimization") if k in s)
        spread = f"{lat['p10']:.2f}-{lat['p90']:.2f}" if "p10" in lat else f"-{lat['p90']:.2f}"
        if is_noisy(lat):
            noisy.append(f"{r['backend']} {shape}")
            spread = f"[yellow]{spread}[/]"
        ratio = "—" if r["ratio_to_pytorch"] is None else \
            f"{r['ratio_to_pytorch']:.2f}x" + (f" ({r['baseline']})" if r.get("baseline") and r["baseline"] != r["backend"] else "")
        per_session = r.get("session_medians_ms") or []
        table.add_row(r["backend"], shape, f"{lat['median']:.2f}", spread, f"{r['throughput_images_per_s']:.1f}",
                      mib(r.get("total_peak_host_mib")), mib(r["peak_host_mib"]), mib(r["peak_device_mib"]), ratio,
                      detail, *([f"{min(per_session):.2f}-{max(per_session):.2f}" if per_session else ""]
                                if sessions > 1 else []))
        if r.get("ratio_to_file") is not None:
            serving.append((shape, r["ratio_to_file"]))
    console.print(table)
    if serving:
        console.print("serving form / file as written: " + ", ".join(f"{v:.2f}x at {k}" for k, v in serving),
                      highlight=False)
        slower = [k for k, v in serving if v > 1]
        if slower and not report["settings"].get("tune"):
            warning(f"the serving form was slower than the file as written at {', '.join(slower)} on this CPU: "
                    "--tune measures which of its rewrites pay here (optimize --tune writes that form)"
                    + ("" if sessions > 1 else "; --sessions 3 tells a real difference from one slow session"))
    for f in report.get("fastest", []):
        against = [f"{f[k]:.2f}x {what}" for k, what in (("to_pytorch_fp32", "PyTorch eager fp32"),
                                                          ("to_pytorch_bf16", "PyTorch bf16 autocast")) if f.get(k)]
        console.print(f"fastest at {format_shape(f['shape'])}: {f['backend']}, {f['median_ms']:.2f} ms"
                      + (f" = {', '.join(against)}" if against else ""), highlight=False)
    if noisy:
        warning(f"latency varied by more than 1.5x between p10 and p90 for {', '.join(noisy)}: the machine was busy "
                "or its clock changed; rerun with more --iterations or --time-budget before reading the medians")
    st = report["settings"]
    versions = host.get("versions", {})
    console.print(f"{host.get('processor', '?')} ({host.get('simd', '?')}), {host.get('cpu_count')} CPUs; torch "
                  f"{versions.get('torch', '-')}, onnxruntime {versions.get('onnxruntime', '-')}"
                  + (f", openvino {versions['openvino']}" if "openvino" in versions else "") + f"; warm-up {st['warmup']}, "
                  + (f"time budget {st['time_budget_s']} s" if st["time_budget_s"] else f"{st['iterations'] or 10} timed calls")
                  + (f" in each of {sessions} sessions (median: the sessions' median)" if sessions > 1 else "")
                  + "; latency is per call, numpy in and out"
                  + ("; each backend and shape in its own process" if st.get("isolated") else ""), highlight=False)


def _fmt_err(value: float) -> str:
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf"
    return f"{value:.2e}"


def verify(r: Any) -> None:
    from rich.table import Table

    console.print(f"[bold]verify[/] {escape(r.artifact)}: {r.candidate} vs {r.reference}, {r.precision}, seed {r.seed}", highlight=False)
    console.print(f"tolerances: {r.tolerances.describe()}", highlight=False)
    table = Table(title_justify="left")
    for col in ("shape", "output", "max abs", "mean abs", "max rel", "p99 abs", "cosine", "NaN/Inf ref", "NaN/Inf cand",
                "min atol", "min rtol", "result"):
        # Shape and verdict never wrap; the figures may wrap on narrow terminals rather than be cut.
        table.add_column(col, justify="left" if col in ("shape", "output", "result") else "right",
                         no_wrap=col in ("shape", "result"), overflow="fold")
    for s in r.shapes:
        for o in s.outputs:
            table.add_row(
                "x".join(map(str, s.shape)), o.name, _fmt_err(o.max_abs), _fmt_err(o.mean_abs), _fmt_err(o.max_rel),
                _fmt_err(o.p99_abs), "nan" if o.cosine != o.cosine else f"{o.cosine:.6f}", f"{o.nan_ref}/{o.inf_ref}",
                f"{o.nan_cand}/{o.inf_cand}", _fmt_err(o.min_atol), _fmt_err(o.min_rtol),
                "[green]PASS[/]" if o.passed else "[bold red]FAIL[/]",
            )
    console.print(table)
    times = ", ".join(f"{name} {sec:.2f} s" for name, sec in r.timings.items())
    setup = ", ".join(f"{name} {sec:.2f} s" for name, sec in r.setup_seconds.items())
    console.print(f"time: {times} (loading: {setup})", highlight=False)
    for note in r.notes:
        console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    _checkpoint_warning(r.checkpoint)
    _verdict(r.passed, f"{len(r.shapes)} shape(s), every output within tolerance", "mismatched output(s)", r.failures())


def _checkpoint_warning(checkpoint: dict[str, Any] | None) -> None:
    if checkpoint and checkpoint.get("path") and not checkpoint.get("matches"):
        console.print(f"[yellow]warning:[/] reference checkpoint {escape(str(checkpoint['path']))} is not the one "
                      "recorded at export", highlight=False)


def _verdict(passed: bool, passed_text: str, what_failed: str, failures: list[str]) -> None:
    """PASSED with what passed, or FAILED with one line per failure."""
    if passed:
        console.print(f"[bold green]PASSED[/]: {passed_text}", highlight=False)
        return
    console.print(f"[bold red]FAILED[/]: {len(failures)} {what_failed}", highlight=False)
    for line in failures:
        console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)


def inspect_onnx(d: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"attn-export inspect {escape(d['path'])}", show_header=False, title_justify="left")
    table.add_row("size", _human_size(d["file_size"]) + (f" (with {len(d['external_data'])} external data file(s))" if d["external_data"] else ""))
    table.add_row("opset", str(d["opset"]) + f" (IR {d['ir_version']}, {escape(d['producer'] or 'unknown producer')})")
    for io in d["inputs"]:
        table.add_row(f"input {escape(io['name'])}", f"{io['dtype']} {_dims(io['dims'])}")
    for io in d["outputs"]:
        table.add_row(f"output {escape(io['name'])}", f"{io['dtype']} {_dims(io['dims'])}")
    table.add_row("nodes / weight elements", f"{d['num_nodes']:,} / {d['num_parameters']:,}")
    spec = d.get("spec")
    if spec:
        src = spec.get("source") or {}
        what = src.get("preset") or src.get("model") or src.get("kind", "?")
        ck = spec.get("checkpoint")
        table.add_row("model", escape(f"{what} (seed {src.get('seed')}), H/W multiple {spec['hw_multiple']}, precision {spec['precision']}, "
                                      f"attention {spec['attention']}, attn-export {spec.get('tool_version', '?')}"))
        table.add_row("checkpoint", escape(f"{ck['path']} (sha256 {str(ck.get('sha256'))[:12]})") if ck else "none (seeded initialization)")
    else:
        table.add_row("model", "[yellow]no attn-export description[/]")
    made = d.get("serving_form")
    if made:
        cpu = made.get("tuned_on") or {}
        tuning = made.get("tuning")
        table.add_row("form", escape(f"ONNX Runtime's serving form for {made.get('provider')} ("
                                     f"{', '.join(map(str, made.get('parts', []))) or 'nothing rewritten'}), "
                                     f"{'tuned (--tune)' if isinstance(tuning, dict) else 'by the rules'} on "
                                     f"{cpu.get('processor', '?')} ({cpu.get('simd', '?')}), made from {made.get('source')}; "
                                     "not for TensorRT"))
        if isinstance(tuning, dict):  # read from the file: data, shown as text only
            ratios = {str(c.get("name")): f"{r:.2f}x" if isinstance(r := c.get("ratio_to_file"), (int, float)) else "?"
                      for c in tuning.get("candidates", []) if isinstance(c, dict)}
            table.add_row("form measured", escape(f"kept {tuning.get('chosen')} of "
                                                  f"{', '.join(f'{k} {v}' for k, v in ratios.items())} at "
                                                  f"{', '.join(map(str, tuning.get('shapes', [])))}, "
                                                  f"{tuning.get('threads') or 'default'} threads (--tune)"))
    for key, value in d["metadata"].items():
        table.add_row(f"metadata {escape(key)}", escape(str(value)[:80]))
    hist = d["op_histogram"]
    table.add_row("ops", escape(", ".join(f"{op} {n}" for op, n in hist.items())))
    for name, part in (("initializers", "initializers"), ("activations", "activations")):
        shares = d["precision"][part]
        table.add_row(f"dtypes ({name})", ", ".join(
            f"{dt} {v['tensors']} tensors ({v['tensor_share']:.0%}), {v['element_share']:.1%} of elements" for dt, v in shares.items()))
    console.print(table, soft_wrap=True)

    att = Table(title=f"attention: {d['attention_summary']['count']} site(s)", title_justify="left")
    for col in ("site", "form", "scale", "kind: q len / kv len", "heads x size", "dtype", "TensorRT fusion"):
        att.add_column(col, overflow="fold")  # fold rather than cut names on narrow terminals
    for a in d["attention"]:
        scale = f"{a['scale']:.4g} on {a['scale_placement']}" if a["scale"] is not None else f"? on {a['scale_placement']}"
        if a["scale_source"] == "shape":
            scale += " (from the shape)"
        form = a["form_description"] + ("" if a.get("mask") is None else escape(f", mask: {a['mask']}"))
        att.add_row(escape(a["name"]), form + ("" if a["problem"] is None else " [red](cannot rewrite)[/]"),
                    escape(scale), escape(f"{a['kind']}: {a['seq_len'] or '?'} / {a['kv_len'] or '?'}"),
                    f"{a['heads'] or '?'} x {a['head_size'] or '?'}",
                    str(a["dtype"] or "?"), escape(a["trt_fusion"]))
    console.print(att)


def inspect_engine(d: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"attn-export inspect {escape(d['path'])}", show_header=False, title_justify="left")
    table.add_row("size", _human_size(d["file_size"]))
    table.add_row("sidecar", escape(d["sidecar"]))
    gpu = d.get("gpu") or {}
    if d.get("runtime") == "rtx":
        table.add_row("TensorRT-RTX", str(d["tensorrt_version"]))
        table.add_row("runs on", escape(f"compute capabilities {', '.join(d.get('compute_capabilities') or ['?'])}; built "
                                        + (f"on {gpu.get('name')}" if gpu else "without a GPU")))
    else:
        table.add_row("TensorRT", str(d["tensorrt_version"]))
        table.add_row("GPU", escape(f"{gpu.get('name', '?')} (compute capability {gpu.get('compute_capability', '?')}), "
                                    f"hardware compatibility {d.get('hardware_compatibility') or 'none'}"))
    table.add_row("precision", str(d["precision"]))
    for i, p in enumerate(d.get("profiles") or []):
        fmt = lambda t: "x".join(map(str, t))  # noqa: E731
        table.add_row(f"profile {i}", f"min {fmt(p['min'])}, opt {fmt(p['opt'])}, max {fmt(p['max'])}")
    for io in d.get("io") or []:
        table.add_row(f"{io.get('mode', 'tensor')} {escape(str(io.get('name')))}", escape(f"{io.get('dtype')} {io.get('shape')}"))
    onnx_src = d.get("onnx") or {}
    if onnx_src:
        table.add_row("built from", escape(f"{onnx_src.get('path')} (sha256 {str(onnx_src.get('sha256'))[:12]})"))
    fusion = d.get("fusion") or {}
    if fusion:
        summary = fusion.get("summary") or ", ".join(f"{k}: {v}" for k, v in fusion.items() if not isinstance(v, (list, dict)))
        table.add_row("fused attention", escape(str(summary)))
    else:
        table.add_row("fused attention", "no report recorded")
    console.print(table, soft_wrap=True)
    blocks = fusion.get("blocks") if isinstance(fusion, dict) else None
    if blocks:
        bt = Table(title="attention fusion", title_justify="left")
        keys = [k for k in blocks[0] if not isinstance(blocks[0][k], (list, dict))]
        for k in keys:
            bt.add_column(k)
        for b in blocks:
            bt.add_row(*[escape(str(b.get(k))) for k in keys])
        console.print(bt)


def readiness(report: Any) -> None:
    from rich.table import Table

    table = Table(title=f"{report.target_label} readiness", title_justify="left")
    for col in ("level", "check", "where", "finding"):
        table.add_column(col)
    colors = {"error": "bold red", "warning": "yellow", "ok": "green"}
    for f in report.findings:
        table.add_row(f"[{colors.get(f.level, 'white')}]{f.level}[/]", f.code, escape(f.node or ""), escape(f.message))
    console.print(table)
    verdict = report.verdict
    color = "bold green" if verdict == "ready" else ("bold red" if report.errors else "bold yellow")
    console.print(f"[{color}]{escape(verdict)}[/]")


def fp16(r: Any) -> None:
    from rich.table import Table

    a = r.audit
    shapes = ", ".join("x".join(map(str, s)) for s in a.calibration_shapes)
    console.print(f"[bold]FP16 range audit[/] of {escape(str(r.source))}: calibration {shapes}, threshold {a.threshold:g} "
                  f"(FP16 max 65504)", highlight=False)
    for note in getattr(r, "notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if getattr(r, "decomposed", None):
        console.print(escape(f"{len(r.decomposed)} attention site(s) written as MatMul/Softmax/MatMul: no fused kernel takes "
                             f"them (head size or FP32), and the chain builds in any TensorRT: {', '.join(r.decomposed)}"),
                      highlight=False)
    islands = Table(title=f"FP32 islands: {len(r.fp32_nodes)} node(s)", title_justify="left")
    for col in ("node", "op", "kind", "why"):
        islands.add_column(col, overflow="fold")
    by_kind: dict[str, list[Any]] = {}
    for i in r.fp32_nodes:
        by_kind.setdefault(i.kind, []).append(i)
    for kind, items in by_kind.items():
        if kind == "normalization" and len(items) > 3:
            # Every norm layer is listed in --report; here one row says it.
            ops = sorted({i.op_type for i in items})
            islands.add_row(f"{len(items)} nodes", ", ".join(ops), kind, escape(items[0].reason))
            continue
        for i in items:
            islands.add_row(escape(i.node), i.op_type, kind, escape(i.reason))
    console.print(islands)
    flagged = a.flagged
    near = Table(title=f"tensors over the threshold: {len(flagged)}" + (f" ({len(a.overflowing)} overflow FP16)" if a.overflowing else ""),
                 title_justify="left")
    for col in ("tensor", "node", "op", "absmax", "at"):
        near.add_column(col, overflow="fold")
    for t in flagged[:15]:
        near.add_row(escape(t.name), escape(t.producer or "(input)"), t.op_type,
                     f"[red]{t.absmax:.3g}[/]" if t.overflows else f"{t.absmax:.3g}", "x".join(map(str, t.shape)))
    if flagged:
        console.print(near)
    att = Table(title="attention logits (q·kᵀ·scale)", title_justify="left")
    for col in ("block", "form", "logits absmax", "|q·√s| / |k·√s|", "at", "keys", "Q/K/V dtype"):
        att.add_column(col)
    dtypes = {d["block"]: d for d in r.attention}
    for s in a.attention:
        d = dtypes.get(s.name, {})
        att.add_row(escape(s.name), s.form, f"{s.logits_absmax:.3g}", f"{s.q_prescaled_absmax:.3g} / {s.k_prescaled_absmax:.3g}",
                    "x".join(map(str, s.shape)), str(s.keys), f"{d.get('q', '?')}/{d.get('k', '?')}/{d.get('v', '?')}")
    if a.attention:
        console.print(att)
    ma = a.max_activation
    summary = Table(title=f"attn-export fp16 -> {escape(str(r.path))}", show_header=False, title_justify="left")
    summary.add_row("nodes", f"{r.nodes_fp16} FP16, {r.nodes_fp32} FP32, {r.nodes_other} without float output")
    summary.add_row("casts added", str(r.casts_added))
    summary.add_row("initializers", f"{r.initializers_fp16} FP16, {r.initializers_fp32} FP32"
                    + (f", {len(r.clamped_initializers)} clamped to the FP16 range" if r.clamped_initializers else ""))
    if ma is not None:
        summary.add_row("max activation", escape(f"{ma.absmax:.3g} ({ma.name}, {ma.op_type}) at {'x'.join(map(str, ma.shape))}"))
    if r.forced_fp16:
        summary.add_row("forced FP16", escape(", ".join(r.forced_fp16)))
    if r.check:
        errs = ", ".join(f"{'x'.join(map(str, s['shape']))}: {s['max_abs_err']:.2e}" for s in r.check["shapes"])
        from .exporter.foreign import is_foreign

        summary.add_row("vs the FP32 file" if is_foreign(r.spec) else "vs PyTorch",
                        f"max abs err {errs} ({r.check['tolerances']}; ONNX Runtime CPU computes FP16 ops in FP32)")
    if r.emulation is not None:
        e = r.emulation
        summary.add_row("FP16 emulation", ("[green]no overflow[/]" if e.ok else f"[red]{len(e.non_finite)} non-finite[/]")
                        + f" in {e.fp16_tensors} FP16 tensors at {', '.join('x'.join(map(str, s)) for s in e.shapes)}")
    summary.add_row("size / time", f"{_human_size(r.size_bytes)}, {r.seconds:.1f} s"
                    + (f" (weights in {r.external_data.name})" if r.external_data else ""))
    console.print(summary)


def optimize(r: Any) -> None:
    """``attn-export optimize``: what was rewritten and the check against the input."""
    from rich.table import Table

    table = Table(title="attn-export optimize", show_header=False, title_justify="left")
    table.add_row("file", escape(str(r.path)) + (f" (+ {escape(r.external_data.name)})" if r.external_data else ""))
    table.add_row("opset", f"{r.opset_before} -> {r.opset}" if r.opset != r.opset_before else str(r.opset))
    if r.serving is not None:
        cpu = r.serving.get("tuned_on", {})
        l2 = f", L2 {cpu['l2_bytes'] // 1024} KiB" if cpu.get("l2_bytes") else ""
        table.add_row("form", escape(f"ONNX Runtime's serving form for {r.serving['provider']}: "
                                     f"{', '.join(r.serving['parts']) or 'nothing to rewrite'}"))
        tuning = r.serving.get("tuning")
        table.add_row("tuned on" if tuning else "made on", escape(f"{cpu.get('processor', '?')} ({cpu.get('simd', '?')}{l2})"))
        if tuning:
            for shape in tuning["shapes"]:
                file_ms = tuning["candidates"][0]["median_ms"][shape]
                cells = [f"{c['name']} {c['median_ms'][shape]:.1f} ms"
                         + (f" ({c['median_ms'][shape] / file_ms:.2f}x)" if i else "")
                         for i, c in enumerate(tuning["candidates"])]
                table.add_row(f"measured {shape}", escape(", ".join(cells)))
            table.add_row("kept", escape(f"{tuning['chosen']} (faster than the file by {tuning['margin']:.0%} or more "
                                         f"over the shapes measured and slower at none; {tuning['threads'] or 'default'} "
                                         f"threads, the median of {tuning.get('sessions_per_candidate', 1)} sessions each)"))
        else:
            table.add_row("chosen by", "the rules (attention by this CPU's L2 size, Winograd where every accepted size "
                                       "allows), not measured on this machine: --tune times the file and each form "
                                       "here and keeps one only where it pays")
        table.add_row("note", "runners run it as written; TensorRT and `attn-export trt` take its source file")
    else:
        table.add_row("attention", f"{r.sites} site(s): {len(r.rewritten)} rewritten, {len(r.unchanged)} already "
                                   f"{'Attention op' if r.attention == 'op' else 'canonical'}"
                      + (f", {len(r.unfused)} NOT rewritten" if r.unfused else ""))
    for u in r.unfused:
        table.add_row("[bold red]unfused[/]", escape(f"{u['site']} ({u['node']}): {u['reason']}"))
    for c in r.check:
        table.add_row(f"check {'x'.join(map(str, c['shape']))}", f"{'pass' if c['passed'] else 'FAIL'}, max abs err "
                                                                  f"{c['max_abs_err']:.2e} vs the input (ONNX Runtime CPU)")
    table.add_row("time", f"{r.seconds:.1f} s")
    console.print(table)


def triton(m: Any) -> None:
    """``attn-export triton``: the model folder and the files written."""

    runs = m.platform or f"backend {m.backend}, {m.precision}"
    console.print(f"wrote Triton model [bold]{escape(m.name)}[/] ({runs}, max_batch_size {m.max_batch_size}) "
                  f"in {escape(str(m.model_dir))}", highlight=False)
    if m.attention_rewritten:
        console.print(f"  attention: {m.attention_rewritten} site(s) as {m.attention_kind} (memory linear in the "
                      "sequence length)", highlight=False)
    if m.winograd_rewritten:
        console.print(f"  convolutions: {m.winograd_rewritten} 3x3 as Winograd F(4x4, 3x3) (ONNX Runtime CPU)",
                      highlight=False)
    if m.f32_islands:
        console.print(f"  {escape(m.f32_islands)}: marked in model.xml to run at f32 under bf16", highlight=False)
    console.print(f"  {escape(str(m.config_path))}", highlight=False)
    for p in [m.model_file, *m.copied]:
        console.print(f"  {escape(str(p))}", highlight=False)
    if not m.validated:
        err_console.print("note: tritonclient is not installed, so config.pbtxt was not checked "
                          "(pip install '.[triton]' from the attn-export checkout)")


def written(what: str, path: Path) -> None:
    """The line after a JSON report was written."""
    console.print(f"{what} {path}", highlight=False)


def engine_stage(stage: str, r: Any) -> None:
    """``attn-export trt``, as it goes: profile warnings, the FP16 conversion (or why none), the readiness table."""
    if stage == "profiles":
        for w in r.profile_warnings:
            warning(w)
    elif stage == "fp16":
        if r.fp16 is not None:
            fp16(r.fp16)
        elif getattr(r, "fp16_reused", None) is not None:
            console.print(f"reusing {r.fp16_reused}: FP16 from {r.onnx.name} with the same settings, checked against its "
                          "reference when it was made (delete it to convert again)", highlight=False)
        elif r.fp16_requested:
            console.print(f"{r.onnx} is already {r.spec.precision}; building from it as is", highlight=False)
        elif r.spec.precision == "fp32":
            console.print("[yellow]note:[/] no --fp16: the engine keeps the ONNX's FP32 types (strongly typed build)", highlight=False)
    elif stage == "readiness":
        readiness(r.readiness)


def engine_built(r: Any) -> None:
    """``attn-export trt``, at the end: the engine, its sidecar, the fused attention and build warnings."""
    built = r.build
    if built.runtime == "rtx":
        where = (f"TensorRT-RTX {built.tensorrt_version}, for compute capabilities {', '.join(built.compute_capabilities)}, "
                 f"built {'on ' + built.gpu.name if built.gpu else 'without a GPU'}")
    else:
        where = f"TensorRT {built.tensorrt_version}, {built.gpu.name if built.gpu else 'no GPU'}"
    console.print(f"engine written to {built.engine_path} ({_human_size(built.size_bytes)}, {where}) "
                  f"with sidecar {built.sidecar_path} in {built.seconds:.1f} s", highlight=False)
    fusion = getattr(built.fusion, "summary", None)
    if fusion:
        console.print(f"fused attention: {fusion()} (from the {built.fusion.source}; "
                      f"{built.fusion.fused_layer_count} fused attention layer(s) in the engine)", highlight=False)
    for w in built.warnings:
        warning(w)


def localized(outcome: Any) -> None:
    """``verify --localize`` / ``--save-inputs``: where the failure starts, what feeds it, what to try."""
    if outcome.inputs_saved is not None:
        written("inputs saved to", outcome.inputs_saved)
    r = outcome.localized
    if r is None:
        return
    console.print(("[bold red]" if r.first else "") + escape(r.summary()) + ("[/]" if r.first else ""), highlight=False)
    if r.first is not None:
        for i in r.first.inputs:
            err = f"max abs error {i.error.max_abs:.3g}" if i.error else "not compared"
            console.print(escape(f"  input {i.name} ({i.kind}{', from ' + i.producer if i.producer else ''}): {err}"
                                 + (f"; {i.note}" if i.note else "")), highlight=False)
    if r.fix is not None:
        console.print(escape(f"fix to try: {r.fix.text}"), highlight=False, soft_wrap=True)
        for option in r.fix.cli:
            console.print(escape(f"  {option}"), highlight=False)
    for note in r.notes:
        console.print(escape(f"note: {note}"), highlight=False)


def verify_outcome(outcome: Any) -> None:
    """``attn-export verify``: the trajectory check, or the comparison and what --localize / --save-inputs found."""
    if outcome.trajectory is not None:
        trajectory(outcome.trajectory)
        return
    verify(outcome.report)
    localized(outcome)


def trajectory(r: Any) -> None:
    """``verify --trajectory``: the setup, a table of steps (at most about 12 rows), each final image, the verdict."""
    from rich.table import Table

    st = r.settings
    console.print(f"[bold]verify --trajectory[/] {escape(r.artifact)}: {escape(r.candidate)} vs {escape(r.reference)}, "
                  f"{r.precision}, seed {r.seed}", highlight=False)
    eta = f", eta {st.eta:g}" if st.sampler == "ddim" and st.eta else ""
    console.print(f"sampler: {st.sampler} {st.steps} steps{eta} at {'x'.join(map(str, r.shape))}, {st.beta_schedule} betas "
                  f"{st.beta_start:g}..{st.beta_end:g} over {st.train_steps}, {st.prediction}"
                  f"{'' if st.clip_sample else ', x0 not clipped'}", highlight=False)
    console.print(f"pass rule: {r.rule.describe()}", highlight=False)
    table = Table(title="per step: |candidate - reference|", title_justify="left")
    for col in ("step", "t", "output max", "output mean", "sample max", "sample mean", "NaN/Inf ref", "NaN/Inf cand"):
        table.add_column(col, justify="right")
    n = len(r.steps)
    shown = sorted({*range(0, n, max(1, n // 10)), n - 1})
    for i in shown:
        s = r.steps[i]
        table.add_row(str(s.index + 1), str(s.timestep), _fmt_err(s.output_max_abs), _fmt_err(s.output_mean_abs),
                      _fmt_err(s.sample_max_abs), _fmt_err(s.sample_mean_abs), str(s.nonfinite_reference),
                      str(s.nonfinite_candidate))
    console.print(table)
    images = Table(title="final images in [0, 1]", title_justify="left")
    for col in ("sample", "PSNR dB", "SSIM", "max abs", "NaN/Inf cand", "result"):
        images.add_column(col, justify="left" if col in ("sample", "result") else "right")
    for im in r.images:
        images.add_row(str(im.index), f"{im.psnr:.2f}", f"{im.ssim:.6f}", _fmt_err(im.max_abs),
                       f"{im.nan_candidate}/{im.inf_candidate}", "[green]PASS[/]" if im.passed else "[bold red]FAIL[/]")
    console.print(images)
    times = ", ".join(f"{name} {sec:.2f} s" for name, sec in r.seconds.items())
    console.print(f"time: {times}", highlight=False)
    if r.images_written:
        written("images written to", Path(r.images_written))
    _verdict(r.passed, f"{len(r.images)} sample(s) after {n} steps within the pass rule", "failure(s)", r.failures())
