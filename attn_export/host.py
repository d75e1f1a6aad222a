"""The machine and the software a result was produced on: every report and tuned artifact carries them.

Read without importing the heavy libraries: versions come from the installed
distributions' metadata, the CPU from /proc/cpuinfo and sysfs. A GPU is named
only where PyTorch is already loaded (asking CUDA would cost seconds).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# Distribution -> report key; the first installed name of each group is reported.
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "attn_export": ("attn-export",),
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
    "tensorrt": ("tensorrt-cu13-bindings", "tensorrt-cu12-bindings", "tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
    "tensorrt_rtx": ("tensorrt-rtx-cu13-bindings", "tensorrt-rtx"),
    "openvino": ("openvino",),
}

# The widest vector units decide which kernels ONNX Runtime's MLAS and PyTorch's oneDNN pick; the model name alone
# ("AMD EPYC") does not tell an AVX2 host from an AVX-512 one, and their ratios differ.
SIMD_LEVELS = ("avx512f", "avx2", "avx", "sse4_2", "asimd")
# Units that low-precision CPU kernels use when present (bfloat16 and FP16 dot products, AMX tiles).
_LOW_PRECISION_FLAGS = ("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile", "avx_vnni", "f16c")


def native_bf16(fields: dict[str, str] | None = None) -> bool:
    """Whether this CPU has bfloat16 dot-product units (AVX512_BF16 or AMX-BF16), from /proc/cpuinfo's flags.

    PyTorch has no query for it: its bf16 kernels run on any AVX-512 CPU, emulated by conversions where these
    units are missing, so a bf16 baseline there would measure the emulation.
    """
    fields = cpu_fields() if fields is None else fields
    flags = set((fields.get("flags") or "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def versions() -> dict[str, str]:
    """Installed versions of this tool and the libraries it drives (absent ones left out)."""
    out: dict[str, str] = {}
    for key, names in _DISTRIBUTIONS.items():
        for name in names:
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[key] = metadata.version(name)
                break
    if "attn_export" not in out:  # a checkout used without installing it
        from .version import __version__

        out["attn_export"] = __version__
    return out


def cpu_fields() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo, key to value (empty where it cannot be read)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return fields


def l2_cache_bytes() -> int | None:
    """This machine's per-core L2 cache size in bytes (Linux sysfs), None where it cannot be read."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
        units = {"K": 2**10, "M": 2**20}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError, IndexError):
        return None


def cpu_info(fields: dict[str, str] | None = None) -> dict[str, Any]:
    """Model, widest SIMD level, low-precision units, L2 size and core count of this CPU."""
    fields = cpu_fields() if fields is None else fields
    info: dict[str, Any] = {"processor": fields.get("model name") or platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count()}
    if fields:
        flags = set((fields.get("flags") or fields.get("Features") or "").split())
        info["simd"] = next((f for f in SIMD_LEVELS if f in flags), "unknown")
        info["low_precision"] = [f for f in _LOW_PRECISION_FLAGS if f in flags]
        if "cpu family" in fields and "model" in fields:
            info["cpu_family_model"] = f"{fields['cpu family']}/{fields['model']}"
    l2 = l2_cache_bytes()
    if l2 is not None:
        info["l2_bytes"] = l2
    return info


def host_info() -> dict[str, Any]:
    """Platform, Python, CPU, the GPU where PyTorch already sees one, and the library versions."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(), **cpu_info()}
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            info["torch_threads"] = torch.get_num_threads()
            if torch.cuda.is_available():
                info["gpu"] = torch.cuda.get_device_name(0)
    info["versions"] = versions()
    return info
