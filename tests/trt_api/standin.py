"""TEST CODE: stand-in shared libraries that let the real TensorRT Python bindings *import* on CPU.

The bindings' extension module (``tensorrt_bindings/tensorrt.so``) links
against libnvinfer, libnvonnxparser and libnvinfer_plugin, which are not on
this machine. It leaves only a handful of C entry points undefined
(``createInferBuilder_INTERNAL``, ``getPluginRegistry``, ...). Each stand-in
library here defines those symbols as functions that return 0 (NULL), under
the soname the module asks for, so the dynamic loader is satisfied and
``import tensorrt_bindings`` succeeds. Everything pybind11 registers (classes,
enums, signatures, the trampolines for Python subclasses) is then the real
thing, while any call that would reach TensorRT gets NULL.

Nothing built here is TensorRT. It never builds or runs an engine and must
never be used to claim that one builds or runs; it exists only so the API
conformance check (``tests/trt_api/check.py``) can read the real API.

Which symbols to define is read from the module with ``nm`` (not a fixed
list): the module's undefined strong symbols, minus those defined by the
system libraries it needs (resolved with ``ldd``) and by the Python runtime.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Prefix of every stand-in file name, so none can be mistaken for a TensorRT library.
STANDIN_PREFIX = "standin_"


@dataclass
class StandinLibrary:
    """One stand-in: the soname the extension module needs, the file built for it, the symbols it defines."""

    soname: str
    path: Path
    symbols: list[str]


def _nm(path: str | Path, *flags: str) -> list[tuple[str, str]]:
    """(type letter, name without @version) for each dynamic symbol ``nm -D`` lists."""
    out = subprocess.run(["nm", "-D", *flags, str(path)], check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            rows.append((parts[-2], parts[-1].split("@")[0]))
    return rows


def needed_libraries(module: Path) -> list[str]:
    """DT_NEEDED entries of ``module`` (``readelf -d``)."""
    out = subprocess.run(["readelf", "-d", str(module)], check=True, capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def resolved_libraries(module: Path) -> dict[str, str | None]:
    """soname -> path for each library ``ldd`` resolves (None: 'not found')."""
    out = subprocess.run(["ldd", str(module)], capture_output=True, text=True).stdout
    found: dict[str, str | None] = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(not found|\S+)", line)
        if m:
            found[m.group(1)] = None if m.group(2) == "not found" else m.group(2)
        elif m := re.match(r"\s*(/\S+)\s+\(", line):  # the dynamic loader itself: "/lib64/ld-linux-x86-64.so.2 (0x...)"
            found[Path(m.group(1)).name] = m.group(1)
    return found


def _python_runtime() -> Path:
    """The file that defines the C API in this process: libpython if shared, else the executable."""
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        lib = Path(str(sysconfig.get_config_var("LIBDIR"))) / str(sysconfig.get_config_var("LDLIBRARY"))
        if lib.is_file():
            return lib
    return Path(sys.executable).resolve()


def missing_symbols(module: Path) -> tuple[list[str], list[str]]:
    """(sonames ldd cannot find, undefined strong symbols no available library defines)."""
    needed = needed_libraries(module)
    resolved = resolved_libraries(module)
    missing_libs = [n for n in needed if resolved.get(n) is None]
    defined: set[str] = set()
    for path in [p for n, p in resolved.items() if p] + [str(_python_runtime())]:
        defined |= {name for kind, name in _nm(path, "--defined-only")}
    undefined = sorted({name for kind, name in _nm(module, "--undefined-only") if kind == "U"} - defined)
    return missing_libs, undefined


def _owner(symbol: str, sonames: list[str]) -> str:
    """Which stand-in defines ``symbol``: the parser's entry points go to the parser library, the rest to libnvinfer.

    The dynamic loader resolves symbols across all loaded libraries, so the
    split only keeps the stand-ins readable; any assignment would load.
    """
    def first(stem: str) -> str | None:
        return next((s for s in sonames if s.startswith(stem + ".so")), None)

    if "OnnxParser" in symbol and first("libnvonnxparser"):
        return str(first("libnvonnxparser"))
    if symbol == "initLibNvInferPlugins" and first("libnvinfer_plugin"):
        return str(first("libnvinfer_plugin"))
    return first("libnvinfer") or sonames[0]


def build_standins(module: Path, out_dir: Path) -> list[StandinLibrary]:
    """Compile one stand-in per missing library of ``module`` into ``out_dir`` (gcc); reuse earlier builds."""
    missing_libs, symbols = missing_symbols(module)
    if symbols and not missing_libs:
        raise RuntimeError(f"{module.name} leaves {symbols} undefined but needs no missing library")
    out_dir.mkdir(parents=True, exist_ok=True)
    by_lib: dict[str, list[str]] = {s: [] for s in missing_libs}
    for sym in symbols:
        by_lib[_owner(sym, missing_libs)].append(sym)
    libs = []
    for soname, syms in by_lib.items():
        path = out_dir / f"{STANDIN_PREFIX}{soname}"
        src = out_dir / f"{STANDIN_PREFIX}{soname}.c"
        text = (f"/* TEST STAND-IN for {soname}: NOT TensorRT. Every function returns 0 (NULL). */\n"
                + "".join(f"void *{s}(void) {{ return 0; }}\n" for s in syms))
        if not (path.is_file() and src.is_file() and src.read_text() == text):
            # Built under a per-process name and renamed: several test workers may build at once.
            tmp_src, tmp_lib = src.with_name(f"{src.name}.{os.getpid()}.c"), path.with_name(f"{path.name}.{os.getpid()}")
            tmp_src.write_text(text)
            subprocess.run(["gcc", "-shared", "-fPIC", "-O0", f"-Wl,-soname,{soname}", "-o", str(tmp_lib), str(tmp_src)],
                           check=True, capture_output=True, text=True)
            os.replace(tmp_lib, path)
            os.replace(tmp_src, src)
        libs.append(StandinLibrary(soname=soname, path=path, symbols=syms))
    return libs


def preload(libs: list[StandinLibrary]) -> None:
    """Load the stand-ins globally, so the loader finds them by soname when the module is imported."""
    for lib in libs:
        ctypes.CDLL(str(lib.path), mode=ctypes.RTLD_GLOBAL)
