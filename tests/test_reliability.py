"""The bad-input matrix, run as a user would: every case gets its exit code, one line naming what is wrong,
no traceback, and no output or temporary file left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import onnx
import pytest
import torch
from safetensors.torch import save_file

from attn_export.engines.sidecar import check_compatible
from attn_export.errors import UsageError
from attn_export.models.loader import ModelSource, load_model
from conftest import run_cli_in_process as run

ROOT = Path(__file__).resolve().parents[1]


def assert_one_line(result: Any, code: int, needle: str) -> None:
    """Exit ``code``, one line on stderr containing ``needle``, no exception escaping the command."""
    text = result.output
    assert result.exit_code == code, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in text
    assert needle in lines[0], lines[0]


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Files in ``folder`` other than ``keep``: outputs or temporary files a failed command left."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------------
# model sources and shapes
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["onnx", "--preset", "nope", "-o", "out.onnx"], "unknown preset 'nope'"),
    (["onnx", "--preset", "tiny", "--config", "c.json", "-o", "out.onnx"], "give only one of"),
    (["onnx", "--config", "missing.json", "-o", "out.onnx"], "config file not found"),
    (["onnx", "--preset", "tiny", "--model-kwargs", "{bad", "-o", "out.onnx"], "--model-kwargs"),
    (["onnx", "--preset", "tiny", "--opset", "7", "-o", "out.onnx"], "--opset must be between"),
])
def test_bad_model_source(work: Path, args: list[str], needle: str) -> None:
    assert_one_line(run(*args), 2, needle)
    assert leftovers(work, set()) == []


@pytest.mark.parametrize("shapes,needle", [
    ("1x8", "bad shape"),
    ("axbxc", "bad shape"),
    ("1x-8x8", "bad shape"),
    ("1x8.5x8", "bad shape"),
    ("0x8x8", "batch must be at least 1"),
    ("1x0x8", "multiples of 4"),
    ("1x10x8", "multiples of 4"),
    ("1x4096x4096", "over the"),
    ("1x999999996x999999996", "over the"),
])
@pytest.mark.parametrize("command", ["verify", "bench"])
def test_bad_shapes(tiny_onnx: Path, work: Path, command: str, shapes: str, needle: str) -> None:
    assert_one_line(run(command, tiny_onnx, "--shapes", shapes), 2, needle)
    assert leftovers(work, set()) == []


def test_huge_shape_names_the_estimate(tiny_onnx: Path, work: Path) -> None:
    result = run("verify", tiny_onnx, "--shapes", "1x4096x4096")
    assert_one_line(result, 2, "attention scores")
    assert "TiB" in result.stderr and "--max-memory" in result.stderr
    # The bound is the user's to move: a small limit refuses a small shape, and a bad size is named.
    assert_one_line(run("verify", tiny_onnx, "--shapes", "1x64x64", "--max-memory", "1MiB"), 2, "over the 1.0 MiB limit")
    assert_one_line(run("verify", tiny_onnx, "--shapes", "1x8x8", "--max-memory", "lots"), 2, "--max-memory must be")


def test_huge_calibration_shape_refused_before_the_audit(tiny_onnx: Path, work: Path) -> None:
    assert_one_line(run("fp16", tiny_onnx, "-o", "t16.onnx", "--calibration-shapes", "1x2048x2048"), 2, "calibration shape")
    assert leftovers(work, set()) == []


@pytest.mark.parametrize("profile,needle", [
    (["--min", "1x8x8", "--opt", "1x16x16"], "do not pair up"),
    (["--min", "2x16x16", "--opt", "1x16x16", "--max", "4x32x32"], "min <= opt <= max"),
    (["--min", "1x8x8", "--opt", "1x16x16", "--max", "1x18x18"], "not a positive multiple of 4"),
    (["--min", "1x8x8", "--opt", "1x16", "--max", "1x32x32"], "bad shape"),
])
def test_bad_profiles(tiny_onnx: Path, work: Path, profile: list[str], needle: str) -> None:
    assert_one_line(run("trt", tiny_onnx, "-o", "e.plan", *profile), 2, needle)
    assert leftovers(work, set()) == []


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpts")
    state = {k: v.contiguous() for k, v in load_model(ModelSource(preset="tiny")).module.state_dict().items()}
    save_file(state, str(folder / "good.safetensors"))
    data = (folder / "good.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "empty.pt").write_bytes(b"")
    save_file({"prefix." + k: v for k, v in state.items()}, str(folder / "wrong-keys.safetensors"))
    torch.save({k: v[..., :1].clone() if v.ndim else v for k, v in state.items()}, folder / "wrong-shapes.pt")

    class RunsCode:
        def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
            return os.system, (f"touch {folder / 'PWNED'}",)

    torch.save({"state_dict": RunsCode()}, folder / "runs-code.pt")
    return {p.name: p for p in folder.iterdir()} | {"missing.safetensors": folder / "missing.safetensors"}


@pytest.mark.parametrize("name,needle", [
    ("missing.safetensors", "checkpoint not found"),
    ("empty.safetensors", "cannot read safetensors checkpoint"),
    ("empty.pt", "cannot read checkpoint"),
    ("truncated.safetensors", "cannot read safetensors checkpoint"),
    ("wrong-keys.safetensors", "does not fit the model"),
    ("wrong-shapes.pt", "does not fit the model"),
    ("runs-code.pt", "loading it could run code"),
])
def test_bad_checkpoints(checkpoint_files: dict[str, Path], work: Path, name: str, needle: str) -> None:
    assert_one_line(run("onnx", "--preset", "tiny", "--checkpoint", checkpoint_files[name], "-o", "out.onnx"), 2, needle)
    assert leftovers(work, set()) == []
    assert not (checkpoint_files["good.safetensors"].parent / "PWNED").exists()


def test_recorded_checkpoint_path_is_not_read(checkpoint_files: dict[str, Path], work: Path) -> None:
    """A description naming a checkpoint (even one that runs code) is data: nothing is read without the user."""
    assert run("onnx", "--preset", "tiny", "--checkpoint", checkpoint_files["good.safetensors"], "-o", "m.onnx",
               "--no-check").exit_code == 0
    hostile = _edit_spec(work / "m.onnx", work / "h.onnx",
                         lambda d: d.update(checkpoint={"path": str(checkpoint_files["runs-code.pt"]), "sha256": "0" * 64,
                                                        "key": None, "layout": None}))
    for command in (["verify", hostile, "--shapes", "1x8x8"], ["fp16", hostile, "-o", "h16.onnx"]):
        assert_one_line(run(*command), 2, "a path inside a file is data")
    assert not (work / "h16.onnx").exists()


# ---------------------------------------------------------------------------------------------------------------------
# ONNX files and their descriptions
# ---------------------------------------------------------------------------------------------------------------------
def _edit_spec(src: Path, out: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    model = onnx.load(str(src))
    for p in model.metadata_props:
        if p.key == "attn_export.spec":
            data = json.loads(p.value)
            edit(data)
            p.value = json.dumps(data)
    onnx.save(model, str(out))
    return out


def _set_raw(src: Path, out: Path, text: str) -> Path:
    model = onnx.load(str(src))
    for p in model.metadata_props:
        if p.key == "attn_export.spec":
            p.value = text
    onnx.save(model, str(out))
    return out


BROKEN_FILES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "empty": (lambda src, out: (out.write_bytes(b""), out)[1], "not an ONNX model"),
    "truncated": (lambda src, out: (out.write_bytes(src.read_bytes()[:3000]), out)[1], "not a readable ONNX file"),
    "random": (lambda src, out: (out.write_bytes(os.urandom(4096)), out)[1], "ONNX"),
    "graph-less": (lambda src, out: (onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])),
                                               str(out)), out)[1], "not an ONNX model"),
    "not-json": (lambda src, out: _set_raw(src, out, "{not json"), "not valid JSON"),
    "huge-json": (lambda src, out: _set_raw(src, out, "[" * 100_000), "description"),
    "unknown-key": (lambda src, out: _edit_spec(src, out, lambda d: d.update(evil=1)), "unknown keys evil"),
    "bad-dim": (lambda src, out: _edit_spec(src, out, lambda d: d["inputs"][0]["dims"].__setitem__(2, "rm -rf")),
                "description.inputs[0].dims[2]"),
    "negative-multiple": (lambda src, out: _edit_spec(src, out, lambda d: d.update(hw_multiple=-4)), "hw_multiple"),
    "bad-dtype": (lambda src, out: _edit_spec(src, out, lambda d: d["inputs"][1].update(dtype="object")), "dtype"),
    "bool-as-int": (lambda src, out: _edit_spec(src, out, lambda d: d.update(num_timesteps=True)), "num_timesteps"),
    "bad-source": (lambda src, out: _edit_spec(src, out, lambda d: d.update(source={"kind": "shell"})), "source.kind"),
    "bad-factory": (lambda src, out: _edit_spec(src, out, lambda d: d.update(
        source={"kind": "import", "model": "__import__('os').system('id')"})), "source.model"),
    "external-outside": (lambda src, out: _external_outside(src, out), "outside the model's folder"),
}


def _external_outside(src: Path, out: Path) -> Path:
    model = onnx.load(str(src))
    init = max(model.graph.initializer, key=lambda i: len(i.raw_data))
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../../../etc/passwd"), ("offset", "0"), ("length", "64")):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize("kind", sorted(BROKEN_FILES))
@pytest.mark.parametrize("command", [
    ["inspect", "{f}"], ["verify", "{f}", "--shapes", "1x8x8"], ["fp16", "{f}", "-o", "out16.onnx"],
    ["bench", "{f}", "--shapes", "1x8x8", "--iterations", "1"], ["triton", "{f}", "--repo", "repo"],
    ["optimize", "{f}", "-o", "opt.onnx"], ["inspect", "{f}", "--trt"],
], ids=lambda c: "-".join(a for a in c if not a.startswith("{") and not a.startswith("-") and "x" not in a)[:20])
def test_broken_and_hostile_onnx_files(tiny_onnx: Path, work: Path, kind: str, command: list[str]) -> None:
    make, needle = BROKEN_FILES[kind]
    path = make(tiny_onnx, work / f"{kind}.onnx")
    result = run(*[a.replace("{f}", str(path)) for a in command])
    assert_one_line(result, 2, needle)
    assert leftovers(work, {path.name}) == []


# ---------------------------------------------------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------------------------------------------------
def _sidecar(trt: str = "10.14.1.48", cc: str = "8.9", level: str = "none") -> dict[str, Any]:
    return {"engine_file": "e.plan", "tensorrt_version": trt, "gpu": {"name": "NVIDIA L4", "compute_capability": cc},
            "hardware_compatibility": level}


@pytest.mark.parametrize("here,needle", [
    (("11.0.0.1", "NVIDIA L4", "8.9"), "built with TensorRT 10.14.1.48 but this is TensorRT 11.0.0.1"),
    (("10.14.1.48", "NVIDIA A100", "8.0"), "built on NVIDIA L4 (compute capability 8.9) but this GPU is NVIDIA A100"),
])
def test_engine_from_another_version_or_gpu(here: tuple[str, str, str], needle: str) -> None:
    with pytest.raises(UsageError, match="rebuild the engine") as info:
        check_compatible(_sidecar(), *here)
    assert needle in str(info.value)
    check_compatible(_sidecar(level="ampere_plus"), "10.14.1.48", "NVIDIA A100", "8.0")  # allowed: built for Ampere+


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.update(tensorrt_version="$(id)"), "tensorrt_version"),
    (lambda d: d["gpu"].update(compute_capability="eight"), "compute_capability"),
    (lambda d: d.update(engine_file="../../x.plan"), "engine_file"),
    (lambda d: d["profiles"][0].update(max=[1, -1, 8]), "profiles[0].max"),
    (lambda d: d["model"].update(source={"kind": "import", "model": "os:system", "model_kwargs": {"c": 1}, "x": 1}),
     "unknown keys x"),
    (lambda d: d.pop("io"), "lacks io"),
])
def test_hostile_sidecar(tiny_onnx: Path, work: Path, edit: Callable[[dict[str, Any]], Any], needle: str) -> None:
    from attn_export.engines.profiles import Profile
    from attn_export.engines.sidecar import make_sidecar, sidecar_path
    from attn_export.exporter.foreign import spec_of

    spec = spec_of(tiny_onnx)
    data = make_sidecar(engine_path="e.plan", engine_sha256="0" * 64, tensorrt_version="10.14.1.48", gpu_name="GPU",
                        compute_capability="8.9", profiles=[Profile((1, 8, 8), (1, 16, 16), (2, 32, 32))], spec=spec,
                        io=[{"name": "x", "mode": "input", "dtype": "float32", "shape": [-1, 3, -1, -1]}],
                        onnx_path="m.onnx", onnx_sha256="0" * 64, precision="fp16")
    edit(data)
    (work / "e.plan").write_bytes(b"not a plan")
    sidecar_path(work / "e.plan").write_text(json.dumps(data))
    for command in (["inspect", "e.plan"], ["verify", "e.plan"], ["triton", "e.plan", "--repo", "repo"]):
        assert_one_line(run(*command), 2, needle)
    assert leftovers(work, {"e.plan", "e.plan.json"}) == []


# ---------------------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------------------
def _unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        return Path("/sys")  # root ignores permission bits; sysfs refuses new files even to root
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.mark.parametrize("where,needle", [
    ("missing/out.onnx", "output folder does not exist"),
    ("folder", "output path is a folder"),
    ("existing.onnx", "output file exists"),
    ("unwritable", "cannot write in"),
])
def test_bad_export_outputs(work: Path, where: str, needle: str) -> None:
    (work / "folder").mkdir()
    (work / "existing.onnx").write_bytes(b"keep me")
    out = _unwritable_folder(work) / "out.onnx" if where == "unwritable" else work / where
    assert_one_line(run("onnx", "--preset", "tiny", "-o", out), 2, needle)
    assert (work / "existing.onnx").read_bytes() == b"keep me"
    assert leftovers(work, {"folder", "existing.onnx", "ro"}) == []
    assert not out.exists() or out.is_dir() or out == work / "existing.onnx"


def test_outputs_onto_their_input(tiny_onnx: Path, checkpoint_files: dict[str, Path], work: Path) -> None:
    model = work / "m.onnx"
    shutil.copy(tiny_onnx, model)
    before = model.read_bytes()
    assert_one_line(run("fp16", model, "-o", model, "--force"), 2, "different file")
    assert_one_line(run("optimize", model, "-o", model, "--force"), 2, "different file")
    ckpt = work / "good.safetensors"
    shutil.copy(checkpoint_files["good.safetensors"], ckpt)
    assert_one_line(run("onnx", "--preset", "tiny", "--checkpoint", ckpt, "-o", ckpt, "--force"), 2, "own input file")
    assert model.read_bytes() == before and ckpt.read_bytes() == checkpoint_files["good.safetensors"].read_bytes()
    assert leftovers(work, {"m.onnx", "good.safetensors"}) == []


def test_report_paths(tiny_onnx: Path, work: Path) -> None:
    assert_one_line(run("verify", tiny_onnx, "--shapes", "1x8x8", "--report", "missing/r.json"), 2, "cannot write the report")
    assert_one_line(run("fp16", tiny_onnx, "-o", "o.onnx", "--report", str(work)), 2, "cannot write the report")
    assert leftovers(work, set()) == []


# ---------------------------------------------------------------------------------------------------------------------
# processes: concurrent writers and signals
# ---------------------------------------------------------------------------------------------------------------------
def _cli(*args: object, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "attn_export", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)


def test_two_exports_to_one_output(work: Path) -> None:
    out = work / "same.onnx"
    procs = [_cli("onnx", "--preset", "tiny", "-o", out, "--no-check", "--seed", str(i)) for i in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    for code, err in results:
        assert code in (0, 2), err
        assert "Traceback" not in err
    assert any(code == 0 for code, _ in results)
    onnx.checker.check_model(onnx.load(str(out)))  # one whole file, never a mix of two
    assert leftovers(work, {"same.onnx"}) == []


def _wait_for(predicate: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the command ended (exit {proc.returncode}) before it could be interrupted: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("the command never reached the point to interrupt")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_export(work: Path, sig: int, code: int) -> None:
    tmp = work / "tmp"
    tmp.mkdir()
    out_dir = work / "out"
    out_dir.mkdir()
    # The export stages its work in a temporary folder (next to the output, or the system's): the signal
    # arrives while that work is under way.
    proc = _cli("onnx", "--preset", "ddpm-cifar10", "-o", out_dir / "u.onnx", env={"TMPDIR": str(tmp)})
    _wait_for(lambda: any(tmp.iterdir()) or any(out_dir.iterdir()), proc)
    staged = sorted(p.name for d in (tmp, out_dir) for p in d.iterdir())
    proc.send_signal(sig)
    returned = proc.wait(timeout=120)
    err = proc.stderr.read() if proc.stderr else ""
    # What was staged when the signal went out, and what the command said: a code other than 130/143 here was
    # seen once under load (-2, as if no handler were installed) and never reproduced since.
    assert returned == code, f"exit {returned} after a signal sent with {staged} staged; stderr: {err[-2000:]}"
    assert "Traceback" not in err and "interrupted" in err, err
    assert leftovers(out_dir, set()) == [] and leftovers(tmp, set()) == []


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_fp16(tiny_onnx: Path, work: Path, sig: int, code: int) -> None:
    out_dir = work / "out"
    out_dir.mkdir()
    # The FP16 file is written to a temporary name and checked there: interrupt while it is.
    proc = _cli("fp16", tiny_onnx, "-o", out_dir / "t16.onnx", "--calibration-shapes", "1x8x8,2x64x64")
    _wait_for(lambda: any(out_dir.iterdir()), proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code
    err = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in err and "interrupted" in err, err
    assert leftovers(out_dir, set()) == []


def _wait_for_our_handlers(proc: subprocess.Popen[str]) -> None:
    """Return once the child catches SIGTERM, i.e. attn-export's first instruction has run (or the child ended).

    Before that the interpreter itself is starting (site, .pth files: about 20 ms quiet, several times that under
    load), and a signal is CPython's to handle: SIGINT there is its "Fatal Python error: init_import_site", SIGTERM
    kills the process. No attn-export code has run and nothing is written; the promise starts at the entry point.
    """
    status = Path(f"/proc/{proc.pid}/status")
    if not status.exists():
        return
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            caught = next(int(line.split()[1], 16) for line in status.read_text().splitlines()
                          if line.startswith("SigCgt:"))
        except (OSError, StopIteration):
            return
        if caught >> (signal.SIGTERM - 1) & 1:
            return
        time.sleep(0.001)


@pytest.mark.parametrize("command", ["onnx", "fp16", "optimize"])
def test_signals_at_random_points_leave_nothing(command: str, tiny_onnx: Path, work: Path) -> None:
    """SIGINT or SIGTERM at random moments of a whole run (from attn-export's entry point on, imports included):
    130 or 143 and nothing in the output folder, or, when the command finished first, exit 0 and its complete
    output."""
    import random

    out_dir = work / "out"
    out_dir.mkdir()
    args = {"onnx": ["onnx", "--preset", "tiny"],
            "fp16": ["fp16", tiny_onnx, "--calibration-shapes", "1x8x8,2x32x32"],
            "optimize": ["optimize", tiny_onnx]}[command]
    started = time.monotonic()
    proc = _cli(*args, "-o", out_dir / "whole.onnx")
    assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    whole = time.monotonic() - started
    finished = sorted(p.name for p in out_dir.iterdir())
    shutil.rmtree(out_dir)
    out_dir.mkdir()
    # New points on every run, so that runs add up to many; the seed is in every message, to replay a failure
    # (ATTN_EXPORT_SIGNAL_SEED=N).
    seed = int(os.environ.get("ATTN_EXPORT_SIGNAL_SEED") or random.SystemRandom().randrange(1 << 31))
    rng = random.Random(f"signals-{command}-{seed}")
    for i in range(4):
        sig, code = [(signal.SIGINT, 130), (signal.SIGTERM, 143)][i % 2]
        delay = rng.uniform(0.0, whole)
        proc = _cli(*args, "-o", out_dir / "whole.onnx")
        time.sleep(delay)
        _wait_for_our_handlers(proc)
        proc.send_signal(sig)
        returned = proc.wait(timeout=300)
        err = proc.stderr.read() if proc.stderr else ""
        left = sorted(p.name for p in out_dir.iterdir())
        assert "Traceback" not in err, (seed, err)
        if returned == 0:  # it finished before the signal
            assert left == finished, (seed, delay, left)
        else:
            assert returned == code, (f"{command}: exit {returned} after a signal at {delay:.2f} s of {whole:.2f} "
                                      f"(seed {seed}): {err[-800:]}")
            # Nothing, or (a signal as the command ended) its complete output: never a partial one.
            assert left in ([], finished), (seed, delay, left)
            if left:
                onnx.checker.check_model(str(out_dir / "whole.onnx"))
        shutil.rmtree(out_dir)
        out_dir.mkdir()
