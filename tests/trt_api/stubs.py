"""TEST CODE: type stubs of the real TensorRT bindings, from pybind11-stubgen, as a ``tensorrt`` stub package.

Run inside a process that has imported ``tensorrt_bindings`` (see
``probe.py``): pybind11-stubgen reads the live module, so the stubs carry
the real classes, enum members and pybind11 signatures of that version.

The generated text needs two mechanical fixes before it parses: pybind11
names some parameters ``in`` (a keyword), and a few signatures have a
parameter without a default after one with a default. Neither fix changes a
name, so neither can hide a misspelled method or member.

The result is laid out as the installed wheels are: ``tensorrt_bindings``
(the stubs of the package and its extension module) and ``tensorrt``, whose
``__init__.pyi`` re-exports it exactly as the real ``tensorrt`` front package
does (``from tensorrt_bindings import *``).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import sys
from pathlib import Path

# The real front packages' __init__.py is these two imports (tensorrt-cu12 / -cu13 and tensorrt-rtx-cu13 sdists).
def front_package(package: str) -> str:
    """The front package's ``__init__.py`` over the bindings package ``package``."""
    return f"from {package} import *\nfrom {package} import __version__\n"


def front_stub(package: str) -> str:
    """Its stub: the same re-export, written so that mypy keeps ``__version__``."""
    return f"from {package} import *\nfrom {package} import __version__ as __version__\n"



def _split_params(params: str) -> list[str]:
    """Split a parameter list at top-level commas."""
    out, depth, cur = [], 0, ""
    for ch in params:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def _default_after_default(line: str) -> str:
    """Give every parameter after the first defaulted one a default (``= ...``), as the stub grammar requires."""
    m = re.match(r"(\s*def \w+\()(.*)(\) -> [^:]*:.*)$", line)
    if not m:
        raise ValueError(f"cannot repair stub line: {line.strip()}")
    params = _split_params(m.group(2))
    seen_default = False
    fixed = []
    for p in params:
        bare = p.strip()
        if bare.startswith("*") or bare == "/":
            seen_default = False if bare.startswith("*") else seen_default
            fixed.append(p)
            continue
        if "=" in bare.split(":", 1)[-1] or ("=" in bare and ":" not in bare):
            seen_default = True
        elif seen_default:
            p = p.rstrip() + " = ..."
        fixed.append(p)
    return m.group(1) + ",".join(fixed) + m.group(3)


def repair(text: str, max_fixes: int = 200) -> str:
    """Make pybind11-stubgen output parse; raise if an error is not one of the two known kinds."""
    # A parameter named `in`: rename it wherever it appears as a parameter.
    text = re.sub(r"(?<=[(,] )in(?=:)|(?<=\()in(?=:)", "in_", text)
    for _ in range(max_fixes):
        try:
            ast.parse(text)
            return text
        except SyntaxError as exc:
            if "default argument" not in (exc.msg or "") and "without a default" not in (exc.msg or ""):
                raise
            lines = text.splitlines(keepends=True)
            i = (exc.lineno or 1) - 1
            lines[i] = _default_after_default(lines[i].rstrip("\n")) + "\n"
            text = "".join(lines)
    raise RuntimeError("too many stub lines to repair")


BUFFER_NOTE = "buffer protocol"
BUFFER_METHOD = "    def __buffer__(self, flags: int, /) -> memoryview: ...\n"


def add_buffer_protocol(text: str) -> str:
    """Declare ``__buffer__`` on classes whose docstring says they expose Python's buffer protocol.

    pybind11 implements the protocol in C (``py::buffer_protocol()``), where
    stubgen cannot see it; without it ``bytes(engine.serialize())`` would be
    a false error. Only classes that document the protocol get it.
    """
    lines = text.splitlines(keepends=True)
    after = []  # line numbers (1-based) that end such a class docstring
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef) and BUFFER_NOTE in (ast.get_docstring(node) or ""):
            after.append(node.body[0].end_lineno or node.lineno)
    for line_no in sorted(after, reverse=True):
        lines.insert(line_no, BUFFER_METHOD)
    return "".join(lines)


def generate(out_dir: Path, package: str = "tensorrt_bindings", fronts: tuple[str, ...] = ("tensorrt",)) -> Path:
    """Write stubs of the imported bindings ``package`` and of its front packages ``fronts`` into ``out_dir``."""
    from pybind11_stubgen import main as stubgen_main

    extension = {"tensorrt_bindings": "tensorrt", "tensorrt_rtx_bindings": "tensorrt_rtx"}[package]
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")  # several test workers may generate at once
    shutil.rmtree(tmp, ignore_errors=True)
    argv = sys.argv
    sys.argv = ["pybind11-stubgen", package, "-o", str(tmp), "--ignore-all-errors"]
    try:
        stubgen_main()
    finally:
        sys.argv = argv
    pkg = tmp / package
    if not (pkg / f"{extension}.pyi").is_file():
        raise RuntimeError(f"pybind11-stubgen wrote no stubs for the extension module under {pkg}")
    for pyi in pkg.rglob("*.pyi"):
        text = add_buffer_protocol(repair(pyi.read_text()))
        if pyi.name == "__init__.pyi" and pyi.parent == pkg:
            # The package stub names the extension module's types as `tensorrt.X` (its pybind11 name).
            text = text.replace("from __future__ import annotations\n",
                                f"from __future__ import annotations\nfrom {package} import {extension} as {extension}\n", 1)
        pyi.write_text(text)
    for name in fronts:
        front = tmp / name
        front.mkdir()
        (front / "__init__.pyi").write_text(front_stub(package))
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished first: its stubs are the same
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
