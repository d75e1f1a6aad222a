"""ONNX Runtime's serving form of a model: what runners build their sessions from, never written as the artifact."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .chunked import FORM as CHUNKED, MIN_OPSET as CHUNKED_MIN_OPSET, to_chunked_form
from .index import default_opset
from .rewrite import RewriteResult, to_onnxruntime_form
from .winograd import WinogradResult, winograd_convolutions

# Providers with a MultiHeadAttention kernel; Winograd in ONNX ops only pays where convolutions are MLAS's (CPU).
MHA_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")
WINOGRAD_PROVIDERS = ("CPUExecutionProvider",)
# Where attention in query chunks (large MLAS GEMMs) measured faster than the MultiHeadAttention kernel.
CHUNKED_PROVIDERS = ("CPUExecutionProvider",)
# "auto": the fastest measured form per provider; "multiheadattention": MultiHeadAttention wherever it runs.
SERVING_ATTENTION = ("auto", "multiheadattention")


@dataclass
class ServingForm:
    """What :func:`onnxruntime_serving_form` rewrote."""

    attention: RewriteResult | None = None
    winograd: WinogradResult | None = None
    # Constants the graph names as external-data stubs, to hand to the session (``with_arrays``).
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def attention_sites(self) -> int:
        return len(self.attention.rewritten) if self.attention else 0

    @property
    def winograd_convolutions(self) -> int:
        return len(self.winograd.rewritten) if self.winograd else 0

    @property
    def attention_kind(self) -> str:
        """What the attention sites became, in words."""
        if self.attention and self.attention.form == CHUNKED:
            return "query-chunked attention"
        return "MultiHeadAttention"

    @property
    def changed(self) -> bool:
        return bool(self.attention_sites or self.winograd_convolutions)


def onnxruntime_serving_form(model: onnx.ModelProto, *, provider: str = "CPUExecutionProvider", hw_multiple: int = 1,
                             winograd: bool = True, weights_folder: Path | None = None,
                             max_added_bytes: int | None = None, with_arrays: bool = False,
                             attention: str = "auto") -> ServingForm:
    """Rewrite (in place) ``model`` into the form ONNX Runtime serves fastest on ``provider``.

    Attention sites (FP32) become, on the CPU provider, attention in query
    chunks in standard ops (:mod:`.chunked`: large GEMMs, scores bounded per
    chunk) and, on CUDA or with ``attention="multiheadattention"``,
    ``com.microsoft.MultiHeadAttention`` (flash attention); both hold memory
    linear in the sequence length. On the CPU provider, and
    with ``winograd``, eligible 3x3 convolutions become Winograd F(4x4, 3x3) in
    standard ops (``hw_multiple``: every accepted height and width is a
    multiple of it; ``max_added_bytes`` bounds the transformed weights).
    ``with_arrays``: the transformed weights are kept out of the graph, in
    ``.arrays``, for ``SessionOptions.add_external_initializers`` (a model
    to be written to a file needs them inside: leave it False).
    Convolutions go first: their shape probe needs a graph of standard ops.
    """
    if attention not in SERVING_ATTENTION:
        raise ValueError(f"attention must be one of {SERVING_ATTENTION} (got {attention!r})")
    form = ServingForm()
    if winograd and provider in WINOGRAD_PROVIDERS:
        form.winograd = winograd_convolutions(model, hw_multiple, weights_folder=weights_folder,
                                              max_added_bytes=max_added_bytes,
                                              arrays=form.arrays if with_arrays else None)
    if (attention == "auto" and provider in CHUNKED_PROVIDERS
            and default_opset(model) >= CHUNKED_MIN_OPSET):
        form.attention = to_chunked_form(model, weights_folder=weights_folder)
    elif provider in MHA_PROVIDERS:
        form.attention = to_onnxruntime_form(model, weights_folder=weights_folder)
    return form
