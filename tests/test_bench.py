"""`attn-export bench`: the table, the JSON report and its fields. No timing assertions: numbers go to docs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import CliResult, invoke_cli

from attn_export import cli
from attn_export.bench import PeakHostMemory, _merge_sessions, fastest_paths, latency_stats, parse_backends, run_bench
from attn_export.errors import UsageError

LATENCY_KEYS = {"mean", "median", "p10", "p90", "p99", "min", "max", "cv"}


@pytest.fixture()
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Room for the whole table, so assertions see unwrapped cells."""
    monkeypatch.setattr(cli.console, "width", 250)


def _invoke(*args: str) -> CliResult:
    return invoke_cli(*args)


def test_cli_prints_table_and_writes_json(tiny_onnx: Path, tmp_path: Path, wide_console: None) -> None:
    out = tmp_path / "bench.json"
    res = _invoke("bench", str(tiny_onnx), "--backend", "pytorch,onnxruntime", "--shapes", "1x16x16,2x8x12",
                  "--warmup", "1", "--iterations", "3", "--threads", "1", "--report", str(out))
    assert res.exit_code == 0, res.output
    for word in ("pytorch", "onnxruntime", "1x16x16", "2x8x12", "median ms", "p10-p90 ms", "images/s", "total peak",
                 "growth", "vs fastest pytorch", "1.00x", "each backend and shape in its own process",
                 "fastest at 1x16x16: onnxruntime, ", "x PyTorch eager fp32"):
        assert word in res.output, word
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # atomic write: no temporary left behind

    report = json.loads(out.read_text())
    assert report["tool"] == "attn-export bench"
    assert {"cpu_count", "platform", "simd"} <= set(report["host"])
    assert {"attn_export", "torch", "onnx", "onnxruntime"} <= set(report["host"]["versions"])
    assert report["settings"]["threads"] == 1 and report["settings"]["iterations"] == 3
    ort_rows = {tuple(r["shape"]): r for r in report["results"] if r["backend"] == "onnxruntime"}
    assert [(f["shape"], f["backend"]) for f in report["fastest"]] == [([1, 16, 16], "onnxruntime"),
                                                                       ([2, 8, 12], "onnxruntime")]
    for f in report["fastest"]:
        assert f["to_pytorch_fp32"] == pytest.approx(ort_rows[tuple(f["shape"])]["ratio_to_pytorch"])
    rows = report["results"]
    assert [(r["backend"], r["shape"]) for r in rows] == [
        ("pytorch", [1, 16, 16]), ("pytorch", [2, 8, 12]), ("onnxruntime", [1, 16, 16]), ("onnxruntime", [2, 8, 12])]
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None
        assert r["warmup"] == 1 and r["iterations"] == 3
        assert set(r["latency_ms"]) == LATENCY_KEYS
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["throughput_images_per_s"] == pytest.approx(r["shape"][0] / (lat["mean"] / 1e3))
        assert r["peak_host_mib"] is not None and r["peak_host_mib"] >= 0
        # Its own process: the whole of it (interpreter, libraries, session) at its peak, above the growth alone.
        assert r["total_peak_host_mib"] > max(r["peak_host_mib"], 50)
        assert r["peak_device_mib"] is None  # no GPU here
        assert r["ratio_to_pytorch"] == pytest.approx(lat["median"] / next(
            p["latency_ms"]["median"] for p in rows if p["backend"] == "pytorch" and p["shape"] == r["shape"]))
        assert r["settings"]["threads"] == 1
    assert rows[0]["ratio_to_pytorch"] == 1.0
    assert rows[0]["settings"]["attention_impl"] == "sdpa"
    assert rows[2]["settings"]["providers"] == ["CPUExecutionProvider"] and rows[2]["settings"]["form"] == "as written"
    assert rows[2]["settings"]["graph_optimization"] == "all"


def test_time_budget_and_attention_impl(tiny_onnx: Path) -> None:
    report = run_bench(tiny_onnx, backends=["pytorch-sdpa", "pytorch", "onnxruntime"], shapes=[(1, 8, 8)], warmup=0,
                       time_budget=0.05, attention_impl="decomposed", isolate=False)
    sdpa, plain, ort = report["results"]
    assert sdpa["settings"]["attention_impl"] == "sdpa" and plain["settings"]["attention_impl"] == "decomposed"
    assert sdpa["iterations"] >= 1 and report["settings"]["time_budget_s"] == 0.05
    # The baseline is the fastest PyTorch formulation of the run, whichever it was.
    fastest = min((sdpa, plain), key=lambda r: r["latency_ms"]["median"])
    assert fastest["ratio_to_pytorch"] == 1.0 and ort["baseline"] == fastest["backend"]
    assert ort["ratio_to_pytorch"] == pytest.approx(ort["latency_ms"]["median"] / fastest["latency_ms"]["median"])
    assert ort["total_peak_host_mib"] is None  # one process for all: no backend's own total


def test_unavailable_backend_is_reported_not_fatal(tiny_onnx: Path, wide_console: None) -> None:
    res = _invoke("bench", str(tiny_onnx), "--backend", "onnxruntime,tensorrt", "--shapes", "1x8x8",
                  "--warmup", "0", "--iterations", "1")
    assert res.exit_code == 0, res.output
    assert "unavailable" in res.output and "engine" in res.output


def test_default_backends_and_shape(tiny_onnx: Path) -> None:
    report = run_bench(tiny_onnx, warmup=0, iterations=1, isolate=False)
    rows = report["results"]
    # Both ONNX Runtime forms, side by side, and OpenVINO's rows where it is installed (a test dependency: bf16 is
    # a row even where the CPU cannot run it, naming why); the model's own sample size (tiny: 32 px), batch 1.
    import importlib.util

    from attn_export.host import native_bf16

    openvino = ["openvino-f32", "openvino-bf16", *(["pytorch-bf16"] if native_bf16() else [])]
    assert [r["backend"] for r in rows] == ["pytorch", "onnxruntime", "onnxruntime-serving",
                                           *(openvino if importlib.util.find_spec("openvino") else [])]
    if not native_bf16() and importlib.util.find_spec("openvino"):
        assert rows[4]["status"] == "unavailable" and "BF16" in rows[4]["error"]
    assert report["fastest"] and report["fastest"][0]["backend"] not in ("pytorch", "pytorch-bf16")
    assert all(r["shape"] == [1, 32, 32] for r in rows)
    assert rows[1]["settings"]["form"] == "as written" and rows[1]["settings"]["serving_form"] == []
    assert rows[2]["settings"]["form"] == "serving" and rows[2]["settings"]["serving_form"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--iterations", "2", "--time-budget", "1"], "not both"),
        (["--backend", "tensorflow"], "unknown backend"),
        (["--shapes", "1x30x30"], "multiples of 4"),
        (["--shapes", "1x32"], "BATCHxHEIGHTxWIDTH"),
        (["--attention-impl", "flash"], "--attention-impl"),
        (["--iterations", "0"], "at least 1"),
        (["--sessions", "0"], "--sessions must be at least 1"),
        (["--sessions", "2", "--no-isolate"], "needs --isolate"),
    ],
)
def test_bad_options_exit_2_with_a_reason(tiny_onnx: Path, args: list[str], message: str) -> None:
    res = _invoke("bench", str(tiny_onnx), *args)
    assert res.exit_code == 2
    assert message in res.output


def test_sessions_are_rounds_of_fresh_processes_merged_into_one_row(tiny_onnx: Path, tmp_path: Path,
                                                                    wide_console: None) -> None:
    out = tmp_path / "bench.json"
    res = _invoke("bench", str(tiny_onnx), "--backend", "onnxruntime,onnxruntime-serving", "--shapes", "1x8x8",
                  "--warmup", "0", "--iterations", "3", "--sessions", "3", "--report", str(out))
    assert res.exit_code == 0, res.output
    assert "sessions ms" in res.output and "in each of 3 sessions" in res.output
    assert "serving form / file as written:" in res.output
    assert "fastest at 1x8x8: onnxruntime" in res.output  # no PyTorch row: no ratio to one
    rows = json.loads(out.read_text())["results"]
    assert [r["backend"] for r in rows] == ["onnxruntime", "onnxruntime-serving"]
    for r in rows:
        assert r["iterations"] == 9 and len(r["session_medians_ms"]) == 3 and "calls_s" not in r
        assert r["latency_ms"]["median"] == pytest.approx(float(np.median(r["session_medians_ms"])), abs=1e-3)
    assert rows[0]["ratio_to_file"] is None
    assert rows[1]["ratio_to_file"] == pytest.approx(rows[1]["latency_ms"]["median"] / rows[0]["latency_ms"]["median"])


def test_session_rounds_alternate_and_stop_at_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    from attn_export import bench

    ran: list[tuple[str, tuple[int, ...]]] = []

    def fake_process(job: dict) -> list[dict]:
        shape = tuple(job["shapes"][0])
        ran.append((job["backend"], shape))
        ok = job["backend"] != "tensorrt"
        return [{**_session(float(len(ran)), [1.0]), "backend": job["backend"], "shape": list(shape),
                 "status": "ok" if ok else "unavailable"}]

    monkeypatch.setattr(bench, "_in_own_process", fake_process)
    rows = bench._isolated_rounds({"x": 1}, ["onnxruntime", "tensorrt"], [(1, 8, 8), (1, 16, 16)], 3, False, None)
    a, b = ("onnxruntime", (1, 8, 8)), ("onnxruntime", (1, 16, 16))
    trt = [("tensorrt", (1, 8, 8)), ("tensorrt", (1, 16, 16))]
    # Round 1 in order, round 2 reversed, round 3 in order; a backend that cannot run is asked once, not thrice.
    assert ran == [a, b, *trt, b, a, a, b]
    assert [(r["backend"], r["status"], len(r.get("session_medians_ms") or [])) for r in rows] == [
        ("onnxruntime", "ok", 3), ("onnxruntime", "ok", 3), ("tensorrt", "unavailable", 0),
        ("tensorrt", "unavailable", 0)]
    assert rows[0]["session_medians_ms"] == [1.0, 6.0, 7.0]


def _session(median_ms: float, calls_ms: list[float], *, status: str = "ok", total: float = 100.0) -> dict:
    return {"backend": "onnxruntime", "shape": [2, 8, 8], "status": status, "error": None if status == "ok" else "x",
            "latency_ms": {"median": median_ms}, "calls_s": [c / 1e3 for c in calls_ms], "iterations": len(calls_ms),
            "peak_host_mib": 1.0, "total_peak_host_mib": total, "peak_device_mib": None}


def test_merged_sessions_take_the_median_of_medians_and_the_largest_memory() -> None:
    sessions = [_session(10.0, [9.0, 10.0, 11.0]), _session(30.0, [30.0, 30.0, 31.0], total=120.0),
                _session(12.0, [12.0, 12.0, 12.0])]
    (row,) = _merge_sessions([sessions])
    # The slow session moves the mean and the spread, not the median.
    assert row["latency_ms"]["median"] == 12.0 and row["session_medians_ms"] == [10.0, 30.0, 12.0]
    assert row["latency_ms"]["max"] == pytest.approx(31.0) and row["latency_ms"]["min"] == pytest.approx(9.0)
    assert row["throughput_images_per_s"] == pytest.approx(2 / (row["latency_ms"]["mean"] / 1e3))
    assert row["iterations"] == 9 and row["total_peak_host_mib"] == 120.0 and "calls_s" not in row
    (failed,) = _merge_sessions([[sessions[0], _session(0.0, [], status="error")]])
    assert failed["status"] == "error" and "calls_s" not in failed


def _row(backend: str, shape: list[int], ms: float, status: str = "ok") -> dict:
    return {"backend": backend, "shape": shape, "status": status, "latency_ms": {"median": ms}}


def test_fastest_path_is_attn_exports_own_against_both_pytorch_baselines() -> None:
    rows = [_row("pytorch", [1, 8, 8], 100.0), _row("pytorch-decomposed", [1, 8, 8], 80.0),
            _row("pytorch-bf16", [1, 8, 8], 50.0), _row("onnxruntime", [1, 8, 8], 60.0),
            _row("openvino-bf16", [1, 8, 8], 20.0), _row("openvino-f16", [1, 8, 8], 1.0, status="unavailable"),
            _row("pytorch", [1, 16, 16], 400.0), _row("onnxruntime-serving", [1, 16, 16], 300.0),
            _row("pytorch", [1, 32, 32], 900.0)]
    got = fastest_paths(rows)
    # PyTorch's own rows never count as the path; an unavailable row never wins; the fp32 baseline is the fastest
    # FP32 formulation and the bf16 one autocast's, each where it ran.
    assert got == [
        {"shape": [1, 8, 8], "backend": "openvino-bf16", "median_ms": 20.0, "to_pytorch_fp32": 0.25,
         "to_pytorch_bf16": 0.4},
        {"shape": [1, 16, 16], "backend": "onnxruntime-serving", "median_ms": 300.0, "to_pytorch_fp32": 0.75,
         "to_pytorch_bf16": None}]


def test_missing_artifact(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        run_bench(tmp_path / "nope.onnx")


def test_parse_backends_aliases() -> None:
    assert parse_backends("torch, ort,trt,ort") == ["pytorch", "onnxruntime", "tensorrt"]
    assert parse_backends("ort-serving") == ["onnxruntime-serving"]


def test_latency_stats() -> None:
    stats = latency_stats([0.001, 0.002, 0.003, 0.004, 0.010])
    assert stats["median"] == pytest.approx(3.0)
    assert stats["mean"] == pytest.approx(4.0)
    assert stats["min"] == pytest.approx(1.0) and stats["max"] == pytest.approx(10.0)
    assert stats["median"] < stats["p90"] < stats["p99"] <= stats["max"]


def test_peak_host_memory_sees_a_short_spike() -> None:
    with PeakHostMemory() as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched, then freed inside the block
        del block
    assert mem.method in ("VmHWM", "sampled VmRSS")
    assert mem.growth_mib is not None and mem.growth_mib >= 48


def test_pytorch_fp16_needs_a_gpu(tiny_onnx: Path) -> None:
    """The FP16 PyTorch baseline runs on CUDA only; elsewhere its rows say why, and the others still run."""
    from attn_export.bench import run_bench

    report = run_bench(tiny_onnx, backends=["pytorch-fp16", "pytorch"], shapes=[(1, 8, 8)], warmup=0, iterations=1, isolate=False)
    rows = {r["backend"]: r for r in report["results"]}
    assert rows["pytorch-fp16"]["status"] == "unavailable" and "CUDA GPU only" in rows["pytorch-fp16"]["error"]
    assert rows["pytorch"]["status"] == "ok"


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads /proc/cpuinfo (Linux)")
def test_host_info_names_the_vector_units() -> None:
    import platform

    from attn_export.host import SIMD_LEVELS as _SIMD_LEVELS, host_info

    info = host_info()
    assert info["simd"] in _SIMD_LEVELS
    if platform.machine() == "x86_64":
        assert info["simd"] in ("avx512f", "avx2", "avx", "sse4_2")
        family, model = info["cpu_family_model"].split("/")
        assert family.isdigit() and model.isdigit()
