"""attn-export: diffusion UNets with self-attention from PyTorch to ONNX and TensorRT.

Everything the CLI does is a function here (imported lazily, so ``import attn_export`` stays cheap):

- :func:`export_onnx` (``attn-export onnx``), with :class:`ModelSource` naming the model
- :func:`verify` (``attn-export verify``; :func:`verify_artifact` adds ``--localize``, which is
  :func:`localize`, and ``--save-inputs`` / ``--load-inputs``: :func:`save_inputs`, :func:`load_inputs`)
  and :func:`inspect_artifact` (``attn-export inspect``); :func:`verify_trajectory` (``verify --trajectory``:
  whole DDIM/DDPM sampling runs compared)
- :func:`optimize_onnx` (``attn-export optimize``, for TensorRT or ONNX Runtime's serving form), with :func:`find_attention` and
  :func:`canonicalize_attention` (the one attention analysis)
- :func:`convert_fp16` (``attn-export fp16``) and :func:`build_engine` (``attn-export trt``: FP16
  conversion, readiness, build and sidecar in one call; both in :mod:`attn_export.pipeline`)
- :func:`check_trt_readiness` (``attn-export inspect --trt``)
- :func:`run_bench` (``attn-export bench``) and :func:`write_model_repository` (``attn-export triton``)
- runners: :class:`TorchRunner`, :class:`OrtRunner`, :class:`TrtRunner`, :class:`OpenVinoRunner`
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

_LAZY = {
    "ModelSource": "attn_export.models.loader",
    "load_model": "attn_export.models.loader",
    "export_onnx": "attn_export.exporter.onnx_export",
    "optimize_onnx": "attn_export.exporter.optimize",
    "find_attention": "attn_export.graph",
    "canonicalize_attention": "attn_export.graph",
    "convert_fp16": "attn_export.pipeline",
    "audit_fp16": "attn_export.exporter.audit",
    "verify": "attn_export.verify",
    "verify_artifact": "attn_export.pipeline",
    "verify_trajectory": "attn_export.trajectory",
    "localize": "attn_export.localize",
    "save_inputs": "attn_export.inputs",
    "load_inputs": "attn_export.inputs",
    "inspect_artifact": "attn_export.inspection",
    "check_trt_readiness": "attn_export.engines.readiness",
    "build_engine": "attn_export.pipeline",
    "EngineResult": "attn_export.pipeline",
    "run_bench": "attn_export.bench",
    "write_model_repository": "attn_export.triton",
    "TorchRunner": "attn_export.runners.torch_runner",
    "OrtRunner": "attn_export.runners.ort_runner",
    "TrtRunner": "attn_export.runners.trt_runner",
    "OpenVinoRunner": "attn_export.runners.openvino_runner",
    "ModelSpec": "attn_export.spec",
    "ReferenceOptions": "attn_export.spec",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attn_export' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy names too, so completion and dir() show the public API before first use.
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})
