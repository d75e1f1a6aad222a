"""OpenVINO runner: the ONNX file run by OpenVINO's CPU plugin at an explicit inference precision.

OpenVINO reads the ONNX file from its path (external data included) with its
own ONNX frontend; the file is data, nothing in it is executed. The precision
is never left to OpenVINO: its CPU plugin's default is bf16 wherever the CPU
has bf16 units (AVX512_BF16 or AMX), so a "default" run is not FP32 there, and
a precision the plugin has no kernels for is silently replaced by another
(asked for f16 on an AVX512_BF16 CPU without AVX512_FP16, OpenVINO 2026.4
compiles bf16). This runner refuses such a precision before compiling and
checks, after compiling, that the compiled model holds the one asked for.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import numpy as np

from ..errors import MissingDependencyError, UsageError
from ..exporter.foreign import spec_of
from ..spec import ModelSpec
from .base import Runner
from .openvino_islands import HeldIslands, held_at_low_precision, hold_islands, private_folder

# The precisions OpenVINO's INFERENCE_PRECISION_HINT takes here, and the spellings accepted for them.
PRECISIONS = ("f32", "bf16", "f16")
_ALIASES = {"fp32": "f32", "float32": "f32", "float": "f32", "bfloat16": "bf16", "fp16": "f16", "float16": "f16",
            "half": "f16"}
# The OPTIMIZATION_CAPABILITIES entry of a device that runs the precision natively.
_CAPABILITY = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}
# The CPU units each low precision needs, for the refusal's wording (OpenVINO's own answer decides).
_UNITS = {"bf16": "AVX512_BF16 or AMX-BF16", "f16": "AVX512_FP16 or AMX-FP16"}
# The project's names for a compute precision (verify's tolerances, reports).
PROJECT_PRECISION = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
INSTALL_HINT = "pip install \".[openvino]\" from the attn-export checkout (or pip install 'openvino>=2025.0')"


def import_openvino() -> ModuleType:
    """The ``openvino`` module; MissingDependencyError (exit 2, one line) naming the extra where it is missing."""
    try:
        import openvino
    except ImportError:
        raise MissingDependencyError(f"OpenVINO is not installed; {INSTALL_HINT}") from None
    return openvino


def parse_precision(text: str | None) -> str:
    """'bf16', 'bfloat16', 'fp32', ... -> one of :data:`PRECISIONS`; UsageError when absent or unknown."""
    if not text:
        raise UsageError(f"OpenVINO runs at an explicit precision: give --precision {'|'.join(PRECISIONS)}")
    name = _ALIASES.get(text.strip().lower(), text.strip().lower())
    if name not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)} (got {text!r})")
    return name


def device_capabilities(core: Any, device: str = "CPU") -> list[str]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of ``device`` (e.g. ['BF16', 'FP32', 'INT8', ...])."""
    return [str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES")]


def check_precision(precision: str, capabilities: list[str], device: str = "CPU") -> None:
    """UsageError (exit 2, one line) when ``device`` has no native kernels for ``precision``.

    OpenVINO's own answer decides, not the CPU flags: its plugin lists BF16 or FP16 exactly where it has
    kernels for them (the flags alone do not say which units a given OpenVINO release uses), and it is the
    plugin that would otherwise substitute another precision without a word.
    """
    if _CAPABILITY[precision] in capabilities:
        return
    native = " or ".join(p for p in PRECISIONS if _CAPABILITY[p] in capabilities) or "none"
    raise UsageError(f"this {device} cannot run {precision} natively ({precision} needs {_UNITS.get(precision, '')}; "
                     f"OpenVINO's capabilities here: {', '.join(capabilities) or 'none'}) and it is never emulated; "
                     f"precisions native here: {native}")


class OpenVinoRunner(Runner):
    """An ONNX file compiled by OpenVINO for the CPU, behind the common Runner interface.

    ``precision`` (f32, bf16 or f16) is OpenVINO's INFERENCE_PRECISION_HINT and
    is required. The model is compiled once with dynamic batch, height and width
    (``static_shapes=False``, the default); with ``static_shapes`` it is
    reshaped and compiled for each new input shape instead (cached per shape).
    On ddpm-cifar10 (2 cores, AVX-512) the static form showed no consistent
    gain over the dynamic one at 32-128 px (-13 % to +5 %), while each new shape
    costs seconds of compilation (docs/benchmarks.md, "OpenVINO on the CPU").
    Compiled for latency
    (PERFORMANCE_HINT LATENCY: one stream, every thread on one request) with
    ``threads`` inference threads (None: OpenVINO's default, one per core).

    At bf16 and f16 the sinusoidal embedding of the timestep (or noise level)
    is held in f32 (``hold_islands=True``, the default): OpenVINO would
    otherwise round t = 999 to 1000 before sin/cos (runners/openvino_islands.py).

    Thread safety: calls from several threads are serialized (one infer request).
    """

    name = "openvino"

    def __init__(self, path: str | Path, *, precision: str, threads: int | None = None, spec: ModelSpec | None = None,
                 static_shapes: bool = False, device: str = "CPU", hold_f32_islands: bool = True) -> None:
        self.precision = parse_precision(precision)
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be at least 1 (got {threads})")
        self.ov = import_openvino()  # before the (costly) parse, so a missing OpenVINO is the first thing said
        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"ONNX file not found: {self.path}")
        super().__init__(spec if spec is not None else spec_of(self.path, foreign=False))
        self.threads = threads
        self.static_shapes = static_shapes
        self.device = device
        self.core: Any = self.ov.Core()
        check_precision(self.precision, device_capabilities(self.core, device), device)
        self.hold_f32_islands = hold_f32_islands and self.precision != "f32"
        self.islands = HeldIslands()
        self._folder: Any = None  # the marked IR's temporary folder, alive while the model is
        self._model: Any = None
        self._compiled: dict[tuple[int, ...] | None, tuple[Any, Any]] = {}  # shape (None: dynamic) -> (model, request)
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        """OpenVINO's release, e.g. 2026.4.1 (its build suffix left out)."""
        return str(self.ov.__version__).split("-")[0]

    def config(self) -> dict[str, Any]:
        """The properties the model is compiled with."""
        cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = self.threads
        return cfg

    def _compile(self, shape: tuple[int, ...] | None) -> tuple[Any, Any]:
        model = self._model
        if shape is not None:
            model = self._model.clone()
            b, _, h, w = shape
            model.reshape({t.name: list(t.shape_for(b, h, w, {})) for t in self.spec.inputs})
        compiled = self.core.compile_model(model, self.device, self.config())
        got = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        if got != self.precision:
            # A second guard behind check_precision: the plugin chose another precision than the one asked for.
            raise UsageError(f"OpenVINO compiled the model at {got}, not the {self.precision} asked for; refusing to "
                             "run at a precision nobody chose")
        if self.islands.nodes and not self.islands.checked:
            self.islands.not_held += [f"{name}: compiled at {self.precision}" for name in held_at_low_precision(compiled)]
            self.islands.checked = True
        return compiled, compiled.create_infer_request()

    def _activate(self) -> None:
        # OpenVINO reads the path itself (and its external data files beside it).
        self._model = self.core.read_model(str(self.path))
        if self.hold_f32_islands:
            self._folder = private_folder()
            self._model, self.islands = hold_islands(self.ov, self.core, self._model, Path(self._folder.name))
        if not self.static_shapes:
            self._compiled[None] = self._compile(None)

    def _deactivate(self) -> None:
        self._compiled.clear()
        self._model = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def compiled_settings(self) -> dict[str, Any]:
        """What OpenVINO compiled: precision, hint, threads and streams as the compiled model reports them."""
        if not self._compiled:
            return {"precision": self.precision}
        compiled = next(iter(self._compiled.values()))[0]
        prop = compiled.get_property
        return {"precision": self.precision, "inference_precision": _type_name(prop("INFERENCE_PRECISION_HINT")),
                "performance_hint": str(prop("PERFORMANCE_HINT")).rsplit(".", 1)[-1],
                "threads": int(prop("INFERENCE_NUM_THREADS")), "streams": int(prop("NUM_STREAMS")),
                "shapes": "static per shape" if self.static_shapes else "dynamic",
                "device": str(self.core.get_property(self.device, "FULL_DEVICE_NAME")), "openvino": self.version,
                "f32_islands": {name: len(nodes) for name, nodes in self.islands.nodes.items()},
                "f32_island_nodes_not_held": list(self.islands.not_held)}

    def describe(self) -> str:
        """One line naming the backend, its precision and how it runs, for reports."""
        s = self.compiled_settings()
        threads = s.get("threads") or "default"
        return (f"openvino {self.version} ({self.device}, {self.precision}, {s.get('performance_hint', 'LATENCY')}, "
                f"{threads} threads, {'static' if self.static_shapes else 'dynamic'} shapes"
                + (f", {self.islands.describe()}" if self.islands.nodes else "") + ")")

    def _infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        arrays = {t.name: np.ascontiguousarray(np.asarray(feeds[t.name]), dtype=t.dtype) for t in self.spec.inputs}
        key = tuple(arrays[self.spec.image_input.name].shape) if self.static_shapes else None
        with self._lock:
            if key not in self._compiled:
                self._compiled[key] = self._compile(key)
            compiled, request = self._compiled[key]
            # share_outputs=False: the arrays returned are copies, not views of the request's next results.
            result = request.infer(arrays, share_outputs=False)
            return {out.get_any_name(): np.asarray(result[out]) for out in compiled.outputs}


def _type_name(value: Any) -> str:
    """An OpenVINO element type as its short name ('f32', 'bf16', 'f16'), whatever form the property came in."""
    name = getattr(value, "get_type_name", None)
    return str(name()) if callable(name) else str(value)
