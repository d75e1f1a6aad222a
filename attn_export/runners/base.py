"""One interface for every backend: PyTorch reference, ONNX Runtime, TensorRT.

A runner is built cheaply from an artifact; ``activate()`` does the heavy
loading (session or engine creation), ``infer(feeds)`` maps input names to
numpy arrays and returns output names to numpy arrays, ``deactivate()``
frees resources. Runners are context managers, and ``runner(x, t, y)`` is a
convenience for serving code that returns the first output.
"""

from __future__ import annotations

import abc
from typing import Any, Mapping

import numpy as np

from ..errors import ShapeError, UsageError
from ..spec import ModelSpec, TensorSpec


class Runner(abc.ABC):
    """Base class of all runners. Subclasses set ``name`` and ``spec``."""

    name: str = "runner"

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.is_active = False

    # -- lifecycle ------------------------------------------------------------
    def activate(self) -> "Runner":
        """Load what the backend needs. Calling it twice is harmless."""
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        """Release the backend's resources."""
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # -- inference ------------------------------------------------------------
    def infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run one batch: input name -> array in, output name -> numpy array out."""
        if not self.is_active:
            self.activate()
        self.check_feeds(feeds)
        return self._infer(feeds)

    def __call__(self, x: Any, t: Any, y: Any = None, **extra: Any) -> Any:
        """Serving convenience: run the denoiser and return its (first) output.

        ``x``, ``t`` and ``y`` go to the spec's first three inputs whatever their
        names; extra inputs by keyword. A timestep (or label) given once, as a
        number or a one-element array, holds for the whole batch, as samplers
        pass it.
        """
        specs = self.spec.inputs
        shape = getattr(x, "shape", None)
        if shape is None:
            raise UsageError(f"x must be a 4-D array or tensor (B, C, H, W); got {type(x).__name__}")
        batch = int(shape[0]) if len(shape) else 1  # a wrong rank is refused with the other shape checks
        feeds: dict[str, Any] = {specs[0].name: x, specs[1].name: _per_sample(t, batch, specs[1])}
        if y is not None:
            if len(specs) < 3:
                raise UsageError("this model takes no class label y")
            feeds[specs[2].name] = _per_sample(y, batch, specs[2])
        feeds.update(extra)
        out = self.infer(feeds)
        return out[self.spec.outputs[0].name]

    def check_feeds(self, feeds: Mapping[str, Any]) -> None:
        """Refuse missing inputs and shapes the artifact cannot serve, naming the reason."""
        names = [t.name for t in self.spec.inputs]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise UsageError(f"missing input(s) {', '.join(missing)}; this model takes {', '.join(names)}")
        extra = [n for n in feeds if n not in names]
        if extra:
            raise UsageError(f"unexpected input(s) {', '.join(extra)}; this model takes {', '.join(names)}")
        x = feeds[self.spec.image_input.name]
        shape = tuple(x.shape)
        if len(shape) != 4:
            raise ShapeError(f"input {self.spec.image_input.name} must be 4-D (B, C, H, W); got shape {shape}")
        if shape[1] != self.spec.in_channels:
            raise ShapeError(f"input {self.spec.image_input.name} must have {self.spec.in_channels} channels; got {shape[1]}")
        self.check_shape(shape[0], shape[2], shape[3])
        axes: dict[str, int] = {}
        for t in self.spec.inputs[1:]:
            got = tuple(feeds[t.name].shape)
            if len(got) == len(t.dims):
                for size, d in zip(got, t.dims):
                    if isinstance(d, str) and d in self.spec.axis_sizes:
                        low, _, high = self.spec.axis_sizes[d]
                        if not low <= size <= high or axes.setdefault(d, size) != size:
                            raise ShapeError(f"input {t.name}: axis {d} must be one size in {low}..{high} across the "
                                             f"inputs; got {size}")
            want = t.shape_for(shape[0], shape[2], shape[3], axes)
            if got != want:
                raise ShapeError(f"input {t.name} must have shape {want} for batch {shape[0]}; got {got}")

    def check_shape(self, batch: int, height: int, width: int) -> None:
        """Raise ShapeError if this runner cannot serve (batch, H, W). Engines narrow it to their profiles."""
        self.spec.check_shape(batch, height, width)

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]: ...


def _per_sample(value: Any, batch: int, spec: TensorSpec) -> Any:
    """``value`` for every sample of the batch when the input is one value per sample ([batch]) and it was given once."""
    if list(spec.dims) != ["batch"]:
        return value
    if isinstance(value, (int, float, np.integer, np.floating)) or (isinstance(value, np.ndarray) and value.size == 1):
        return np.full((batch,), np.asarray(value).reshape(()), dtype=spec.dtype)
    numel = getattr(value, "numel", None)  # a torch tensor (kept on its device)
    if callable(numel) and numel() == 1 and batch > 1:
        return value.reshape(1).expand(batch).contiguous()
    return value
