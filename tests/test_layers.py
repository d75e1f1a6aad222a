"""The package's layers point one way: every import of every module (read with ast, lazy ones included) goes down.

Floors, bottom first (README "Layout" draws them). A module may import its own
floor's modules of the same package and anything on a lower floor, never a
higher one. The root ``attn_export/__init__.py`` is the façade: it names
everything through its lazy table (strings), so it imports only the version.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "attn_export"

# module or package prefix -> floor
FLOORS: dict[str, int] = {
    "attn_export.errors": 0, "attn_export.schema": 0, "attn_export.spec": 0, "attn_export.atomic": 0,
    "attn_export.progress": 0, "attn_export.files": 0, "attn_export.shapes": 0, "attn_export.version": 0,
    "attn_export.heap": 0, "attn_export.host": 0,
    "attn_export.models": 1, "attn_export.graph": 1, "attn_export.compare": 1,
    "attn_export.inputs": 2,
    "attn_export.exporter": 2,
    "attn_export.engines": 3,
    "attn_export.runners": 4,
    "attn_export.verify": 5, "attn_export.bench": 5, "attn_export.triton": 5, "attn_export.inspection": 5,
    "attn_export.localize": 5, "attn_export.trajectory": 5, "attn_export.trajectory_images": 5,
    "attn_export.pipeline": 6,
    "attn_export.render": 7,
    "attn_export.cli_support": 8, "attn_export.cli_args": 9, "attn_export.cli": 10,
    "attn_export.__main__": 11,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _floor(module: str) -> tuple[int, str] | None:
    """(floor, the FLOORS key it falls under) for a module of the package; None for the root façade."""
    best = None
    for key, floor in FLOORS.items():
        if (module == key or module.startswith(key + ".")) and (best is None or len(key) > len(best[1])):
            best = (floor, key)
    return best


def _imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every attn_export import in the file, at any depth (lazy imports count)."""
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            out += [(node.lineno, n) for n in names if n.startswith("attn_export")]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("attn_export")]
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "cpp" not in p.relative_to(PACKAGE).parts)


def test_every_module_has_a_floor() -> None:
    missing = [_module_name(p) for p in MODULES if p.parent != PACKAGE or p.name != "__init__.py"
               if _floor(_module_name(p)) is None]
    assert not missing, f"modules on no floor (add them to FLOORS and README's Layout): {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_point_down(path: Path) -> None:
    here = _floor(_module_name(path))
    if here is None:  # the root façade
        assert [t for _, t in _imports(path)] == ["attn_export.version"], \
            "attn_export/__init__.py names modules lazily; it imports only the version"
        return
    wrong = []
    for line, target in _imports(path):
        there = _floor(target)
        if target in ("attn_export", "attn_export.__version__"):
            wrong.append(f"line {line}: {target} (the façade; import the version from attn_export.version)")
        elif there is None:
            wrong.append(f"line {line}: {target} (on no floor)")
        elif there[0] > here[0] or (there[0] == here[0] and there[1] != here[1] and here[0] != 0):
            wrong.append(f"line {line}: {target} (floor {there[0]}, {there[1]}) from floor {here[0]} ({here[1]})")
    assert not wrong, f"{_module_name(path)} imports upward or sideways:\n" + "\n".join(wrong)


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The walker sees a lazy import inside a function (the way the FP16 conversion once reached verify)."""
    src = tmp_path / "fp16.py"
    src.write_text("def check():\n    from ..verify import verify\n    from .. import cli\n")
    found = _imports(src, module="attn_export.exporter.fp16")
    assert [t for _, t in found] == ["attn_export.verify", "attn_export.cli"]
    assert all(_floor(t)[0] > _floor("attn_export.exporter.fp16")[0] for _, t in found)  # type: ignore[index]
