"""TEST CODE: import the real TensorRT bindings of one version (over stand-in libraries) and probe our code against it.

Run as a script in a fresh interpreter per version (one process cannot hold two
versions of the extension module):

    python tests/trt_api/probe.py --site DIR --standins DIR --code-root DIR --json OUT [--stubs DIR]

``--site`` holds the unpacked bindings wheel plus the ``tensorrt`` front
package; ``--code-root`` is the folder holding the ``attn_export`` package to
probe (the repository, or a deliberately broken copy). Writes a JSON object:
version, errors (list of strings), and what was probed. Nothing here runs
TensorRT: the stand-ins return NULL to any call that reaches the libraries,
so only what pybind11 itself implements (classes, enums, signatures, the
trampolines of Python subclasses) is exercised.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _trt_chains(path: Path) -> list[str]:
    """Every dotted name rooted at ``trt`` (``trt.TensorIOMode.INPUT``) in a module, outermost chains only."""
    tree = ast.parse(path.read_text())
    chains: set[str] = set()
    inner: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts, cur = [], node
            while isinstance(cur, ast.Attribute):
                inner.add(id(cur.value))
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "trt" and id(node) not in inner:
                chains.add(".".join(["trt", *reversed(parts)]))
    # A chain that is a prefix of a longer one is resolved as part of it.
    return sorted(c for c in chains if not any(o.startswith(c + ".") for o in chains))


def _resolve(trt: Any, chain: str) -> Any:
    obj = trt
    for part in chain.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def probe(code_root: Path, errors: list[str], runtime: str = "tensorrt") -> dict[str, Any]:
    """Runtime checks of the attn_export TensorRT code under ``code_root`` against the imported ``tensorrt``.

    ``runtime="rtx"``: the bindings are TensorRT-RTX's, and attn-export's RTX
    runtime is selected first, so its own branches run.
    """
    import tensorrt as trt

    sys.path.insert(0, str(code_root))
    from attn_export.engines import trt_build
    from attn_export.runners import trt_runner

    if runtime != "tensorrt":
        from attn_export.engines import runtime as runtimes

        runtimes.select(runtime)

    seen: dict[str, Any] = {"version": str(trt.__version__)}

    def check(what: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            errors.append(f"{what}: {type(exc).__name__}: {exc}")
            return None

    # Every trt.X.Y the modules name resolves on the real module (the version branches' names included).
    names: dict[str, bool] = {}
    for mod in (trt_build, trt_runner):
        for chain in _trt_chains(Path(str(mod.__file__))):
            names[chain] = check(f"{Path(str(mod.__file__)).name}: {chain}", lambda c=chain: _resolve(trt, c)) is not None
    seen["names"] = names

    seen["trt_version"] = check("trt_version()", trt_build.trt_version)
    seen["hardware_levels"] = {n: str(check(f"hardware_level({n!r})", lambda n=n: trt_build.hardware_level(n)))
                               for n in trt_build.HARDWARE_LEVELS}
    seen["verbosity"] = {n: str(check(f"profiling_verbosity({n!r})", lambda n=n: trt_build.profiling_verbosity(n)))
                         for n in trt_build.VERBOSITY}
    seen["network_flags"] = {str(st): check(f"network_flags({st})", lambda st=st: trt_build.network_flags(st))
                             for st in (True, False)}
    seen["layer_information_format"] = str(check("LayerInformationFormat.JSON", lambda: trt.LayerInformationFormat.JSON))
    seen["tensor_io_mode"] = str(check("TensorIOMode.INPUT", lambda: trt.TensorIOMode.INPUT))
    dtypes = check("io_dtypes()", trt_build.io_dtypes) or []
    seen["nptype"] = {str(d): str(check(f"numpy_dtype({d})", lambda d=d: trt_build.numpy_dtype(d))) for d in dtypes}

    # The progress monitor: our subclass through the real pybind11 trampoline, callbacks called as TensorRT would.
    def monitor() -> dict[str, Any]:
        calls: list[tuple[str, Any, Any]] = []
        mon = trt_build.make_progress_monitor(lambda text, done=None, total=None: calls.append((text, done, total)))
        if not isinstance(mon, trt.IProgressMonitor):
            raise TypeError("make_progress_monitor did not return a trt.IProgressMonitor")
        mon.phase_start("Building", None, 3)
        mon.phase_start("Tactics", "Building", 2)
        ok = [mon.step_complete("Tactics", 0), mon.step_complete("Building", 1)]
        mon.phase_finish("Tactics")
        mon.phase_finish("Building")
        mon.cancelled = True  # Ctrl-C: the next step must cancel the build
        ok.append(mon.step_complete("Building", 2))
        if ok != [True, True, False]:
            raise AssertionError(f"step_complete returned {ok}, expected [True, True, False]")
        if ("Building > Tactics", 1, 2) not in calls:
            raise AssertionError(f"progress calls {calls} miss ('Building > Tactics', 1, 2)")
        return {"calls": len(calls), "steps": ok}

    seen["progress_monitor"] = check("IProgressMonitor subclass", monitor)

    # The Polygraphy objects we construct, with Polygraphy's real signatures (its __init__s take no **kwargs,
    # so a misspelled keyword is a TypeError; mypy cannot see through its decorators).
    def polygraphy() -> dict[str, Any]:
        from pathlib import Path as _P

        profiles = trt_build.polygraphy_profiles([{"x": ((1, 3, 32, 32), (2, 3, 64, 64), (4, 3, 96, 96)), "t": ((1,), (2,), (4,))}])
        seen_cfg = {}
        for hw in trt_build.HARDWARE_LEVELS:
            for verb in trt_build.VERBOSITY:
                cfg = trt_build.polygraphy_config(profiles, opt_level=3, hardware_compatibility=hw, verbosity=verb,
                                                  workspace=1 << 30, timing_cache=_P(__file__), monitor=None)
                seen_cfg[f"{hw}/{verb}"] = type(cfg).__name__
        if runtime == "rtx":  # every compute capability attn-export accepts, validated by Polygraphy on the real module
            from attn_export.engines.runtime import RTX

            cfg = trt_build.polygraphy_config(profiles, opt_level=3, hardware_compatibility="none", verbosity="detailed",
                                              workspace=None, timing_cache=None, monitor=None,
                                              compute_capabilities=list(RTX.compute_capabilities))
            seen_cfg["compute_capabilities"] = type(cfg).__name__
        loader = trt_build.polygraphy_loader(None, cfg, "timing.cache")  # no network: construction only
        return {"profiles": [str(p) for p in profiles], "configs": len(seen_cfg), "loader": type(loader).__name__,
                "config_types": sorted(set(seen_cfg.values())), "decomposable": trt_build.attention_layers_supported()}

    seen["polygraphy"] = check("Polygraphy construction", polygraphy)

    # add_attention / add_attention_v2: recorded where the bindings have them; the modules checked here
    # do not call them (the ONNX parser creates the attention layers), so a missing one is not an error.
    sigs = {}
    for name in ("add_attention", "add_attention_v2"):
        fn = getattr(trt.INetworkDefinition, name, None)
        sigs[name] = (fn.__doc__ or "").strip().splitlines()[0] if fn is not None else None
        if any(name in Path(str(m.__file__)).read_text() for m in (trt_build, trt_runner)) and fn is None:
            errors.append(f"INetworkDefinition.{name} is used but missing in TensorRT {trt.__version__}")
    seen["attention_signatures"] = sigs
    return seen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", required=True, type=Path)
    ap.add_argument("--standins", required=True, type=Path)
    ap.add_argument("--code-root", required=True, type=Path)
    ap.add_argument("--json", required=True, type=Path)
    ap.add_argument("--stubs", type=Path, default=None)
    ap.add_argument("--package", default="tensorrt_bindings")
    ap.add_argument("--front", action="append", default=None)
    ap.add_argument("--runtime", default="tensorrt")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE.parent))  # for `trt_api`
    from trt_api import standin, stubs

    errors: list[str] = []
    result: dict[str, Any] = {"errors": errors}
    try:
        libs = [standin.StandinLibrary(p.name[len(standin.STANDIN_PREFIX):], p, [])
                for p in sorted(args.standins.glob(f"{standin.STANDIN_PREFIX}*.so*")) if p.suffix != ".c"]
        standin.preload(libs)
        sys.path.insert(0, str(args.site))
        import tensorrt  # noqa: F401 - the real bindings, through the front package

        if args.stubs is not None:
            stubs.generate(args.stubs, args.package, tuple(args.front or ["tensorrt"]))
        result.update(probe(args.code_root, errors, args.runtime))
    except Exception:  # noqa: BLE001
        errors.append("probe failed:\n" + traceback.format_exc())
    args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
