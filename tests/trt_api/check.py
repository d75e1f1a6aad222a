"""TEST CODE: the TensorRT API-conformance check, for each supported TensorRT version, on CPU.

For each version: download the real bindings wheel from PyPI (cached under
``build/trt-bindings/``), build stand-in libraries for the C symbols its
extension module leaves undefined (``standin.py``), import the real module,
generate type stubs from it (``stubs.py``), run the runtime probes
(``probe.py``), and type-check every module under ``--path`` that imports
``tensorrt`` with mypy against those stubs and Polygraphy's own source.

TensorRT-RTX's bindings (``tensorrt-rtx-cu13-bindings``, versions written
``rtx-1.7.1.116``) go through the same check: their stubs are laid out as the
``tensorrt_rtx`` package and as ``tensorrt`` too, so the code written against
``tensorrt`` is type-checked against TensorRT-RTX's API, and the probe runs
with the RTX runtime selected (its own branches: CreateConfigRTX, compute
capabilities).

This proves API conformance only (names, enum members, signatures, argument
counts and types, the subclass trampoline). It never builds or runs an engine:
nothing here is TensorRT's libraries, and nothing here has run on a GPU (the
real TensorRT-RTX builds are tests/test_rtx_build.py).

    python -m tests.trt_api.check                        # the supported versions, attn_export/
    python -m tests.trt_api.check --versions 10.13.3.9,11.2.1.2,rtx-1.6.1.120 --path /tmp/broken/attn_export
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import standin

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build" / "trt-bindings"
PACKAGE = REPO / "attn_export"

# The supported range: every version named here passes this check (README, readiness --target follow it).
# Oldest supported 10.x, the first with the ONNX Attention op, newest 10.x, 11.0, newest 11.x.
SUPPORTED_VERSIONS = ("10.12.0.36", "10.14.1.48.post1", "10.16.1.11", "11.0.0.114", "11.4.0.106", "rtx-1.7.1.116")
RTX_PREFIX = "rtx-"


@dataclass(frozen=True)
class Flavour:
    """Where one family of bindings comes from and how its packages are laid out."""

    distribution: str         # the bindings wheel on PyPI
    package: str              # the package inside it
    extension: str            # its extension module's file name
    fronts: tuple[str, ...]   # front packages re-exporting it (the first is the runtime's own name)
    runtime: str              # attn-export's runtime name


# cu12 wheels exist for every 10.x and 11.x release; the Python API is the same in the cu13 wheels.
TENSORRT = Flavour("tensorrt-cu12-bindings", "tensorrt_bindings", "tensorrt.so", ("tensorrt",), "tensorrt")
# TensorRT-RTX: also presented as `tensorrt`, the name the shared builder and runner code is typed against.
RTX = Flavour("tensorrt-rtx-cu13-bindings", "tensorrt_rtx_bindings", "tensorrt_rtx.so", ("tensorrt_rtx", "tensorrt"), "rtx")
DISTRIBUTION = TENSORRT.distribution


def flavour(version: str) -> tuple[Flavour, str]:
    """("rtx-1.7.1.116" -> (RTX, "1.7.1.116"); "11.4.0.106" -> (TENSORRT, "11.4.0.106"))."""
    if version.startswith(RTX_PREFIX):
        return RTX, version[len(RTX_PREFIX):]
    return TENSORRT, version
PYTHON_TAG = f"{sys.version_info.major}.{sys.version_info.minor}"

# Imported modules mypy reads only as far as their names: they are big and not what is checked here.
SKIPPED_IMPORTS = ("numpy", "torch", "onnx", "onnxruntime", "onnxscript", "rich", "typer", "safetensors",
                   "diffusers", "tritonclient", "google", "hypothesis", "click", "colored")
# A module that must produce these errors, proving the stubs are in effect (not silently Any).
CANARY = '''\
import tensorrt as trt
def canary(engine: trt.ICudaEngine, ctx: trt.IExecutionContext) -> None:
    engine.no_such_method_canary()
    ctx.execute_async_v3(1, 2, 3)
    trt.TensorIOMode.NO_SUCH_MEMBER_CANARY
'''
CANARY_ERRORS = ("no_such_method_canary", "execute_async_v3", "NO_SUCH_MEMBER_CANARY")
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                  "Network is unreachable", "ConnectTimeout", "Failed to establish a new connection",
                  "Could not fetch URL", "connection refused", "Name or service not known")


_LINK_LOCK = threading.Lock()


def _key(path: Path) -> str:
    """A short name for the exact contents of the Python files of a checked path.

    mypy caches are kept per key: mypy trusts a cached module whose mtime and
    size look unchanged, and a shared cache once passed a broken copy of a
    module as the clean original. A new key, a fresh cache: never a stale one.
    """
    # Contents and relative names only: the same broken copy in another tmp folder reuses its cache.
    h = hashlib.sha256()
    base = path.parent if path.is_file() else path
    for f in ([path] if path.is_file() else sorted(path.rglob("*.py"))):
        h.update(str(f.relative_to(base)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


class IndexUnreachable(RuntimeError):
    """No package index answered: the check cannot get the bindings (a skip, not a failure)."""


@dataclass
class VersionResult:
    """The check's findings for one TensorRT version."""

    version: str
    modules: list[str] = field(default_factory=list)
    mypy_errors: list[str] = field(default_factory=list)
    probe_errors: list[str] = field(default_factory=list)
    probe: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.mypy_errors and not self.probe_errors

    def summary(self) -> str:
        if self.passed:
            return f"TensorRT {self.version}: ok ({len(self.modules)} modules, {self.seconds:.1f} s)"
        lines = [f"TensorRT {self.version}: {len(self.mypy_errors)} type errors, {len(self.probe_errors)} probe errors"]
        lines += [f"  mypy: {e}" for e in self.mypy_errors] + [f"  probe: {e}" for e in self.probe_errors]
        return "\n".join(lines)


# --------------------------------------------------------------------------- wheel
def fetch_wheel(version: str, cache: Path = BUILD / "wheels") -> Path:
    """The bindings wheel of ``version`` for this Python on linux x86_64, downloaded once into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    fl, version = flavour(version)
    name = fl.distribution.replace("-", "_")
    cp = f"cp{PYTHON_TAG.replace('.', '')}"
    found = sorted(cache.glob(f"{name}-{version}-{cp}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--python-version", PYTHON_TAG,
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
           "--retries", "1", "--timeout", "20", "-d", str(cache), f"{fl.distribution}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob(f"{name}-{version}-{cp}-*.whl"))
    if proc.returncode == 0 and found:
        return found[0]
    text = proc.stdout + proc.stderr
    if any(s.lower() in text.lower() for s in NETWORK_ERRORS):
        raise IndexUnreachable(f"no package index reachable to download {fl.distribution}=={version}")
    raise RuntimeError(f"pip could not download {fl.distribution}=={version}: {text.strip().splitlines()[-1:]}")


def unpack(wheel: Path, site: Path, fl: Flavour = TENSORRT) -> Path:
    """Unpack the wheel into ``site`` and add its front packages, as ``pip install tensorrt-cu12`` lays them out.

    For TensorRT-RTX an empty ``tensorrt_rtx_libs`` is added too: the bindings
    import it to load the real libraries, and here the stand-ins take their place.
    """
    from .stubs import front_package

    module = site / fl.package / fl.extension
    if not module.is_file():
        tmp = site.with_name(f"{site.name}.tmp{os.getpid()}")  # several test workers may unpack at once
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
        for front in fl.fronts:
            (tmp / front).mkdir(exist_ok=True)
            (tmp / front / "__init__.py").write_text(front_package(fl.package))
        if fl is RTX:
            (tmp / "tensorrt_rtx_libs").mkdir(exist_ok=True)
            (tmp / "tensorrt_rtx_libs" / "__init__.py").write_text("")
        try:
            tmp.rename(site)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    if not module.is_file():
        raise RuntimeError(f"{wheel.name} holds no {fl.package}/{fl.extension}")
    return module


# --------------------------------------------------------------------------- modules to check
def trt_modules(path: Path) -> list[Path]:
    """Python files under ``path`` (a file or folder) that import ``tensorrt`` (or ``tensorrt_rtx``)."""
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    out = []
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n in ("tensorrt", "tensorrt_rtx") or n.startswith(("tensorrt.", "tensorrt_rtx.")) for n in names):
                out.append(f)
                break
    return out


def package_root(module: Path) -> Path:
    """The folder above the outermost package holding ``module`` (what goes on sys.path)."""
    root = module.resolve().parent
    while (root / "__init__.py").is_file():
        root = root.parent
    return root


def _polygraphy_source(dest: Path) -> Path | None:
    """A folder holding (a link to) the installed polygraphy package, for mypy_path: mypy then reads its source."""
    import importlib.util

    spec = importlib.util.find_spec("polygraphy")
    if spec is None or not spec.submodule_search_locations:
        return None
    src = Path(list(spec.submodule_search_locations)[0])
    with _LINK_LOCK:
        dest.mkdir(parents=True, exist_ok=True)
        link = dest / "polygraphy"
        if not (link.is_symlink() and link.resolve() == src.resolve()):
            tmp = dest / f"polygraphy.{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(src, target_is_directory=True)
            os.replace(tmp, link)  # atomic: other test workers may be reading it
    return dest


def forbidden_ignores(modules: list[Path]) -> list[str]:
    """``# type: ignore`` in a checked module would hide exactly what this check is for."""
    out = []
    for m in modules:
        for i, line in enumerate(m.read_text().splitlines(), 1):
            if re.search(r"#\s*type:\s*ignore", line):
                out.append(f"{m}:{i}: '# type: ignore' is not allowed in a TensorRT module")
    return out


# --------------------------------------------------------------------------- mypy
def run_mypy(modules: list[Path], stub_dir: Path, work: Path, cache: Path) -> list[str]:
    """mypy over ``modules`` (+ the canary) against ``stub_dir``; errors in those files, or a canary failure.

    ``cache``: mypy's cache folder, one per TensorRT version, checked
    contents (see :func:`_key`) and test worker (mypy does not support
    concurrent runs on one cache).
    """
    work.mkdir(parents=True, exist_ok=True)
    canary = work / "trt_api_canary.py"
    canary.write_text(CANARY)
    poly = _polygraphy_source(BUILD / "polygraphy-src")
    mypy_path = [str(stub_dir)] + ([str(poly)] if poly else [])
    skipped = ",".join(f"{m},{m}.*" for m in SKIPPED_IMPORTS)
    config = work / "mypy.ini"
    config.write_text(
        "[mypy]\n"
        f"python_version = {PYTHON_TAG}\n"
        f"mypy_path = {os.pathsep.join(mypy_path)}\n"
        "follow_imports = silent\n"
        "check_untyped_defs = True\n"
        "ignore_missing_imports = True\n"
        "warn_unused_ignores = False\n"
        "show_error_codes = True\n"
        "no_error_summary = True\n"
        f"[mypy-{skipped}]\nfollow_imports = skip\n"
        # The bindings and Polygraphy must be found: never let them fall back to Any.
        "[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*,tensorrt_rtx,tensorrt_rtx.*,"
        "tensorrt_rtx_bindings,tensorrt_rtx_bindings.*,polygraphy,polygraphy.*]\n"
        "ignore_missing_imports = False\n"
    )
    targets = [str(m.resolve()) for m in modules] + [str(canary.resolve())]
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(cache),
           "--no-incremental" if os.environ.get("TRT_API_NO_CACHE") else "--incremental", *targets]
    env = dict(os.environ, MYPYPATH="")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(work), env=env)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if proc.returncode not in (0, 1):
        return [f"mypy crashed (exit {proc.returncode}): " + " | ".join(lines[-5:])]
    # Match on the path below the package root: errors replayed from a content-keyed cache (see _key)
    # carry the path of the copy that filled it, which may have been another tmp folder.
    resolved = {str(Path(m).resolve().relative_to(package_root(m))) for m in modules}
    errors, canary_hits = [], set()
    for ln in lines:
        m = re.match(r"(.+?):(\d+):(?:\d+:)? (error|note): (.*)", ln)
        if not m or m.group(3) != "error":
            continue
        file = (work / m.group(1)).resolve()  # absolute paths stay as they are
        if file.name == canary.name:
            canary_hits |= {c for c in CANARY_ERRORS if c in m.group(4)}
        elif any(str(file).endswith("/" + r) for r in resolved):
            errors.append(ln)
    missing = [c for c in CANARY_ERRORS if c not in canary_hits]
    if missing:
        errors.append(f"the stubs are not in effect: mypy did not report the canary's {missing} "
                      f"(output: {' | '.join(lines[-5:])})")
    return errors


# --------------------------------------------------------------------------- one version
def check_version(version: str, path: Path = PACKAGE) -> VersionResult:
    """Run the whole check for one TensorRT version against the modules under ``path``."""
    t0 = time.perf_counter()
    result = VersionResult(version)
    modules = trt_modules(path)
    result.modules = [str(m) for m in modules]
    if not modules:
        result.probe_errors.append(f"no module under {path} imports tensorrt")
        return result
    fl, _ = flavour(version)
    where = BUILD / version
    wheel = fetch_wheel(version)
    module = unpack(wheel, where / "site", fl)
    standin.build_standins(module, where / "standin-libs")
    stub_dir = where / "stubs"
    out = where / f"probe-{os.getpid()}-{_key(path)}.json"
    cmd = [sys.executable, str(Path(__file__).with_name("probe.py")), "--site", str(where / "site"),
           "--standins", str(where / "standin-libs"), "--code-root", str(package_root(modules[0])), "--json", str(out),
           "--package", fl.package, "--runtime", fl.runtime, *[a for f in fl.fronts for a in ("--front", f)]]
    if not (stub_dir / "tensorrt" / "__init__.pyi").is_file():
        cmd += ["--stubs", str(stub_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if not out.is_file():
        result.probe_errors.append(f"probe exited {proc.returncode} without a report: {proc.stderr.strip()[-2000:]}")
        return result
    result.probe = json.loads(out.read_text())
    out.unlink()
    result.probe_errors += result.probe.get("errors", [])
    wanted = flavour(version)[1]
    if result.probe.get("version") not in (None, wanted.split(".post")[0]) and not wanted.startswith(str(result.probe.get("version"))):
        result.probe_errors.append(f"imported {fl.runtime} {result.probe.get('version')}, expected {wanted}")
    if not (stub_dir / "tensorrt" / "__init__.pyi").is_file():
        result.probe_errors.append("no stubs were generated")
        return result
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    key = _key(path)
    result.mypy_errors = forbidden_ignores(modules) + run_mypy(
        modules, stub_dir, where / f"mypy-{key}", where / f"mypy-{key}" / f"cache-{worker}")
    result.seconds = time.perf_counter() - t0
    return result


def check_versions(versions: tuple[str, ...] | list[str] = SUPPORTED_VERSIONS, path: Path = PACKAGE,
                   jobs: int = 2) -> list[VersionResult]:
    """:func:`check_version` for each version (``jobs`` at a time)."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda v: check_version(v, path), versions))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.trt_api.check", description=(
        "TensorRT API-conformance check on CPU (API only: builds and runs nothing)."))
    ap.add_argument("--versions", default=",".join(SUPPORTED_VERSIONS),
                    help=f"comma-separated {DISTRIBUTION} versions, rtx-X for {RTX.distribution} (default: {','.join(SUPPORTED_VERSIONS)})")
    ap.add_argument("--path", type=Path, default=PACKAGE, help="a module or folder to check (default: attn_export/)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the findings as JSON")
    args = ap.parse_args(argv)
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    t0 = time.perf_counter()
    try:
        results = check_versions(versions, args.path, args.jobs)
    except IndexUnreachable as exc:
        print(f"skipped: {exc}")
        return 0
    for r in results:
        print(r.summary())
    print(f"{sum(r.passed for r in results)}/{len(results)} versions pass ({time.perf_counter() - t0:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps([{"version": r.version, "passed": r.passed, "mypy_errors": r.mypy_errors,
                                          "probe_errors": r.probe_errors, "probe": r.probe} for r in results], indent=1))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
