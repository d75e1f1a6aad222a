"""ONNX Runtime's serving form of a model: what runners build their sessions from, never written as the artifact."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .rewrite import RewriteResult, to_onnxruntime_form
from .winograd import WinogradResult, winograd_convolutions

# Providers with a MultiHeadAttention kernel; Winograd in ONNX ops only pays where convolutions are MLAS's (CPU).
MHA_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")
WINOGRAD_PROVIDERS = ("CPUExecutionProvider",)


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
    def changed(self) -> bool:
        return bool(self.attention_sites or self.winograd_convolutions)


def onnxruntime_serving_form(model: onnx.ModelProto, *, provider: str = "CPUExecutionProvider", hw_multiple: int = 1,
                             winograd: bool = True, weights_folder: Path | None = None,
                             max_added_bytes: int | None = None, with_arrays: bool = False) -> ServingForm:
    """Rewrite (in place) ``model`` into the form ONNX Runtime serves fastest on ``provider``.

    Attention sites become ``com.microsoft.MultiHeadAttention`` (CPU and CUDA:
    flash attention, memory linear in the sequence). On the CPU provider, and
    with ``winograd``, eligible 3x3 convolutions become Winograd F(4x4, 3x3) in
    standard ops (``hw_multiple``: every accepted height and width is a
    multiple of it; ``max_added_bytes`` bounds the transformed weights).
    ``with_arrays``: the transformed weights are kept out of the graph, in
    ``.arrays``, for ``SessionOptions.add_external_initializers`` (a model
    to be written to a file needs them inside: leave it False).
    Convolutions go first: their shape probe needs a graph of standard ops.
    """
    form = ServingForm()
    if winograd and provider in WINOGRAD_PROVIDERS:
        form.winograd = winograd_convolutions(model, hw_multiple, weights_folder=weights_folder,
                                              max_added_bytes=max_added_bytes,
                                              arrays=form.arrays if with_arrays else None)
    if provider in MHA_PROVIDERS:
        form.attention = to_onnxruntime_form(model, weights_folder=weights_folder)
    return form
