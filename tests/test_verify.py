"""`attn-export verify`: the pass rule, the shape sweep, and planted faults caught end to end."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from attn_export.compare import Tolerances, compare_arrays, default_tolerances, resolve_tolerances
from attn_export.errors import CheckpointError, ShapeError, UsageError
from attn_export.exporter.foreign import spec_of
from attn_export.exporter.onnx_export import export_onnx
from attn_export.models.loader import ModelSource, load_model
from attn_export.spec import ReferenceOptions
from conftest import make_fake_engine, run_cli_in_process as run
from attn_export.verify import default_shapes, engine_shapes, verify

TABLE_KEYS = ("max_abs", "mean_abs", "max_rel", "p99_abs", "cosine", "nan_ref", "inf_ref", "nan_cand", "inf_cand",
              "min_atol", "min_rtol", "passed")



def one_line_error(result, needle: str, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# the pass rule
# ---------------------------------------------------------------------------------------------------------------------
class TestPassRule:
    def test_fails_only_when_both_tolerances_are_exceeded(self) -> None:
        ref = np.array([1000.0, 1.0])
        # abs error 0.5 > atol but rel 5e-4 <= rtol: passes.
        assert compare_arrays("o", ref, ref + [0.5, 0.0], Tolerances(atol=1e-3, rtol=1e-3)).passed
        # rel error 1e-2 > rtol but abs 1e-5 <= atol: passes.
        small = np.array([1e-3, 1.0])
        assert compare_arrays("o", small, small + [1e-5, 0.0], Tolerances(atol=1e-4, rtol=1e-3)).passed
        # both exceeded: fails, and the reason says so.
        c = compare_arrays("o", ref, ref + [0.0, 0.5], Tolerances(atol=1e-3, rtol=1e-3))
        assert not c.passed and c.mismatched == 1 and "exceed both" in c.reason

    @pytest.mark.parametrize("stat", ["elemwise", "max", "mean", "median", "quantile"])
    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_non_finite_candidate_always_fails(self, stat: str, bad: float) -> None:
        ref = np.linspace(-1, 1, 1000)
        cand = ref.copy()
        cand[17] = bad
        c = compare_arrays("o", ref, cand, Tolerances(atol=1e9, rtol=1e9, stat=stat))
        assert not c.passed
        assert c.nonfinite_mismatch == 1 and (c.nan_cand + c.inf_cand) == 1 and c.nan_ref == c.inf_ref == 0
        assert c.min_atol == float("inf")

    def test_non_finite_reference_fails_even_when_matched(self) -> None:
        # An all-NaN reference matched by an all-NaN candidate once passed every shape: it proves nothing.
        ref = np.array([np.nan, np.inf, 1.0])
        c = compare_arrays("o", ref, ref.copy(), Tolerances(atol=0, rtol=0))
        assert not c.passed and c.nan_ref == 1 and c.inf_ref == 1 and "nothing to compare" in c.reason
        assert not compare_arrays("o", np.full(4, np.nan), np.full(4, np.nan), Tolerances(1e9, 1e9)).passed
        assert not compare_arrays("o", ref, np.array([0.0, np.inf, 1.0]), Tolerances(1, 1)).passed
        assert not compare_arrays("o", ref, np.array([np.nan, -np.inf, 1.0]), Tolerances(1, 1)).passed

    def test_statistics(self) -> None:
        ref = np.ones(100)
        cand = ref.copy()
        cand[0] += 1.0  # one large error, 99 exact values
        tol = dict(atol=0.05, rtol=0.05)
        assert not compare_arrays("o", ref, cand, Tolerances(**tol, stat="elemwise")).passed
        assert not compare_arrays("o", ref, cand, Tolerances(**tol, stat="max")).passed
        mean = compare_arrays("o", ref, cand, Tolerances(**tol, stat="mean"))
        assert mean.passed and mean.stat_abs == pytest.approx(0.01)
        assert compare_arrays("o", ref, cand, Tolerances(**tol, stat="median")).passed
        assert compare_arrays("o", ref, cand, Tolerances(**tol, stat="quantile", quantile=0.95)).passed
        assert not compare_arrays("o", ref, cand, Tolerances(**tol, stat="quantile", quantile=1.0)).passed

    def test_figures_and_minimum_tolerances(self) -> None:
        rng = np.random.default_rng(0)
        ref = rng.standard_normal((2, 3, 8, 8))
        cand = ref + rng.normal(0, 1e-3, ref.shape)
        c = compare_arrays("o", ref, cand, Tolerances(atol=0, rtol=0))
        diff = np.abs(cand - ref)
        assert c.max_abs == pytest.approx(diff.max()) and c.mean_abs == pytest.approx(diff.mean())
        assert c.p99_abs == pytest.approx(np.quantile(diff, 0.99))
        assert c.max_rel == pytest.approx((diff / np.abs(ref)).max())
        assert 0.999 < c.cosine <= 1.0
        assert not c.passed
        # Polygraphy's minimum required tolerance: either one alone passes.
        assert compare_arrays("o", ref, cand, Tolerances(atol=c.min_atol, rtol=0)).passed
        assert compare_arrays("o", ref, cand, Tolerances(atol=0, rtol=c.min_rtol)).passed

    def test_zero_reference_uses_a_tiny_epsilon(self) -> None:
        c = compare_arrays("o", np.zeros(4), np.full(4, 1e-6), Tolerances(atol=1e-4, rtol=1e-3))
        assert c.passed and np.isfinite(c.max_rel) and c.max_rel > 1e3

    def test_shape_mismatch_fails(self) -> None:
        c = compare_arrays("o", np.zeros((1, 3, 8, 8)), np.zeros((1, 3, 8, 4)), Tolerances(1, 1))
        assert not c.passed and "shape" in c.reason

    def test_default_tolerances(self) -> None:
        assert default_tolerances("fp32") == Tolerances(1e-4, 1e-3, "elemwise")
        assert default_tolerances("fp16") == Tolerances(1e-2, 1e-2, "mean")
        assert default_tolerances("mixed").stat == "mean"
        assert resolve_tolerances("fp16", stat="quantile", quantile=0.9) == Tolerances(1e-2, 1e-2, "quantile", 0.9)
        for bad in (dict(stat="p99"), dict(atol=-1), dict(quantile=1.5)):
            with pytest.raises(UsageError):
                resolve_tolerances("fp32", **bad)


# ---------------------------------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------------------------------
def _is_pow2(n: int) -> bool:
    return n & (n - 1) == 0


@pytest.mark.parametrize("preset,multiple,large", [("tiny", 4, 64), ("ddpm-cifar10", 8, 64), ("ddpm-256", 32, 128)])
def test_default_sweep_covers_the_cases(tiny_onnx: Path, preset: str, multiple: int, large: int) -> None:
    import dataclasses

    spec = spec_of(tiny_onnx)
    spec = dataclasses.replace(spec, hw_multiple=multiple, source={**spec.source, "preset": preset})
    shapes = default_shapes(spec)
    for s in shapes:
        spec.check_shape(*s)
    assert any(b == 1 for b, _, _ in shapes) and any(b > 1 for b, _, _ in shapes)
    assert any(h != w for _, h, w in shapes)
    assert any(not _is_pow2(h) and not _is_pow2(w) for _, h, w in shapes)  # off-grid
    # The large shape sets the cost: no shape has more pixels per image than large x large.
    assert (1, large, large) in shapes and max(h * w for _, h, w in shapes) == large * large
    assert min(min(h, w) for _, h, w in shapes) <= 32


def test_default_sweep_scales_down_shapes_whose_activations_pass_the_cap(
        tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose attention runs at full resolution grows with the square of the pixels: the default sweep scales
    down the shapes it cannot afford and says which, and how to check them as asked."""
    import attn_export.verify as verify_module
    from attn_export.graph.memory import DEFAULT_SHAPE_ACTIVATIONS, SizeModel

    assert verify_module.SWEEP_ACTIVATIONS == DEFAULT_SHAPE_ACTIVATIONS  # one cap for the shapes chosen for the user
    spec = spec_of(tiny_onnx)
    sweep = default_shapes(spec)
    sizes = SizeModel(onnx.load(str(tiny_onnx), load_external_data=False), spec)
    need = {s: sizes.need(s) for s in sweep}
    cap = sorted(need.values())[1]  # the two cheapest shapes fit
    monkeypatch.setattr(verify_module, "SWEEP_ACTIVATIONS", cap)
    report = verify(tiny_onnx)
    ran = [tuple(r.shape) for r in report.shapes]
    over = [s for s in sweep if need[s] > cap]
    assert over and len(report.notes) == len(over)
    assert all(s in ran for s in sweep if need[s] <= cap) and not any(s in ran for s in over)
    assert all(sizes.need(s) <= cap for s in ran)
    for s, note in zip(over, report.notes):
        text = "x".join(map(str, s))
        assert note.startswith(f"{text} scaled down to ") or note.startswith(f"{text} left out")
        assert f"--shapes {text} checks it" in note
        if "scaled down to " in note:
            used = tuple(int(v) for v in note.split("scaled down to ")[1].split()[0].split("x"))
            assert used in ran and used[0] == s[0] and used[1] < s[1] and used[2] < s[2]
    assert report.to_dict()["notes"] == report.notes
    # Shapes the user names are never changed.
    big = max(sweep, key=lambda s: need[s])
    assert [tuple(r.shape) for r in verify(tiny_onnx, shapes=[big]).shapes] == [big]


def test_engine_sweep_uses_profile_corners_and_an_inside_off_grid_shape(tiny_onnx: Path) -> None:
    from attn_export.engines.profiles import Profile, find_profile

    spec = spec_of(tiny_onnx)
    profiles = [Profile((1, 32, 32), (1, 64, 64), (4, 128, 128)), Profile((1, 256, 256), (1, 256, 256), (1, 256, 512))]
    shapes = engine_shapes(profiles, spec)
    for p in profiles:
        assert p.min in shapes and p.opt in shapes and p.max in shapes
    extra = [s for s in shapes if all(s not in (p.min, p.opt, p.max) for p in profiles)]
    assert len(extra) == 2
    for s in extra:
        assert find_profile(profiles, *s) is not None
        assert not _is_pow2(s[1]) or not _is_pow2(s[2])


# ---------------------------------------------------------------------------------------------------------------------
# end to end on real exports
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_decomposed_onnx"])
def test_verify_passes_default_sweep(request, fixture: str, tmp_path: Path, wide_console) -> None:
    path = request.getfixturevalue(fixture)
    out = tmp_path / "report.json"
    result = run("verify", path, "--report", out)
    assert result.exit_code == 0, result.output
    assert "atol 1e-04, rtol 1e-03, statistic elemwise" in result.stdout
    assert "PASSED" in result.stdout and "onnxruntime" in result.stdout and "pytorch" in result.stdout
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["shape_source"] == "default"
    assert [s["shape"] for s in data["shapes"]] == ["1x8x8", "2x32x32", "1x32x48", "3x12x20", "1x64x64"]
    assert set(data["timings"]) == {"pytorch", "onnxruntime"}
    for s in data["shapes"]:
        (o,) = s["outputs"]
        assert o["passed"] and o["max_abs"] < 1e-4 and o["nan_cand"] == 0
        # Every figure shown in the table is in the report, with the same value.
        assert all(k in o for k in TABLE_KEYS)
        row = next(line for line in result.stdout.splitlines() if line.startswith(f"│ {s['shape']} "))
        for key in ("max_abs", "mean_abs", "max_rel", "p99_abs", "min_atol", "min_rtol"):
            assert f"{o[key]:.2e}" in row, (key, row)
        assert f"{o['cosine']:.6f}" in row and f"{o['nan_cand']}/{o['inf_cand']}" in row


def test_verify_api_report(tiny_onnx: Path) -> None:
    steps = []
    report = verify(tiny_onnx, shapes="1x8x8,2x16x24", seed=3, progress=lambda text, d=None, t=None: steps.append((d, t)))
    assert report.passed and report.shape_source == "user" and report.seed == 3
    assert [s.shape for s in report.shapes] == [(1, 8, 8), (2, 16, 24)]
    assert steps[-1][0] == steps[-1][1]
    back = json.loads(report.to_json())
    assert back["shapes"][1]["outputs"][0]["shape"] == [2, 3, 16, 24]
    assert back["tolerances"] == {"atol": 1e-4, "rtol": 1e-3, "stat": "elemwise", "quantile": 0.99}


def test_planted_weight_change_fails(tiny_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    # The largest conv weight: one element changed, everything else (metadata included) kept.
    init = max((i for i in model.graph.initializer if len(i.dims) == 4), key=lambda i: int(np.prod(i.dims)))
    w = numpy_helper.to_array(init).copy()
    w.flat[5] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    bad = tmp_path / "bad_weight.onnx"
    onnx.save(model, str(bad))
    out = tmp_path / "r.json"
    result = run("verify", bad, "--shapes", "1x8x8,2x16x24", "--report", out)
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.stdout and "FAIL" in result.stdout
    data = json.loads(out.read_text())
    assert data["passed"] is False
    assert all(not s["passed"] for s in data["shapes"])
    assert any("1x8x8 out:" in f and "exceed both" in f for f in data["failures"])


def _nan_when_small(src: Path, dst: Path, below: float) -> None:
    """Add out + 0*log(H - below): NaN exactly when H < below (or equal), the output unchanged otherwise."""
    model = onnx.load(str(src))
    g = model.graph
    producer = next(n for n in g.node if "out" in n.output)
    producer.output[list(producer.output).index("out")] = "out_raw"
    g.initializer.extend([
        numpy_helper.from_array(np.array(2, dtype=np.int64), "nan_axis"),
        numpy_helper.from_array(np.array(below, dtype=np.float32), "nan_k"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "nan_zero"),
    ])
    g.node.extend([
        helper.make_node("Shape", ["x"], ["nan_shape"]),
        helper.make_node("Gather", ["nan_shape", "nan_axis"], ["nan_h"], axis=0),
        helper.make_node("Cast", ["nan_h"], ["nan_hf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["nan_hf", "nan_k"], ["nan_d"]),
        helper.make_node("Log", ["nan_d"], ["nan_log"]),
        helper.make_node("Mul", ["nan_log", "nan_zero"], ["nan_term"]),
        helper.make_node("Add", ["out_raw", "nan_term"], ["out"]),
    ])
    onnx.save(model, str(dst))


def test_planted_nan_at_one_shape_fails_there_only(tiny_onnx: Path, tmp_path: Path, wide_console) -> None:
    bad = tmp_path / "nan_small.onnx"
    _nan_when_small(tiny_onnx, bad, below=10.0)  # only the 1x8x8 shape of the default sweep has H < 10
    out = tmp_path / "r.json"
    result = run("verify", bad, "--report", out)
    assert result.exit_code == 1, result.output
    data = json.loads(out.read_text())
    verdicts = {s["shape"]: s["passed"] for s in data["shapes"]}
    assert verdicts == {"1x8x8": False, "2x32x32": True, "1x32x48": True, "3x12x20": True, "1x64x64": True}
    o = data["shapes"][0]["outputs"][0]
    assert o["nan_cand"] == 1 * 3 * 8 * 8 and o["nan_ref"] == 0 and o["min_atol"] == "inf"
    assert data["failures"] == [data["failures"][0]] and "non-finite" in data["failures"][0]
    row = next(line for line in result.stdout.splitlines() if line.startswith("│ 1x8x8 "))
    assert "192/0" in row and "FAIL" in row


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two safetensors checkpoints of the tiny preset with the same keys and shapes, different weights."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        module = load_model(ModelSource(preset="tiny", seed=seed)).module
        path = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
        out[name] = path
    return out


@pytest.fixture(scope="module")
def ckpt_export(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt_export") / "tiny_ckpt.onnx"
    export_onnx(ModelSource(preset="tiny", checkpoint=checkpoints["a"]), path, check=False)
    return path


def test_checkpoint_export_verifies(ckpt_export: Path, checkpoints: dict[str, Path]) -> None:
    assert run("verify", ckpt_export, "--shapes", "1x8x8", "--checkpoint", checkpoints["a"]).exit_code == 0
    # The recorded path is data: read only with the opt-in.
    assert run("verify", ckpt_export, "--shapes", "1x8x8", "--trust-artifact").exit_code == 0


def test_recorded_checkpoint_path_not_read_without_opt_in(ckpt_export: Path, checkpoints: dict[str, Path]) -> None:
    result = run("verify", ckpt_export, "--shapes", "1x8x8")
    one_line_error(result, "a path inside a file is data")
    assert str(checkpoints["a"].resolve()) in result.output and "--checkpoint" in result.output


def test_different_checkpoint_refused_unless_forced(ckpt_export: Path, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    result = run("verify", ckpt_export, "--shapes", "1x8x8", "--checkpoint", checkpoints["b"])
    one_line_error(result, "--allow-checkpoint-mismatch")
    out = tmp_path / "r.json"
    result = run("verify", ckpt_export, "--shapes", "1x8x8", "--checkpoint", checkpoints["b"],
                 "--allow-checkpoint-mismatch", "--report", out)
    assert result.exit_code == 1, result.output
    data = json.loads(out.read_text())
    assert data["checkpoint"]["matches"] is False and data["checkpoint"]["path"] == str(checkpoints["b"])


def test_checkpoint_without_recorded_one_refused(tiny_onnx: Path, checkpoints: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="without a checkpoint"):
        verify(tiny_onnx, shapes="1x8x8", reference_model=ReferenceOptions(checkpoint=checkpoints["a"]))


def test_swapped_checkpoint_file(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "ema.safetensors"
    shutil.copy(checkpoints["a"], ckpt)
    path = tmp_path / "m.onnx"
    export_onnx(ModelSource(preset="tiny", checkpoint=ckpt), path, check=False)
    assert run("verify", path, "--shapes", "1x8x8", "--trust-artifact").exit_code == 0
    shutil.copy(checkpoints["b"], ckpt)  # same keys and shapes, other weights
    one_line_error(run("verify", path, "--shapes", "1x8x8", "--trust-artifact"), "changed since export")
    result = run("verify", path, "--shapes", "1x8x8,1x12x8", "--allow-checkpoint-mismatch", "--trust-artifact")
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.stdout


@pytest.mark.parametrize("shapes,needle", [
    ("1x8x10", "multiples of 4"),
    ("0x8x8", "batch must be at least 1"),
    ("2x8", "BATCHxHEIGHTxWIDTH"),
])
def test_unservable_shape_refused(tiny_onnx: Path, shapes: str, needle: str) -> None:
    one_line_error(run("verify", tiny_onnx, "--shapes", shapes), needle)


def test_bad_options_refused(tiny_onnx: Path, tmp_path: Path) -> None:
    one_line_error(run("verify", tiny_onnx, "--stat", "p42"), "--stat")
    one_line_error(run("verify", tiny_onnx, "--report", tmp_path / "nope" / "r.json"), "does not exist")
    one_line_error(run("verify", tmp_path / "missing.onnx"), "not found")
    with pytest.raises(ShapeError):
        verify(tiny_onnx, shapes=[(1, 9, 8)])


def test_tolerances_are_settable(tiny_onnx: Path) -> None:
    result = run("verify", tiny_onnx, "--shapes", "1x8x8", "--atol", "0", "--rtol", "0")
    assert result.exit_code == 1
    assert "atol 0e+00, rtol 0e+00" in result.stdout
    result = run("verify", tiny_onnx, "--shapes", "1x8x8", "--atol", "0", "--rtol", "0.5", "--stat", "quantile",
                 "--quantile", "0.5")
    assert result.exit_code == 0, result.output
    assert "quantile 0.5" in result.stdout


# ---------------------------------------------------------------------------------------------------------------------
# engines (no TensorRT here)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_engine(tiny_onnx: Path, tmp_path: Path) -> Path:
    from attn_export.engines.profiles import Profile

    return make_fake_engine(tiny_onnx, tmp_path, Profile((1, 32, 32), (1, 64, 64), (4, 128, 128)))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_engine_without_tensorrt_is_one_line(fake_engine: Path) -> None:
    one_line_error(run("verify", fake_engine), "TensorRT")


def test_engine_shape_outside_profiles_refused(fake_engine: Path) -> None:
    one_line_error(run("verify", fake_engine, "--shapes", "1x256x256"), "outside the engine's optimization profiles")
    one_line_error(run("verify", fake_engine, "--provider", "cuda"), "--provider")


def test_engine_without_sidecar_refused(tmp_path: Path) -> None:
    engine = tmp_path / "lonely.plan"
    engine.write_bytes(b"x")
    one_line_error(run("verify", engine), "not found")


# ---------------------------------------------------------------------------------------------------------------------
# the other presets
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("attention", ["op", "decomposed"])
@pytest.mark.parametrize("preset, largest", [("ddpm-cifar10", 64), ("ddpm-256", 128)])
def test_verify_passes_default_sweep_large_presets(export_model, tmp_path: Path, preset: str, largest: int,
                                                   attention: str) -> None:
    """The default sweep on the big presets (exports of 10-30 s each on 2 cores, sweeps of 5-15 s)."""
    out = tmp_path / "r.json"
    result = run("verify", export_model(preset, attention), "--report", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["passed"] and len(data["shapes"]) == 5
    assert max(s["height"] for s in data["shapes"]) == largest


def test_fp16_artifact_uses_fp16_tolerances(tiny_onnx: Path, tmp_path: Path) -> None:
    from attn_export.exporter.fp16 import convert_fp16

    half = tmp_path / "tiny_fp16.onnx"
    convert_fp16(tiny_onnx, half, check=False)
    result = run("verify", half, "--shapes", "1x8x8,2x16x24")
    assert result.exit_code == 0, result.output
    assert "atol 1e-02, rtol 1e-02, statistic mean" in result.stdout
    # The same errors fail the fp32 defaults: FP16 needs its own tolerances.
    assert run("verify", half, "--shapes", "1x8x8", "--atol", "1e-4", "--rtol", "1e-3", "--stat", "elemwise").exit_code == 1


def test_reference_is_freed_before_the_candidate_runs(tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Peak memory is the larger model, not both: every reference call comes first, then the reference is
    # deactivated, and only then does the candidate (loaded once up front to fail early) run.
    from attn_export.runners.ort_runner import OrtRunner
    from attn_export.runners.torch_runner import TorchRunner

    events: list[str] = []
    for cls, tag in ((TorchRunner, "ref"), (OrtRunner, "cand")):
        for method in ("_activate", "_deactivate", "_infer"):
            original = getattr(cls, method)
            event = f"{tag}.{method.strip('_')}"

            def wrapped(self: object, *a: object, _o=original, _e=event, **k: object) -> object:
                events.append(_e)
                return _o(self, *a, **k)
            monkeypatch.setattr(cls, method, wrapped)
    report = verify(tiny_onnx, shapes=[(1, 16, 16), (2, 16, 24)])
    assert report.passed and len(report.shapes) == 2
    assert events == ["cand.activate", "cand.deactivate", "ref.activate", "ref.infer", "ref.infer",
                      "ref.deactivate", "cand.activate", "cand.infer", "cand.infer", "cand.deactivate"]
    assert all(len(s.seconds) == 2 and min(s.seconds.values()) > 0 for s in report.shapes)


def _cuda_provider_starts() -> bool:
    """Whether ONNX Runtime really creates its CUDA provider here (it lists it wherever onnxruntime-gpu is installed)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    ort.set_default_logger_severity(4)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    return "CUDAExecutionProvider" in s.get_providers()


def test_a_provider_that_cannot_start_is_refused(tiny_onnx: Path) -> None:
    """ONNX Runtime falls back to the CPU when CUDA cannot start; verify and bench must not report a CUDA run."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        r = run("verify", tiny_onnx, "--provider", "cuda")
        assert r.exit_code == 2 and "not available here" in r.output, r.output
        return
    if _cuda_provider_starts():
        pytest.skip("this machine runs ONNX Runtime's CUDA provider; the refusal is for machines that cannot")
    for args in (("verify", tiny_onnx, "--provider", "cuda"), ("bench", tiny_onnx, "--backend", "onnxruntime",
                                                               "--provider", "cuda", "--shapes", "1x8x8")):
        r = run(*args)
        assert r.exit_code == 2, r.output
        assert "could not create CUDAExecutionProvider" in r.output and "PASSED" not in r.output
        assert len(r.output.strip().splitlines()) == 1, r.output


def test_verify_runs_the_file_as_written_by_default(export_model, wide_console) -> None:
    """verify of an op export runs the file's own Attention nodes, and says so; --form serving runs the serving form."""
    path = export_model("tiny", "op")
    r = run("verify", path, "--shapes", "1x16x16")
    assert r.exit_code == 0, r.output
    assert "the file as written, 4 x Attention op" in r.output and "MultiHeadAttention" not in r.output
    r = run("verify", path, "--shapes", "1x16x16", "--form", "serving")
    assert r.exit_code == 0 and "serving form" in r.output, r.output
    r = run("verify", path, "--form", "rewritten")
    assert r.exit_code == 2 and "--form must be one of written, serving" in r.output


def test_runner_call_takes_one_timestep_for_the_batch(tiny_onnx: Path) -> None:
    """Samplers pass one timestep for the batch: a number or a (1,) array holds for every sample."""
    from attn_export.runners.ort_runner import OrtRunner

    runner = OrtRunner(tiny_onnx)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = runner(x, np.array([10, 10]))
    assert np.array_equal(runner(x, 10), want)
    assert np.array_equal(runner(x, np.array([10])), want)
    assert not np.array_equal(runner(x, np.array([10, 500])), want)  # per-sample timesteps still per sample
    with pytest.raises(UsageError, match="x must be a 4-D array"):
        runner([1, 2, 3], 10)
