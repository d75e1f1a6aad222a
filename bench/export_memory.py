#!/usr/bin/env python
"""Peak memory and wall time of ``attn-export onnx`` and ``attn-export fp16``, per model.

    python bench/export_memory.py --work /tmp/mem --json /tmp/mem/results.json
    python bench/export_memory.py --render /tmp/mem/results.json      # the markdown table only

Each command runs in its own process under ``/usr/bin/time -v`` (peak RSS of
the process, "Maximum resident set size"); where GNU time is missing, the
peak comes from ``getrusage(RUSAGE_CHILDREN)``. A third row per model,
*baseline*, is a process that only imports the package, builds the model
and reads its parameter bytes: the floor every export pays before it
writes a single byte, so the table can show the peak both as it is and as
growth over that floor. A parent-side guard kills a command whose RSS
passes ``--limit-gib`` (the machine is shared) and records it as killed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GNU_TIME = "/usr/bin/time"
DEFAULT_MODELS = ["ddpm-cifar10", "ddpm-256", str(Path("bench") / "unet-400m.json")]

BASELINE = """
import json, sys
from attn_export.models.loader import ModelSource, load_model
src = sys.argv[1]
source = ModelSource(config=src) if src.endswith('.json') else ModelSource(preset=src)
loaded = load_model(source, attention_impl='decomposed')
params = list(loaded.module.parameters())
print(json.dumps({'parameters': sum(p.numel() for p in params),
                  'weight_bytes': sum(p.numel() * p.element_size() for p in params)}))
"""


def _source_args(model: str) -> list[str]:
    return ["--config", model] if model.endswith(".json") else ["--preset", model]


def _slug(model: str) -> str:
    return Path(model).stem if model.endswith(".json") else model


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (from /proc; 0 once they are gone)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def _parse_time_v(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Maximum resident set size (kbytes):"):
            out["peak_rss_bytes"] = int(line.rsplit(":", 1)[1]) * 1024
        elif line.startswith("Elapsed (wall clock) time"):
            clock = line.rsplit(" ", 1)[1]
            parts = [float(p) for p in clock.split(":")]
            secs = 0.0
            for p in parts:
                secs = secs * 60 + p
            out["wall_s"] = secs
    return out


def run_measured(cmd: list[str], *, limit_bytes: int, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd``; return its peak RSS, wall time, exit code and output tails."""
    use_time = os.access(GNU_TIME, os.X_OK)
    full = [GNU_TIME, "-v"] + cmd if use_time else cmd
    t0 = time.perf_counter()
    # Output goes to files, not pipes: the parent polls memory and never blocks on a full pipe.
    out_f, err_f = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(full, stdout=out_f, stderr=err_f, env=env, text=True, start_new_session=True)
    killed = False
    guard_peak = 0
    while proc.poll() is None:
        rss = _tree_rss(proc.pid)
        guard_peak = max(guard_peak, rss)
        if rss > limit_bytes:
            os.killpg(proc.pid, 9)
            killed = True
            break
        time.sleep(0.2)
    proc.wait()
    out_f.seek(0)
    err_f.seek(0)
    stdout, stderr = out_f.read(), err_f.read()
    out_f.close()
    err_f.close()
    wall = time.perf_counter() - t0
    rec: dict[str, Any] = {"cmd": shlex.join(cmd), "rc": proc.returncode, "killed_over_limit": killed,
                           "guard_peak_bytes": guard_peak, "wall_s": wall}
    if killed:
        rec["peak_rss_bytes"] = guard_peak  # getrusage would report an earlier, larger child
    elif use_time:
        rec.update(_parse_time_v(stderr))
    else:
        import resource

        rec["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    rec["stdout_tail"] = stdout[-2000:]
    rec["stderr_tail"] = "\n".join(line for line in stderr.splitlines() if not line.startswith("\t"))[-2000:]
    return rec


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def measure(models: list[str], commands: list[str], work: Path, repeat: int, limit_bytes: int,
            fp16_args: list[str]) -> dict[str, Any]:
    """Every (model, command) cell, ``repeat`` times; baseline first so each ratio has its weight bytes."""
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(ROOT))
    exe = shutil.which("attn-export") or str(Path(sys.executable).with_name("attn-export"))
    results: dict[str, Any] = {"date": dt.date.today().isoformat(), "python": sys.version.split()[0],
                               "cpus": os.cpu_count(), "limit_bytes": limit_bytes, "models": {}}
    try:
        import onnx
        import onnxruntime
        import torch

        results["versions"] = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    except ImportError:
        pass
    for model in models:
        slug = _slug(model)
        onnx_path, fp16_path = work / f"{slug}.onnx", work / f"{slug}.fp16.onnx"
        cells: dict[str, Any] = {}
        base = run_measured([sys.executable, "-c", BASELINE, model], limit_bytes=limit_bytes, env=env)
        info = json.loads(base["stdout_tail"].strip().splitlines()[-1])
        cells["baseline"] = [base]
        print(f"{slug}: {info['parameters']:,} parameters, {info['weight_bytes'] / 2**20:.0f} MiB; baseline "
              f"{base['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        cmds = {"onnx": [exe, "onnx", *_source_args(model), "-o", str(onnx_path), "--force"],
                "fp16": [exe, "fp16", str(onnx_path), "-o", str(fp16_path), "--force", *fp16_args]}
        for name in commands:
            runs = []
            for _ in range(repeat):
                load0 = _loadavg()
                rec = run_measured(cmds[name], limit_bytes=limit_bytes, env=env)
                rec["loadavg_before"] = load0
                runs.append(rec)
                state = "killed over the limit" if rec["killed_over_limit"] else f"rc {rec['rc']}"
                print(f"  {name}: peak {rec.get('peak_rss_bytes', rec['guard_peak_bytes']) / 2**30:.2f} GiB, "
                      f"{rec['wall_s']:.1f} s ({state}, load {load0:.1f})", flush=True)
                if rec["rc"] != 0:
                    print(rec["stderr_tail"][-800:], flush=True)
                    break
            cells[name] = runs
        sizes = {p.name: p.stat().st_size for p in work.glob(f"{slug}.*") if p.is_file()}
        results["models"][slug] = {"model": model, **info, "cells": cells, "files": sizes}
    return results


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def render(results: dict[str, Any], command: str | None = None) -> str:
    """The markdown table: peak RSS, growth over the baseline, both as multiples of the weight bytes, time."""
    lines = []
    v = results.get("versions", {})
    lines.append(f"Command: `{command or results.get('command', 'python bench/export_memory.py')}` · date {results['date']} · "
                 f"{results['cpus']} CPUs · torch {v.get('torch', '?')}, onnx {v.get('onnx', '?')}, onnxruntime "
                 f"{v.get('onnxruntime', '?')}\n")
    lines.append("| model | parameters | weight bytes | command | peak RSS GiB | peak / weights | baseline GiB | "
                 "peak − baseline GiB | (peak − baseline) / weights | wall s (median) | runs | load avg |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for slug, m in results["models"].items():
        wb = m["weight_bytes"]
        base_runs = m["cells"]["baseline"]
        base = statistics.median(r["peak_rss_bytes"] for r in base_runs)
        lines.append(f"| {slug} | {m['parameters'] / 1e6:.1f} M | {wb / 2**20:,.0f} MiB | baseline (import + build) | "
                     f"{_gib(base)} | {base / wb:.2f}× | | | | {statistics.median(r['wall_s'] for r in base_runs):.1f} | "
                     f"{len(base_runs)} | |")
        for name in ("onnx", "fp16"):
            runs = m["cells"].get(name)
            if not runs:
                continue
            if any(r["killed_over_limit"] for r in runs):
                lim = results["limit_bytes"]
                lines.append(f"| {slug} | | | `{name}` | killed above {_gib(lim)} | > {lim / wb:.1f}× | | | | | | |")
                continue
            if any(r["rc"] != 0 for r in runs):
                lines.append(f"| {slug} | | | `{name}` | failed (exit {runs[-1]['rc']}) | | | | | | | |")
                continue
            peak = statistics.median(r["peak_rss_bytes"] for r in runs)
            wall = statistics.median(r["wall_s"] for r in runs)
            load = max(r.get("loadavg_before", 0.0) for r in runs)
            lines.append(f"| {slug} | | | `{name}` | {_gib(peak)} | {peak / wb:.2f}× | {_gib(base)} | {_gib(peak - base)} | "
                         f"{(peak - base) / wb:.2f}× | {wall:.1f} | {len(runs)} | {load:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="presets or config .json files, comma-separated")
    ap.add_argument("--commands", default="onnx,fp16")
    ap.add_argument("--work", type=Path, default=Path("/tmp/attn-export-memory"))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--limit-gib", type=float, default=10.0, help="kill a command whose RSS passes this")
    ap.add_argument("--fp16-args", default="", help="extra arguments for attn-export fp16")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--render", type=Path, help="only render a saved results JSON")
    args = ap.parse_args()
    if args.render:
        results = json.loads(args.render.read_text())
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        results = measure(args.models.split(","), [c for c in args.commands.split(",") if c], args.work, args.repeat,
                          int(args.limit_gib * 2**30), shlex.split(args.fp16_args))
        results["command"] = "python bench/export_memory.py " + shlex.join(sys.argv[1:])
        if args.json:
            tmp = args.json.with_name(f".{args.json.name}.tmp")
            tmp.write_text(json.dumps(results, indent=1))
            os.replace(tmp, args.json)
    table = render(results)
    if args.markdown:
        tmp = args.markdown.with_name(f".{args.markdown.name}.tmp")
        tmp.write_text(table)
        os.replace(tmp, args.markdown)
    print(table)


if __name__ == "__main__":
    main()
