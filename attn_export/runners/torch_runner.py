"""The PyTorch reference runner: the model rebuilt from an artifact's description."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..models.attention import AttentionImpl
from ..models.loader import LoadedModel, ModelSource, load_model
from ..spec import ModelSpec
from .base import Runner


class TorchRunner(Runner):
    """Runs the PyTorch model (eager, CPU by default) behind the common Runner interface.

    ``attention_impl`` picks the AttentionBlock formulation: "reference" is the
    seed's literal math and the default for verification.
    """

    name = "pytorch"

    def __init__(self, source: ModelSource, *, attention_impl: AttentionImpl = "reference",
                 device: str = "cpu", spec: ModelSpec | None = None, threads: int | None = None,
                 half: bool = False, autocast_bf16: bool = False) -> None:
        self.source = source
        self.attention_impl = attention_impl
        self.device = device
        self.threads = threads
        # FP16 weights and activations (GPU only: the baseline a TensorRT FP16 engine is compared with).
        self.half = half
        # torch.autocast('cpu', dtype=torch.bfloat16) around the forward: PyTorch's own bf16 eager path on the CPU.
        self.autocast_bf16 = autocast_bf16
        self.loaded: LoadedModel | None = None
        if spec is None:
            # The spec comes from the built model: keep it, so activate() does not build it a second time.
            self.loaded = load_model(source, attention_impl)
            spec = self.loaded.spec
        super().__init__(spec)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, attention_impl: AttentionImpl = "reference") -> "TorchRunner":
        """Wrap an already built model (no second construction)."""
        runner = cls.__new__(cls)
        Runner.__init__(runner, loaded.spec)
        # source is a ModelSource for runners built by __init__; this one never loads (self.loaded is set), so None.
        runner.source, runner.attention_impl, runner.device, runner.threads = None, attention_impl, "cpu", None  # type: ignore[assignment]
        runner.half = runner.autocast_bf16 = False
        runner.loaded = loaded
        return runner

    def _activate(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.loaded is None:
            self.loaded = load_model(self.source, self.attention_impl)
        from ..models.attention import set_attention_impl

        set_attention_impl(self.loaded.module, self.attention_impl)
        self.loaded.module.to(self.device)
        if self.half:
            self.loaded.module.half()

    def _deactivate(self) -> None:
        pass

    @torch.no_grad()
    def _infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        assert self.loaded is not None
        args = [torch.as_tensor(np.asarray(feeds[t.name])).to(self.device) for t in self.spec.inputs]
        if self.half:
            args = [a.half() if a.is_floating_point() else a for a in args]
        if self.autocast_bf16:
            with torch.autocast(self.device, dtype=torch.bfloat16):
                out = self.loaded.module(*args)
        else:
            out = self.loaded.module(*args)
        return {self.spec.outputs[0].name: out.detach().float().cpu().numpy()}

