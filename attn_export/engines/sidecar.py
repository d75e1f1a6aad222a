"""The engine sidecar ``<engine>.json``: everything needed to use or refuse a plan file.

A TensorRT plan only loads on the TensorRT version that built it and, by
default, on GPUs of the same compute capability. The sidecar records both,
plus the profiles, I/O, the source ONNX, the ModelSpec and the fused-attention
report, so runners can refuse a mismatched engine with a clear message
instead of TensorRT's "stdVersionRead == kSERIALIZATION_VERSION failed".

Schema (``format`` = "attn-export-engine/1")::

    format, engine_file (basename), engine_sha256, tensorrt_version (the
    runtime's version), runtime ("tensorrt" | "rtx"; absent means "tensorrt"),
    gpu {name, compute_capability "X.Y"} (the build GPU; null for a
    TensorRT-RTX engine built without one), compute_capabilities (TensorRT-RTX:
    the "X.Y" targets the engine runs on), hardware_compatibility
    ("none" | "ampere_plus" | "same_compute_capability"; TensorRT),
    precision ("fp16" | "fp32" | "mixed"),
    profiles [{min, opt, max: [b, h, w], shapes: {tensor: [min, opt, max]}}],
    io [{name, mode "input"|"output", dtype (numpy name), shape (-1 = dynamic)}],
    onnx {path, sha256}, model (ModelSpec dict), fusion (fusion report dict),
    build {seconds, builder_optimization_level, workspace_bytes, timing_cache, strongly_typed}
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from ..atomic import write_text_atomic
from ..errors import UsageError
from ..schema import DTYPES, MAX_DIM, SHA256_RE, integer, items, json_value, mapping, optional, record, text
from ..spec import ModelSpec
from .profiles import Profile, tensor_shapes

SIDECAR_FORMAT = "attn-export-engine/1"
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
PRECISIONS = ("fp16", "fp32", "mixed")
REQUIRED_KEYS = ("format", "engine_file", "tensorrt_version", "gpu", "profiles", "io", "model")
REBUILD_HINT = "rebuild the engine with `attn-export trt`"


ENGINE_SUFFIXES = (".plan", ".engine", ".trt")

_TRIPLE = items(integer(1, MAX_DIM), 3, 3)
_CC = re.compile(r"^\d{1,2}\.\d{1,2}$")
RUNTIME_NAMES = ("tensorrt", "rtx")
SIDECAR_SCHEMA = record({
    "format": text(choices=(SIDECAR_FORMAT,)),
    "engine_file": text(re.compile(r"^[^/\\\x00]{1,255}$")),
    "engine_sha256": optional(text(SHA256_RE)),
    "tensorrt_version": text(re.compile(r"^\d+(\.\d+){0,3}[\w.+-]*$")),
    "runtime": text(choices=RUNTIME_NAMES),
    "gpu": optional(record({"name": text(), "compute_capability": text(_CC)}, ("compute_capability",))),
    "compute_capabilities": optional(items(text(_CC), 1, 16)),
    "hardware_compatibility": text(choices=HARDWARE_COMPATIBILITY),
    "precision": text(choices=PRECISIONS),
    "profiles": items(record({"min": _TRIPLE, "opt": _TRIPLE, "max": _TRIPLE,
                              "shapes": mapping(items(items(integer(0, MAX_DIM), 0, 8), 3, 3))},
                             ("min", "opt", "max")), 1, 64),
    "io": items(record({"name": text(), "mode": text(choices=("input", "output")), "dtype": text(choices=DTYPES),
                        "shape": items(integer(-1, MAX_DIM), 0, 8)}, ("name", "dtype", "shape")), 1),
    "onnx": record({"path": optional(text()), "sha256": optional(text(SHA256_RE))}),
    "model": lambda v, w: None,  # checked by ModelSpec.from_dict
    "fusion": json_value,
    "build": json_value,
}, REQUIRED_KEYS)


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    """The sidecar of ``model.engine`` is ``model.engine.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def is_engine_path(path: str | os.PathLike[str]) -> bool:
    """True for .plan/.engine/.trt files, and for any non-ONNX file that has an engine sidecar."""
    p = Path(path)
    if p.suffix.lower() in ENGINE_SUFFIXES:
        return True
    return p.suffix.lower() != ".onnx" and sidecar_path(p).is_file()


def profile_entries(profiles: Sequence[Profile], spec: ModelSpec) -> list[dict[str, Any]]:
    """Profiles as stored in the sidecar: the triples plus per-tensor shapes."""
    out = []
    for p in profiles:
        entry: dict[str, Any] = p.to_dict()
        entry["shapes"] = {name: [list(s) for s in shapes] for name, shapes in tensor_shapes(p, spec).items()}
        out.append(entry)
    return out


def make_sidecar(
    *,
    engine_path: str | os.PathLike[str],
    engine_sha256: str,
    tensorrt_version: str,
    gpu_name: str | None,
    compute_capability: str | None,
    profiles: Sequence[Profile],
    spec: ModelSpec,
    io: list[dict[str, Any]],
    onnx_path: str | os.PathLike[str],
    onnx_sha256: str,
    precision: str,
    fusion: dict[str, Any] | None = None,
    hardware_compatibility: str = "none",
    build: dict[str, Any] | None = None,
    runtime: str = "tensorrt",
    compute_capabilities: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Assemble a sidecar dict in the documented schema (``gpu_name`` None: built without a GPU)."""
    if runtime not in RUNTIME_NAMES:
        raise UsageError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIME_NAMES)}")
    if hardware_compatibility not in HARDWARE_COMPATIBILITY:
        raise UsageError(f"unknown hardware compatibility {hardware_compatibility!r}; use one of {', '.join(HARDWARE_COMPATIBILITY)}")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return {
        "format": SIDECAR_FORMAT,
        "engine_file": Path(engine_path).name,
        "engine_sha256": engine_sha256,
        "tensorrt_version": str(tensorrt_version),
        "runtime": runtime,
        "gpu": {"name": gpu_name, "compute_capability": str(compute_capability)} if gpu_name and compute_capability else None,
        "compute_capabilities": list(compute_capabilities) if compute_capabilities else None,
        "hardware_compatibility": hardware_compatibility,
        "precision": precision,
        "profiles": profile_entries(profiles, spec),
        "io": io,
        "onnx": {"path": str(onnx_path), "sha256": onnx_sha256},
        "model": spec.to_dict(),
        "fusion": fusion or {},
        "build": build or {},
    }


def sidecar_json(data: dict[str, Any]) -> str:
    """The sidecar's text; UsageError if a required key is missing."""
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise UsageError(f"engine sidecar lacks {', '.join(missing)}; not written")
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_sidecar(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON at ``path`` atomically; returns the path.

    ``path`` is the sidecar path itself (see :func:`sidecar_path`).
    """
    out = Path(path)
    write_text_atomic(out, sidecar_json(data))
    return out


def read_sidecar(engine_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the sidecar next to ``engine_path`` (one-line UsageError if missing or invalid)."""
    engine = Path(engine_path)
    path = sidecar_path(engine)
    if not path.is_file():
        raise UsageError(f"engine description {path} not found; it is written next to the engine by `attn-export trt` ({REBUILD_HINT})")
    if path.stat().st_size > 16 << 20:
        raise UsageError(f"engine description {path} is {path.stat().st_size >> 20} MiB; a real one is a few KiB")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UsageError(f"engine description {path} is not valid JSON ({str(exc).splitlines()[0]}); {REBUILD_HINT}") from None
    if not isinstance(data, dict):
        raise UsageError(f"engine description {path} is not a JSON object; {REBUILD_HINT}")
    fmt = data.get("format")
    if fmt != SIDECAR_FORMAT:
        raise UsageError(f"engine description {path} has format {fmt!r}, expected {SIDECAR_FORMAT!r}; {REBUILD_HINT}")
    try:
        SIDECAR_SCHEMA(data, "sidecar")
        ModelSpec.from_dict(data["model"])
        for p in data["profiles"]:
            Profile.from_dict(p)
    except UsageError as exc:
        raise UsageError(f"engine description {path} is invalid: {exc}; {REBUILD_HINT}") from None
    return data


def sidecar_profiles(data: dict[str, Any]) -> list[Profile]:
    """The optimization profiles recorded in a sidecar."""
    return [Profile.from_dict(p) for p in data["profiles"]]


def sidecar_spec(data: dict[str, Any]) -> ModelSpec:
    """The ModelSpec recorded in a sidecar already read (:func:`read_sidecar`)."""
    return ModelSpec.from_dict(data["model"])


def artifact_spec(path: str | Path, input_ranges: dict[str, tuple[float, float]] | None = None) -> ModelSpec:
    """The description of an artifact file: an engine's sidecar, or an ONNX file's by
    :func:`attn_export.exporter.foreign.spec_of` (embedded, else read off a foreign graph)."""
    from ..exporter.foreign import spec_of

    p = Path(path)
    if not p.exists():
        raise UsageError(f"artifact not found: {p}")
    if is_engine_path(p):
        return sidecar_spec(read_sidecar(p))
    return spec_of(p, input_ranges=input_ranges)


def _version_triple(version: str) -> tuple[int, ...]:
    """'10.14.1.48' -> (10, 14, 1); missing parts count as 0."""
    parts = []
    for piece in str(version).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def _cc_tuple(cc: str) -> tuple[int, int]:
    try:
        major, _, minor = str(cc).partition(".")
        return int(major), int(minor or 0)
    except ValueError:
        raise UsageError(f"bad compute capability {cc!r}; expected 'X.Y' such as '8.6'") from None


def sidecar_runtime(sidecar: dict[str, Any]) -> str:
    """The runtime an engine was built for: "tensorrt" (also for sidecars written before runtimes were recorded) or "rtx"."""
    return str(sidecar.get("runtime") or "tensorrt")


def check_compatible(sidecar: dict[str, Any], trt_version: str, gpu_name: str, compute_capability: str,
                     runtime: str = "tensorrt") -> None:
    """Refuse an engine that this runtime or GPU cannot load (UsageError naming both sides).

    The runtime must be the one that built it, at the same major.minor.patch
    (plans are not portable across versions). TensorRT engines: GPUs are
    compared on compute capability: equal, unless the engine was built with
    ``hardware_compatibility="ampere_plus"``, which runs on any GPU with
    compute capability 8.0 or later. TensorRT-RTX engines run on the compute
    capabilities they were built for (recorded in the sidecar).
    """
    from .runtime import get_runtime

    name = sidecar.get("engine_file", "engine")
    built_rt, here_rt = get_runtime(sidecar_runtime(sidecar)).display, get_runtime(runtime).display
    if built_rt != here_rt:
        raise UsageError(f"{name} is a {built_rt} engine; load it with {built_rt}, not {here_rt} "
                         f"({REBUILD_HINT} --runtime {runtime} for this one)")
    built_v = str(sidecar.get("tensorrt_version", "?"))
    if _version_triple(built_v) != _version_triple(trt_version):
        raise UsageError(
            f"{name} was built with {built_rt} {built_v} but this is {here_rt} {trt_version}; "
            f"plans only load on the version that built them: {REBUILD_HINT}"
        )
    if runtime == "rtx":
        targets = [str(c) for c in sidecar.get("compute_capabilities") or []]
        if targets and compute_capability not in targets:
            raise UsageError(f"{name} was built for compute capabilities {', '.join(targets)} but this GPU is {gpu_name} "
                             f"(compute capability {compute_capability}); {REBUILD_HINT} --runtime rtx --compute-capability {compute_capability}")
        return
    gpu = sidecar.get("gpu") or {}
    built_cc = str(gpu.get("compute_capability", "?"))
    built_name = gpu.get("name", "unknown GPU")
    level = sidecar.get("hardware_compatibility", "none")
    here = _cc_tuple(compute_capability)
    if level == "ampere_plus":
        if here < (8, 0):
            raise UsageError(
                f"{name} was built for Ampere or newer GPUs ({built_name}, compute capability {built_cc}) "
                f"but this GPU is {gpu_name} (compute capability {compute_capability}); {REBUILD_HINT}"
            )
        return
    if _cc_tuple(built_cc) != here:
        raise UsageError(
            f"{name} was built on {built_name} (compute capability {built_cc}) but this GPU is {gpu_name} "
            f"(compute capability {compute_capability}); {REBUILD_HINT} on this GPU (or build it with hardware compatibility 'ampere_plus')"
        )
