"""The two TensorRT runtimes attn-export builds for, and every difference between them, in one place.

* ``tensorrt``: NVIDIA TensorRT 10.12+/11.x (module ``tensorrt``). Building
  and running both need an NVIDIA GPU; a plan is tied to the TensorRT
  version and, by default, to the GPU's compute capability.
* ``rtx``: TensorRT for RTX (module ``tensorrt_rtx``, wheels
  ``tensorrt-rtx-cu12`` / ``tensorrt-rtx-cu13`` on PyPI). Its builder needs no
  GPU ("CPU-only AOT", on by default); the engine runs on the compute
  capabilities it was built for (by default Ampere and later: 8.0, 8.6, 8.9,
  12.x), after a just-in-time compilation on the GPU it lands on. Deserializing
  needs a GPU, so on a CPU the fusion report is read from the builder's
  DETAILED layer log instead of the engine inspector.

Both modules expose the same Python API for everything attn-export calls
(checked against each module's real bindings by ``tests/trt_api``), so the
builder and the runner are written once against :data:`trt`, a stand-in that
forwards to the selected runtime's module. Polygraphy picks its TensorRT module
once per process (``POLYGRAPHY_USE_TENSORRT_RTX``), so one process uses one
runtime: selecting the other after Polygraphy's TensorRT backend was imported
is refused with a one-line error.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..errors import MissingDependencyError, UsageError


@dataclass(frozen=True)
class Runtime:
    """What differs between TensorRT and TensorRT-RTX."""

    name: str                    # "tensorrt" | "rtx": the `--runtime` choice and the sidecar's "runtime"
    module: str                  # the Python module
    display: str                 # for messages
    builds_without_gpu: bool     # CPU-only AOT builds
    install_hint: str
    # Compute capabilities an engine targets when none are named (the runtime's documented default).
    default_compute_capabilities: tuple[str, ...] = ()
    # Every compute capability the builder accepts by name (ComputeCapability.SM<major><minor>).
    compute_capabilities: tuple[str, ...] = ()


TENSORRT = Runtime(
    name="tensorrt", module="tensorrt", display="TensorRT", builds_without_gpu=False,
    install_hint=('install it from the attn-export checkout with `pip install ".[trt-cu12]"` or `".[trt-cu13]"` (the '
                  "extra named for the machine's CUDA major version) on a machine with an NVIDIA GPU and its driver"),
)
RTX = Runtime(
    name="rtx", module="tensorrt_rtx", display="TensorRT-RTX", builds_without_gpu=True,
    install_hint=('install it from the attn-export checkout with `pip install ".[rtx]"` (tensorrt-rtx-cu13, from PyPI; '
                  'building needs no GPU, '
                  "running needs an NVIDIA GPU of compute capability 7.5 or later)"),
    # docs.nvidia.com/deeplearning/tensorrt-rtx, "CPU-Only AOT and TensorRT-RTX Engines": by default an engine
    # runs on compute capability 8.0, 8.6, 8.9, 12.0 and later; Turing (7.5) must be named.
    default_compute_capabilities=("8.0", "8.6", "8.9", "12.0"),
    compute_capabilities=("7.5", "8.0", "8.6", "8.9", "12.0", "12.1"),
)
RUNTIMES: dict[str, Runtime] = {r.name: r for r in (TENSORRT, RTX)}

_selected: Runtime | None = None


def get_runtime(name: str) -> Runtime:
    """The Runtime called ``name`` ("tensorrt" or "rtx"); UsageError for anything else."""
    if name not in RUNTIMES:
        raise UsageError(f"unknown runtime {name!r}; use one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def installed(runtime: Runtime) -> bool:
    """Whether ``runtime``'s Python module can be imported here."""
    return importlib.util.find_spec(runtime.module) is not None


def _polygraphy_mode(runtime: Runtime) -> None:
    """Point Polygraphy at ``runtime``'s module, or refuse if its TensorRT backend already took the other one."""
    if importlib.util.find_spec("polygraphy") is None:
        return
    from polygraphy import config as poly_config

    want = runtime is RTX
    if bool(poly_config.USE_TENSORRT_RTX) != want and "polygraphy.backend.trt" in sys.modules:
        raise UsageError(f"this process already uses Polygraphy with {'TensorRT-RTX' if not want else 'TensorRT'}; "
                         f"use {runtime.display} in a separate process")
    poly_config.USE_TENSORRT_RTX = want


def select(runtime: Runtime | str) -> Runtime:
    """Make ``runtime`` the one :data:`trt` forwards to (once per process; the same one again is fine).

    Raises MissingDependencyError when its module is not installed.
    """
    global _selected
    rt = get_runtime(runtime) if isinstance(runtime, str) else runtime
    if _selected is not None and _selected is not rt:
        raise UsageError(f"this process already uses {_selected.display}; use {rt.display} in a separate process")
    if not installed(rt):
        raise MissingDependencyError(f"{rt.display} is not installed; {rt.install_hint}")
    _polygraphy_mode(rt)
    importlib.import_module(rt.module)
    _selected = rt
    return rt


def selected() -> Runtime:
    """The runtime :data:`trt` forwards to; TensorRT unless another was selected."""
    return _selected or TENSORRT


def module() -> ModuleType:
    """The selected runtime's module (imported on first use)."""
    return importlib.import_module(selected().module)


def version() -> str:
    """The selected runtime's version string, e.g. '10.14.1.48' or '1.7.1.116'."""
    return str(module().__version__)


class _ActiveModule:
    """Attribute access forwarded to the selected runtime's module, so ``trt.Builder`` means the right one."""

    def __getattr__(self, name: str) -> Any:
        return getattr(module(), name)

    def __repr__(self) -> str:
        return f"<the {selected().display} module>"


# Typed as the `tensorrt` module where it is used (see trt_build.py), which tests/trt_api checks against the
# real bindings of each TensorRT version and of TensorRT-RTX.
trt = _ActiveModule()
