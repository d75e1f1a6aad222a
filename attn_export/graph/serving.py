"""ONNX Runtime's serving form of a model: what runners build their sessions from, never written as the artifact."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..host import l2_cache_bytes
from .attention import AttentionSite
from .chunked import MIN_OPSET as CHUNKED_MIN_OPSET, to_chunked_form
from .index import default_opset
from .rewrite import RewriteResult, _mha_problem, to_onnxruntime_form
from .winograd import WinogradResult, winograd_convolutions

# Providers with a MultiHeadAttention kernel; Winograd in ONNX ops only pays where convolutions are MLAS's (CPU).
MHA_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")
WINOGRAD_PROVIDERS = ("CPUExecutionProvider",)
# Where attention in query chunks (large MLAS GEMMs) can beat the MultiHeadAttention kernel.
CHUNKED_PROVIDERS = ("CPUExecutionProvider",)
# "auto": per site, the form measured faster on the provider; "multiheadattention" / "chunked": that form
# wherever it runs (chunks on the CPU provider only); "none": attention as the file has it (the other rewrites only).
SERVING_ATTENTION = ("auto", "multiheadattention", "chunked", "none")
# ONNX Runtime's MultiHeadAttention CPU kernel tiles keys in blocks of L2 / (16 * (d_qk + d_v)) (its source:
# onnxruntime/contrib_ops/cpu/bert/multihead_attention.cc). At 64 keys or fewer per block its GEMMs are too thin:
# query chunks measured 0.72-0.97x its time there (head sizes 256 and 512 on a 512 KiB L2), and 1.0-1.3x at 128
# or more (head sizes 64 and 128) (bench/chunked_attention.py).
CHUNKED_AT_MOST_KV_BLOCK = 64
# When the L2 size cannot be read: a common server core's.
DEFAULT_L2_BYTES = 2**20


def mha_cpu_kv_block(head_size: int, l2_bytes: int) -> int:
    """Keys per block of ONNX Runtime's MultiHeadAttention CPU kernel for this head size (q, k and v alike)."""
    return max(l2_bytes // (4 * 4 * 2 * head_size), 1)


def chunked_pays(site: AttentionSite, l2_bytes: int) -> bool:
    """True where query chunks beat the MultiHeadAttention CPU kernel, or that kernel cannot take the site."""
    if _mha_problem(site) is not None:
        return True
    return site.head_size is not None and mha_cpu_kv_block(site.head_size, l2_bytes) <= CHUNKED_AT_MOST_KV_BLOCK


@dataclass
class ServingForm:
    """What :func:`onnxruntime_serving_form` rewrote."""

    attention: RewriteResult | None = None   # sites as com.microsoft.MultiHeadAttention
    chunked: RewriteResult | None = None     # sites as attention in query chunks
    winograd: WinogradResult | None = None
    # Constants the graph names as external-data stubs, to hand to the session (``with_arrays``).
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def mha_sites(self) -> int:
        return len(self.attention.rewritten) if self.attention else 0

    @property
    def chunked_sites(self) -> int:
        return len(self.chunked.rewritten) if self.chunked else 0

    @property
    def attention_sites(self) -> int:
        return self.mha_sites + self.chunked_sites

    @property
    def winograd_convolutions(self) -> int:
        return len(self.winograd.rewritten) if self.winograd else 0

    def _attention_counts(self) -> tuple[tuple[int, str], ...]:
        return ((self.chunked_sites, "query-chunked attention"), (self.mha_sites, "MultiHeadAttention"))

    def parts(self) -> list[str]:
        """What the form runs beyond the file, in words: "6 x query-chunked attention", ..."""
        counts = (*self._attention_counts(), (self.winograd_convolutions, "Winograd 3x3 conv"))
        return [f"{n} x {what}" for n, what in counts if n]

    @property
    def attention_kind(self) -> str:
        """What the attention sites became, in words."""
        return " and ".join(what for n, what in self._attention_counts() if n)

    @property
    def changed(self) -> bool:
        return bool(self.attention_sites or self.winograd_convolutions)


def onnxruntime_serving_form(model: onnx.ModelProto, *, provider: str = "CPUExecutionProvider", hw_multiple: int = 1,
                             winograd: bool = True, weights_folder: Path | None = None,
                             max_added_bytes: int | None = None, with_arrays: bool = False,
                             attention: str = "auto", l2_bytes: int | None = None) -> ServingForm:
    """Rewrite (in place) ``model`` into the form ONNX Runtime serves fastest on ``provider``.

    Attention sites (FP32) become ``com.microsoft.MultiHeadAttention`` (flash
    attention) or, on the CPU provider, attention in query chunks in standard
    ops (:mod:`.chunked`: large GEMMs, scores bounded per chunk); both hold
    memory linear in the sequence length. ``attention="auto"`` picks per
    site: chunks where MultiHeadAttention's CPU kernel would tile the keys in
    blocks of 64 or fewer (large head sizes against the L2 cache,
    ``l2_bytes``, read from this machine when None) or cannot take the site;
    ``attention="none"`` leaves attention as the file has it.
    On the CPU provider, and with ``winograd``, eligible 3x3 convolutions
    become Winograd F(4x4, 3x3) in standard ops (``hw_multiple``: every accepted height and width is a
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
    if provider in CHUNKED_PROVIDERS and attention not in ("multiheadattention", "none") \
            and default_opset(model) >= CHUNKED_MIN_OPSET:
        l2 = l2_bytes or l2_cache_bytes() or DEFAULT_L2_BYTES
        form.chunked = to_chunked_form(model, weights_folder=weights_folder,
                                       select=None if attention == "chunked" else lambda s: chunked_pays(s, l2))
    if provider in MHA_PROVIDERS and attention not in ("chunked", "none"):
        # The sites left (none when every one went to chunks).
        form.attention = to_onnxruntime_form(model, weights_folder=weights_folder)
    return form
