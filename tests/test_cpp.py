"""The C++ side (attn_export/engines/cpp): the .npy library against numpy, and the engine runner.

The CMake project is configured and built once per session. cmake, a C++17
compiler and nlohmann/json 3.x (its CMake package, e.g. Debian's
nlohmann-json3-dev, or else the header-only PyPI package nlohmann-json of the
test dependencies, passed as ATTN_EXPORT_NLOHMANN_INCLUDE_DIR here and found
through the Python environment by a plain configure) are required: a missing one
fails the tests with CMake's message instead of skipping them, so a broken C++
build cannot hide behind a skip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import attn_export

CPP_DIR = Path(attn_export.__file__).resolve().parent / "engines" / "cpp"
DTYPES = ["float32", "float16", "float64", "int64", "int32", "uint8", "bool"]
SHAPES = [(), (5,), (2, 3, 4, 5), (0,), (3, 0, 2)]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)


def _check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def _json_hint() -> list[str]:
    """Where the header-only nlohmann-json test dependency (PyPI) keeps json.hpp; CMake uses it only when no
    system package (nlohmann_json's CMake config) is found."""
    try:
        import nlohmann_json
    except ImportError:
        return []
    include = Path(nlohmann_json.__file__).parent / "include"
    return [f"-DATTN_EXPORT_NLOHMANN_INCLUDE_DIR={include}"] if (include / "nlohmann" / "json.hpp").is_file() else []


def _need_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not on PATH; the C++ tests need CMake >= 3.18 and a C++17 compiler")


def _flat(text: str) -> str:
    """CMake wraps FATAL_ERROR text at 80 columns, splitting phrases across lines."""
    return " ".join(text.split())


def _configure_and_build(build: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    _need_tools("cmake", "ctest")
    configure = _run(["cmake", "-S", CPP_DIR, "-B", build, "-DCMAKE_BUILD_TYPE=Release", *_json_hint(), *extra])
    _check(configure, "cmake configure")
    _check(_run(["cmake", "--build", build, "--parallel", str(os.cpu_count() or 2)]), "cmake --build")
    return configure


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Configure, build and ctest the C++ project once; returns the build folder."""
    build = tmp_path_factory.mktemp("cpp_build")
    _configure_and_build(build)
    _check(_run(["ctest", "--output-on-failure"], cwd=build), "ctest")
    return build


@pytest.fixture(scope="session")
def roundtrip(cpp_build: Path):
    exe = cpp_build / ("npy_roundtrip.exe" if os.name == "nt" else "npy_roundtrip")
    assert exe.is_file(), f"npy_roundtrip was not built in {cpp_build}"

    def _roundtrip(src: Path, dst: Path) -> subprocess.CompletedProcess[str]:
        return _run([exe, src, dst])

    return _roundtrip


def _sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(sum(shape) + len(dtype))
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.startswith("float"):
        a = rng.standard_normal(size=shape).astype(dtype)
        if a.size >= 3:  # special values must survive the round trip bit for bit
            a.flat[:3] = [np.inf, -0.0, np.nan]
        return a
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def test_ctest_passes(cpp_build: Path) -> None:
    # The fixture already ran ctest; this makes the result visible as a test.
    assert (cpp_build / "CTestTestfile.cmake").is_file()


def test_missing_json_library_fails_configure(tmp_path: Path) -> None:
    # Without nlohmann/json the configure stops with a message naming every way to provide it: no build
    # quietly without the sidecar reader.
    _need_tools("cmake")
    proc = _run(["cmake", "-S", CPP_DIR, "-B", tmp_path / "b", "-DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=ON",
                 "-DATTN_EXPORT_NLOHMANN_FROM_PYTHON=OFF"])
    assert proc.returncode != 0
    err = _flat(proc.stderr)
    assert "nlohmann/json 3.x not found" in err, proc.stderr
    assert "nlohmann-json3-dev" in err  # the system package
    assert "-DATTN_EXPORT_NLOHMANN_INCLUDE_DIR=" in err  # a folder named by hand
    assert "pip install nlohmann-json" in err and "-DPython3_EXECUTABLE=" in err  # the PyPI package


def _activated_env() -> tuple[dict[str, str], list[str], str]:
    """The environment, extra cmake arguments and the source CMake should report for this interpreter, as a
    user would have it: in a virtualenv, activated (VIRTUAL_ENV and its bin/ first on PATH); outside one,
    named with -DPython3_EXECUTABLE."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "TensorRT_ROOT")}
    if sys.prefix == sys.base_prefix:
        return env, [f"-DPython3_EXECUTABLE={sys.executable}"], "-DPython3_EXECUTABLE"
    bindir = Path(sys.prefix) / ("Scripts" if os.name == "nt" else "bin")
    env["VIRTUAL_ENV"] = sys.prefix
    env["PATH"] = os.pathsep.join([str(bindir), env.get("PATH", "")])
    return env, [], "$VIRTUAL_ENV"


def test_json_found_through_python(tmp_path: Path) -> None:
    # No nlohmann_json CMake package and no ATTN_EXPORT_NLOHMANN_INCLUDE_DIR: the README's plain configure
    # line, run from the activated environment, takes the headers of its PyPI package nlohmann-json.
    _need_tools("cmake")
    spec = importlib.util.find_spec("nlohmann_json")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the PyPI package nlohmann-json (test extra) is not installed in this environment")
    include = Path(next(iter(spec.submodule_search_locations))) / "include"
    env, extra, how = _activated_env()
    proc = _run(["cmake", "-S", CPP_DIR, "-B", tmp_path / "b", "-DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=ON",
                 *extra], env=env)
    _check(proc, "cmake configure")
    line = next((ln for ln in proc.stdout.splitlines() if "attn_export: nlohmann/json" in ln), "")
    assert f"headers from {include.as_posix()} " in line, proc.stdout
    assert "PyPI package nlohmann-json of " in line and f"from {how})" in line, line
    # The folder reached the compile flags (flags.make for Makefiles, build.ninja for Ninja).
    generated = [*(tmp_path / "b").rglob("flags.make"), *(tmp_path / "b").glob("build.ninja")]
    assert any(include.as_posix() in p.read_text(errors="replace") for p in generated), generated
    # No TensorRT location given: the runner is skipped (or built, where TensorRT is in the system folders),
    # and the configure says which.
    assert ("the engine runner (attn_export_run) is skipped" in proc.stdout
            or "building the engine runner with" in proc.stdout), proc.stdout


def test_json_include_dir_without_header_fails(tmp_path: Path) -> None:
    # A folder named by hand that lacks the header is reported, not searched past.
    _need_tools("cmake")
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run(["cmake", "-S", CPP_DIR, "-B", tmp_path / "b", "-DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=ON",
                 f"-DATTN_EXPORT_NLOHMANN_INCLUDE_DIR={empty}"])
    assert proc.returncode != 0
    assert f"{empty.as_posix()}/nlohmann/json.hpp" in _flat(proc.stderr), proc.stderr


def test_tensorrt_root_not_found_fails(tmp_path: Path) -> None:
    # A TensorRT location that holds no TensorRT stops the configure, naming what was looked for and where,
    # instead of building without the runner.
    _need_tools("cmake")
    root = tmp_path / "nonexistent"
    env = {k: v for k, v in os.environ.items() if k != "TensorRT_ROOT"}
    proc = _run(["cmake", "-S", CPP_DIR, "-B", tmp_path / "b", *_json_hint(), f"-DTensorRT_ROOT={root}"], env=env)
    assert proc.returncode != 0, proc.stdout
    err = _flat(proc.stderr)
    assert f"TensorRT_ROOT={root.as_posix()}" in err, proc.stderr
    assert "NvInfer.h" in err and "libnvinfer" in err
    assert f"looked in {root.as_posix()}/" in err

    # The header alone is not TensorRT either: the message names the missing library only.
    (root / "include").mkdir(parents=True)
    (root / "include" / "NvInfer.h").write_text("// stand-in\n")
    proc = _run(["cmake", "-S", CPP_DIR, "-B", tmp_path / "b2", *_json_hint(), f"-DTensorRT_ROOT={root}"], env=env)
    assert proc.returncode != 0, proc.stdout
    err = _flat(proc.stderr)
    assert "the library" in err and "libnvinfer" in err and "the header NvInfer.h" not in err, proc.stderr


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "0d")
@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_matches_numpy(roundtrip, tmp_path: Path, dtype: str, shape: tuple[int, ...]) -> None:
    src, dst = tmp_path / "in.npy", tmp_path / "out.npy"
    a = _sample(dtype, shape)
    np.save(src, a)
    proc = roundtrip(src, dst)
    _check(proc, "npy_roundtrip")
    b = np.load(dst)
    assert b.dtype == a.dtype
    assert b.shape == a.shape
    assert b.tobytes() == a.tobytes()
    # The header is written exactly as numpy writes it, so the files are identical.
    assert dst.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy", "out.npy"]  # no temporary file left


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_reads_all_format_versions(roundtrip, tmp_path: Path, version: tuple[int, int]) -> None:
    src, dst = tmp_path / "in.npy", tmp_path / "out.npy"
    a = _sample("float32", (2, 3, 4, 5))
    with open(src, "wb") as f:
        np.lib.format.write_array(f, a, version=version)
    _check(roundtrip(src, dst), "npy_roundtrip")
    b = np.load(dst)
    assert b.dtype == a.dtype and b.shape == a.shape and b.tobytes() == a.tobytes()
    assert dst.read_bytes()[6:8] == b"\x01\x00"  # written as 1.0


def _refused(roundtrip, tmp_path: Path, src: Path, needle: str) -> None:
    dst = tmp_path / "out.npy"
    proc = roundtrip(src, dst)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr
    assert str(src) in proc.stderr  # the message names the file
    assert not dst.exists()


def test_fortran_order_refused(roundtrip, tmp_path: Path) -> None:
    src = tmp_path / "f.npy"
    np.save(src, np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    _refused(roundtrip, tmp_path, src, "Fortran-order")


def test_truncated_file_refused(roundtrip, tmp_path: Path) -> None:
    src = tmp_path / "cut.npy"
    np.save(src, np.arange(64, dtype=np.float32))
    src.write_bytes(src.read_bytes()[:-10])
    _refused(roundtrip, tmp_path, src, "truncated data")


def test_big_endian_refused(roundtrip, tmp_path: Path) -> None:
    src = tmp_path / "be.npy"
    np.save(src, np.arange(4, dtype=">f4"))
    _refused(roundtrip, tmp_path, src, "big-endian")


def test_not_npy_refused(roundtrip, tmp_path: Path) -> None:
    src = tmp_path / "bad.npy"
    src.write_bytes(b"PK\x03\x04 this is not a numpy file")
    _refused(roundtrip, tmp_path, src, "bad magic")


# --------------------------------------------------------------------------- engine runner (GPU)
def _tensorrt_and_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    try:
        from attn_export.engines.trt_build import gpu_info
    except ImportError:
        return shutil.which("nvidia-smi") is not None and _run(["nvidia-smi", "-L"]).returncode == 0
    return gpu_info() is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _tensorrt_and_gpu(), reason="needs TensorRT and an NVIDIA GPU")
def test_runner_matches_python_runner(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, tiny_onnx: Path) -> None:
    try:
        from attn_export import build_engine
        from attn_export.runners.trt_runner import TrtRunner
    except ImportError as e:
        pytest.skip(f"the Python engine builder/runner is not available to make an engine: {e}")

    # Build the runner against the installed TensorRT (TensorRT_ROOT or the system paths).
    build = tmp_path_factory.mktemp("cpp_build_trt")
    configure = _configure_and_build(build)
    run_exe = build / "attn_export_run"
    if not run_exe.is_file():
        pytest.skip("TensorRT headers/libraries not found by CMake (the Python wheel ships no headers); "
                    f"set TensorRT_ROOT to a TensorRT install:\n{configure.stdout[-500:]}")

    engine = tmp_path / "tiny.plan"
    result = build_engine(tiny_onnx, engine).build
    assert result is not None
    shapes = result.sidecar["profiles"][0]["shapes"]  # tensor -> [min, opt, max]
    feeds: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    for io in result.sidecar["io"]:
        if io["mode"] != "input":
            continue
        shape = tuple(shapes[io["name"]][1])
        if io["dtype"].startswith("float"):
            feeds[io["name"]] = rng.standard_normal(shape).astype(io["dtype"])
        else:
            feeds[io["name"]] = rng.integers(0, 10, size=shape).astype(io["dtype"])
    for name, a in feeds.items():
        np.save(tmp_path / f"{name}.npy", a)

    cmd = [run_exe, "--engine", engine, "--iterations", "3", "--output", f"out={tmp_path / 'out.npy'}"]
    for name in feeds:
        cmd += ["--input", f"{name}={tmp_path / (name + '.npy')}"]
    proc = _run(cmd)
    _check(proc, "attn_export_run")
    assert "mean latency" in proc.stdout
    got = np.load(tmp_path / "out.npy")

    with TrtRunner(engine) as runner:
        expected = runner.infer(feeds)["out"]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)

    # A shape outside the profile is refused with a message naming the tensor.
    x = feeds["x"]
    max_height = shapes["x"][2][2]
    too_big = np.zeros((x.shape[0], x.shape[1], 2 * max_height, x.shape[3]), dtype=x.dtype)
    np.save(tmp_path / "x.npy", too_big)
    proc = _run(cmd)
    assert proc.returncode == 1
    assert "'x'" in proc.stderr and "range" in proc.stderr
