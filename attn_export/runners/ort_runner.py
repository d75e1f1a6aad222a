"""ONNX Runtime runner: CPU here; CUDA and TensorRT execution providers where present."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ProviderUnavailable, UsageError
from ..exporter.foreign import spec_of
from ..exporter.metadata import load_onnx
from ..spec import ModelSpec
from .base import Runner

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


def resolve_providers(providers: Sequence[str] | None) -> list[str]:
    """Map short names (cpu, cuda, tensorrt) to ORT provider names; refuse unavailable ones."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not providers:
        return ["CPUExecutionProvider"]
    out = []
    for p in providers:
        name = PROVIDER_ALIASES.get(p.lower(), p)
        if name not in available:
            raise UsageError(f"ONNX Runtime provider {p!r} is not available here (available: {', '.join(available)})")
        out.append(name)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def check_providers(asked: Sequence[str], created: Sequence[str]) -> list[str]:
    """The providers a session really has; UsageError when one that was asked for could not be created.

    ONNX Runtime lists a provider as available when its library is installed
    (onnxruntime-gpu lists CUDA on any machine), then falls back to the CPU
    when the provider cannot start, with only a log line.
    """
    missing = [p for p in asked if p not in created]
    if missing:
        raise ProviderUnavailable(
            f"ONNX Runtime could not create {', '.join(missing)} on this machine (the session would run on "
            f"{', '.join(created) or 'nothing'}): it needs its GPU, driver and libraries (for CUDA: the CUDA and "
            "cuDNN versions listed at onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html); "
            "use --provider cpu to run on the CPU")
    return list(created)


# "onnxruntime": the serving form (attention as ONNX Runtime's contrib MultiHeadAttention or, on CPU where it
# measured faster, in query chunks; on CPU 3x3 convolutions as Winograd); "multiheadattention" / "chunked": the
# serving form with that attention at every site; "none": the serving form with attention as the file has it
# (Winograd only); "as-is": the file's own graph.
ATTENTION_FORMS = ("onnxruntime", "multiheadattention", "chunked", "none", "as-is")


class OrtRunner(Runner):
    """ONNX Runtime behind the common Runner interface, built from an ONNX path.

    ``attention="onnxruntime"`` (the default) builds the session from the
    serving form: every FP32 attention site as ONNX Runtime's contrib
    ``MultiHeadAttention`` (flash attention) or, on the CPU provider where
    that kernel's blocks would be thin (large head sizes), in query chunks
    (large GEMMs, scores bounded per chunk), memory linear in the sequence
    length either way (``"multiheadattention"`` / ``"chunked"``: that form
    at every site) and, on the CPU provider with ``winograd``, eligible 3x3
    convolutions as Winograd F(4x4, 3x3). The file
    itself, the artifact TensorRT reads, is never changed; ``"as-is"`` runs it
    exactly as written.

    Thread safety: one runner may be called from several threads at once.
    ``InferenceSession.run`` is documented thread-safe and each call gets its own
    output arrays; the runner keeps no per-call state. (The test suite calls it
    concurrently and compares each result with a serial run.)
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, providers: Sequence[str] | None = None, threads: int | None = None,
                 spec: ModelSpec | None = None, graph_optimization: str = "all", attention: str = "onnxruntime",
                 winograd: bool = True) -> None:
        if attention not in ATTENTION_FORMS:
            raise UsageError(f"attention must be one of {', '.join(ATTENTION_FORMS)} (got {attention!r})")
        self.attention = attention
        self.winograd = winograd
        self.attention_rewritten = 0
        self._parts: list[str] = []
        self.winograd_rewritten = 0
        self.path = Path(path)
        # The caller's description spares a parse of the file (verify has it already).
        super().__init__(spec if spec is not None else spec_of(self.path, foreign=False))
        self.providers = resolve_providers(providers)
        self.threads = threads
        self.graph_optimization = graph_optimization
        self.session: Any = None
        self._handed_over: list[Any] = []  # OrtValues the session reads its transformed weights from
        self._staged: str | None = None      # a temporary folder holding the serving form while the session loads it
        self._lock = threading.Lock()
        self.precision = self.spec.precision

    @property
    def provider(self) -> str:
        return self.providers[0]

    def activate(self) -> "OrtRunner":
        """Create the session once, even when the first calls arrive from several threads together."""
        if not self.is_active:
            with self._lock:
                if not self.is_active:
                    super().activate()
        return self

    def session_options(self) -> Any:
        """The ``onnxruntime.SessionOptions`` the session is built with (a subclass may adjust them)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        opts.graph_optimization_level = levels[self.graph_optimization]
        if self.providers[0] == "CPUExecutionProvider":
            # The memory pattern plans one block for every activation the first run allocated; with the arena's
            # growth that nearly doubled peak memory at 256 px (897 MiB against 497 MiB for ddpm-cifar10, batch 1)
            # for no latency measured (docs/benchmarks.md).
            opts.enable_mem_pattern = False
        return opts

    def _activate(self) -> None:
        import onnxruntime as ort

        opts = self.session_options()
        if self.providers != ["CPUExecutionProvider"]:
            # Its multi-line warning when a provider cannot start goes; check_providers says it in one line.
            ort.set_default_logger_severity(4)
        try:
            session = ort.InferenceSession(self._model_for_session(opts), opts, providers=self.providers)
        finally:
            self._unstage()
        self.providers = check_providers(self.providers, list(session.get_providers()))
        self.session = session

    def _model_for_session(self, opts: Any) -> str | bytes:
        """The file, or its serving form (:func:`attn_export.graph.onnxruntime_serving_form`).

        A model with external data is rewritten without its weights: ONNX
        Runtime reads the data files from the file's folder; only the weights
        of the 3x3 convolutions that qualify for Winograd are read here, and
        their transformed weights may add at most twice the model's weight bytes.
        """
        if self.attention == "as-is":
            return str(self.path)
        import onnx

        from ..exporter.serving import build_serving_form, serving_description
        from ..exporter.weights import has_external
        from ..graph.probe import read_external_data_from

        model = load_onnx(self.path, load_external_data=False)
        written = serving_description(model)
        if written is not None:  # already the serving form: run it as written
            self._parts = [str(p) for p in written.get("parts", [])]
            return str(self.path)
        external = has_external(model)
        # With external data the session's bytes stay small (the transformed weights are handed over as arrays):
        # their memory is what is bounded, to twice the model's weight bytes.
        form = build_serving_form(model, self.path, self.spec, provider=self.providers[0], winograd=self.winograd,
                                  with_arrays=external, one_file=not external,
                                  attention="auto" if self.attention == "onnxruntime" else self.attention)
        self._parts = form.parts()
        if not form.changed:
            return str(self.path)
        self.attention_rewritten = form.attention_sites
        self.winograd_rewritten = form.winograd_convolutions
        if not external:
            # Staged as a file with its weights in a data file, which ONNX Runtime maps instead of copying: the
            # session then holds the weights about once, as it does for the file as written. From bytes it held
            # them in the bytes, in its parsed copy and prepacked (2.0x the file as written's total peak for
            # ddpm-cifar10; docs/benchmarks.md, "Total peak memory per backend").
            self._staged = tempfile.mkdtemp(prefix="attn-export-serving-")
            staged = os.path.join(self._staged, "serving.onnx")
            onnx.save_model(model, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                            location="serving.onnx.data", size_threshold=1024)
            return staged
        if form.arrays:
            import onnxruntime as ort

            # The transformed weights reach the session as arrays, not through the serialized graph (seconds and
            # a copy saved on a large model); ONNX Runtime reads them for as long as the session lives.
            names = list(form.arrays)
            # One array at a time: each is let go as soon as its OrtValue holds it, so no moment holds them all twice.
            self._handed_over = [ort.OrtValue.ortvalue_from_numpy(form.arrays.pop(n)) for n in names]
            opts.add_external_initializers(names, self._handed_over)
        read_external_data_from(opts, self.path.parent)
        return model.SerializeToString()

    def serving_form_parts(self) -> list[str]:
        """What the session runs beyond the file, in words (empty for the file as written)."""
        return list(self._parts)

    def _unstage(self) -> None:
        # The session has mapped the data file: on POSIX it stays readable once unlinked. Elsewhere (Windows) an
        # open file cannot go; it is left to the system's temporary-file cleanup.
        if self._staged is not None:
            shutil.rmtree(self._staged, ignore_errors=True)
            self._staged = None

    def _deactivate(self) -> None:
        self.session = None
        self._handed_over = []
        self._unstage()

    def _infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        arrays = {}
        for t in self.spec.inputs:
            arrays[t.name] = np.ascontiguousarray(np.asarray(feeds[t.name]), dtype=t.dtype)
        outputs = self.session.run(None, arrays)
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, outputs))
