"""Tuning the serving form on the machine that serves it: `optimize --for onnxruntime --tune`, `bench --tune`.

Which form is fastest is measured by benchmarks, never asserted here: these tests replace the clock of the tuner
(its `_time`) with fixed latencies per form, so the rule that keeps a form, and what each command does with the
form kept, are checked deterministically. One test runs the real clock and checks only what holds whatever the
timings are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest

from conftest import invoke_cli

from attn_export.errors import UsageError
from attn_export.exporter.metadata import load_onnx
from attn_export.exporter.serving import serving_description
from attn_export.runners import serving_tune
from attn_export.runners.ort_runner import OrtRunner
from attn_export.runners.serving_tune import AS_WRITTEN, Candidate, Tuning, tune_serving_form


@pytest.fixture(scope="module")
def wide_onnx(export_model: Any) -> Path:
    """tiny with 128 channels: 3x3 convolutions Winograd takes, and attention sites."""
    return export_model("tiny", "op", base_channels=128)


def _fixed_clock(monkeypatch: pytest.MonkeyPatch, ms: dict[tuple[str, bool], float]) -> list[tuple[str, bool]]:
    """The tuner's clock replaced: each call of a form takes ms[(runner attention, winograd)]; returns the log."""
    calls: list[tuple[str, bool]] = []

    def fake(runner: OrtRunner, feeds: dict[str, Any], n: int) -> list[float]:
        key = (runner.attention, runner.winograd if runner.attention != "as-is" else False)
        calls.append(key)
        return [ms[key] / 1e3] * n

    monkeypatch.setattr(serving_tune, "_time", fake)
    return calls


def _tuning(file: dict[str, float], **others: dict[str, float]) -> Tuning:
    cands = [Candidate(AS_WRITTEN, "as-is", False, ms=file)]
    cands += [Candidate(name, "auto", True, ms=ms) for name, ms in others.items()]
    return Tuning(cands, cands[0], [], None, "CPUExecutionProvider", 0.03)


def test_the_rule_keeps_a_form_faster_overall_and_slower_nowhere() -> None:
    from attn_export.runners.serving_tune import _keep

    t = _tuning({"a": 100.0, "b": 100.0}, fast_everywhere={"a": 90.0, "b": 95.0},
                faster_overall_but_loses={"a": 50.0, "b": 101.0}, within_margin={"a": 98.0, "b": 99.0})
    assert _keep(t).name == "fast_everywhere"  # the 0.71x one loses at b: not kept
    t = _tuning({"a": 100.0}, within_margin={"a": 98.0})
    assert _keep(t).name == AS_WRITTEN  # 2 % is not worth a rewrite


def test_tune_measures_each_distinct_form_in_fresh_sessions(wide_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from attn_export.engines.sidecar import artifact_spec

    log = _fixed_clock(monkeypatch, {("as-is", False): 100.0, ("onnxruntime", False): 90.0,
                                     ("none", True): 80.0, ("onnxruntime", True): 70.0})
    spec = artifact_spec(wide_onnx)
    t = tune_serving_form(wide_onnx, spec, [(1, 16, 16), (1, 32, 32)], threads=1, passes=3)
    assert [c.name for c in t.candidates] == [AS_WRITTEN, "attention", "winograd", "attention + winograd"]
    assert t.chosen.name == "attention + winograd" and t.chosen.winograd and t.chosen.attention == "auto"
    assert t.candidates[2].parts and all("Winograd" in p for p in t.candidates[2].parts)
    assert not any("Winograd" in p for p in t.candidates[1].parts)
    assert len(log) == 4 * 3 * 2  # every form, in each of 3 passes (a session each), at both shapes
    assert log[8:16:2] == [("onnxruntime", True), ("none", True), ("onnxruntime", False), ("as-is", False)]  # reversed
    d = json.loads(json.dumps(t.to_dict()))
    assert d["chosen"] == "attention + winograd" and d["losses"] == [] and d["sessions_per_candidate"] == 3
    assert [c["ratio_to_file"] for c in d["candidates"]] == [1.0, 0.9, 0.8, 0.7]


def test_forms_that_rewrite_nothing_more_are_not_measured(tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tiny's convolutions have too few channels for Winograd: only the file and its attention form differ."""
    from attn_export.engines.sidecar import artifact_spec

    _fixed_clock(monkeypatch, {("as-is", False): 100.0, ("onnxruntime", False): 99.0})
    t = tune_serving_form(tiny_onnx, artifact_spec(tiny_onnx), [(1, 16, 16)], passes=1, calls=1)
    assert [c.name for c in t.candidates] == [AS_WRITTEN, "attention"]
    assert not t.pays  # 1 % faster is within the margin


def test_optimize_tune_writes_the_form_kept_with_its_measurements(wide_onnx: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   wide_console: None) -> None:
    from attn_export.pipeline import optimize_artifact

    _fixed_clock(monkeypatch, {("as-is", False): 100.0, ("onnxruntime", False): 120.0,
                               ("none", True): 80.0, ("onnxruntime", True): 95.0})
    out = tmp_path / "tuned.onnx"
    r = optimize_artifact(wide_onnx, out, target="onnxruntime", tune=True, threads=1, shapes=[(1, 16, 16)])
    record = serving_description(load_onnx(out, load_external_data=False))
    assert record is not None and record["tuning"]["chosen"] == "winograd"
    assert record["attention"] == "none" and record["attention_sites"] == 0 and record["winograd_convolutions"] > 0
    assert record["tuning"]["shapes"] == ["1x16x16"] and record["tuning"]["threads"] == 1
    assert r.check and all(c["passed"] for c in r.check)  # checked against its source like any serving form
    assert not any(n.domain == "com.microsoft" for n in onnx.load(out, load_external_data=False).graph.node)
    shown = invoke_cli("inspect", out)
    assert shown.exit_code == 0 and "kept winograd of as written 1.00x, attention 1.20x, winograd 0.80x" in \
        " ".join(shown.output.split())
    assert "tuned (--tune) on" in " ".join(shown.output.split())


def test_optimize_tune_writes_nothing_where_no_rewrite_pays(wide_onnx: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from attn_export.pipeline import optimize_artifact

    _fixed_clock(monkeypatch, {("as-is", False): 100.0, ("onnxruntime", False): 101.0,
                               ("none", True): 130.0, ("onnxruntime", True): 99.0})
    out = tmp_path / "tuned.onnx"
    with pytest.raises(UsageError, match=r"no rewrite of .* is faster than the file on this machine .*serve it as it is"):
        optimize_artifact(wide_onnx, out, target="onnxruntime", tune=True, shapes=[(1, 16, 16)])
    assert list(tmp_path.iterdir()) == []


def test_bench_tune_runs_the_form_kept(wide_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from attn_export.bench import run_bench

    _fixed_clock(monkeypatch, {("as-is", False): 100.0, ("onnxruntime", False): 90.0,
                               ("none", True): 95.0, ("onnxruntime", True): 99.0})
    report = run_bench(wide_onnx, backends=["onnxruntime-serving"], shapes=[(1, 16, 16)], iterations=1, warmup=0,
                       isolate=False, tune=True, threads=1)
    row = report["results"][0]
    assert row["status"] == "ok" and row["settings"]["form"] == "tuned: attention"
    assert row["settings"]["tuning"]["chosen"] == "attention" and report["settings"]["tune"] is True
    assert not any("Winograd" in p for p in row["settings"]["serving_form"])


@pytest.mark.parametrize(("args", "message"), [
    (["bench", "{onnx}", "--backend", "onnxruntime", "--tune"], "add it to --backend"),
    (["optimize", "{onnx}", "-o", "{out}", "--threads", "2"], "add --tune"),
    (["optimize", "{onnx}", "-o", "{out}", "--tune"], "--tune apply to --for onnxruntime"),
])
def test_tune_options_exit_2(tiny_onnx: Path, tmp_path: Path, args: list[str], message: str) -> None:
    r = invoke_cli(*[a.format(onnx=tiny_onnx, out=tmp_path / "o.onnx") for a in args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "o.onnx").exists()


def test_tune_on_the_real_clock(tiny_onnx: Path) -> None:
    """Whatever the timings: the form kept is the file or one measured faster at every shape, and it runs."""
    from attn_export.engines.sidecar import artifact_spec

    spec = artifact_spec(tiny_onnx)
    t = tune_serving_form(tiny_onnx, spec, [(1, 8, 8)], threads=1, passes=2, calls=2)
    assert t.candidates[0].name == AS_WRITTEN and t.chosen in t.candidates
    assert all(len(v) == 2 and all(len(s) == 2 for s in v) for c in t.candidates for v in c.times.values())
    if t.pays:
        assert all(t.chosen.ms[k] <= t.file.ms[k] for k in t.file.ms) and t.ratio(t.chosen) <= 0.97
    with OrtRunner(tiny_onnx, attention=t.chosen.runner_attention, winograd=t.chosen.winograd, threads=1) as r:
        assert r.infer(spec.make_inputs(1, 8, 8))["out"].shape == (1, 3, 8, 8)
