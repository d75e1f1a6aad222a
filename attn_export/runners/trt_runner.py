"""TensorRT runner: an engine built by ``attn-export trt`` behind the common Runner interface.

Two ways in:

* ``infer(feeds)`` with numpy arrays (copied to the GPU and back), like the
  other runners;
* the serving path: ``infer(feeds)`` / ``infer_torch(feeds)`` / ``runner(x, t)``
  with torch CUDA tensors returns torch CUDA tensors, without host copies.

``tensorrt`` and ``torch`` are imported lazily, so this module imports
anywhere; ``activate()`` raises MissingDependencyError where they are missing.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..errors import EngineFailed, MissingDependencyError, ShapeError, UsageError
from ..spec import format_shape
from .base import Runner
from ..engines.profiles import describe_profiles, find_profile
from ..engines.runtime import RTX, get_runtime
from ..engines.sidecar import check_compatible, read_sidecar, sidecar_profiles, sidecar_runtime, sidecar_spec
from ..engines.trt_build import dims_list, is_input, numpy_dtype, require_gpu_runtime

if TYPE_CHECKING:  # typed as the real module; at run time `trt` forwards to the runtime the engine was built for
    import tensorrt as trt
else:
    from ..engines.runtime import trt


class TrtRunner(Runner):
    """Runs a TensorRT engine file; its sidecar supplies the ModelSpec and profiles.

    ``stream``: an optional ``torch.cuda.Stream`` to enqueue on (default: a
    stream owned by the runner; work is ordered after the caller's current
    stream and the caller's current stream waits for the result).
    ``use_cuda_graph``: capture a CUDA graph per input shape after one
    warm-up call at that shape and replay it on later calls (worth it for
    repeated static shapes, as in a sampling loop).

    Output buffers are reused between calls of the same shape: on the torch
    path the returned tensors are those buffers, so clone them if you keep
    results across calls (the numpy path always returns fresh arrays).

    Thread safety: a TensorRT execution context is not thread-safe (it holds
    the input shapes and tensor addresses of the call in flight). The runner
    guards each call with a lock, so concurrent calls are serialized, not
    parallel; for parallel serving create one runner per thread/stream.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, *, device: int = 0, stream: Any = None,
                 use_cuda_graph: bool = False) -> None:
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise UsageError(f"engine file not found: {self.path}")
        self.sidecar = read_sidecar(self.path)
        super().__init__(sidecar_spec(self.sidecar))
        self.runtime = get_runtime(sidecar_runtime(self.sidecar))
        if self.runtime is RTX:
            self.name = "tensorrt-rtx"
        self.profiles = sidecar_profiles(self.sidecar)
        self.precision = self.sidecar.get("precision", self.spec.precision)
        self.device = device
        self.use_cuda_graph = use_cuda_graph
        self._user_stream = stream
        self._lock = threading.Lock()
        self._reset_state()

    def _reset_state(self) -> None:
        self.engine: trt.ICudaEngine | None = None
        self.context: trt.IExecutionContext | None = None
        self._runtime: trt.Runtime | None = None
        self._stream: Any = None
        self._profile: int | None = None
        self._outputs: dict[tuple[str, tuple[int, ...]], Any] = {}
        self._graphs: dict[tuple, Any] = {}      # shape key -> (graph, static inputs, outputs)
        self._seen: set[tuple] = set()            # shape keys run once (warm-up before capture)
        self._dtypes: dict[str, Any] = {}
        self._input_names: list[str] = []
        self._output_names: list[str] = []

    # -- shapes ---------------------------------------------------------------
    def check_shape(self, batch: int, height: int, width: int) -> None:
        """The model's rule (H/W multiple), then: the shape must fall inside one of the engine's profiles."""
        self._profile_index(batch, height, width)

    def _profile_index(self, batch: int, height: int, width: int) -> int:
        """The index of the first profile covering the shape; ShapeError (as check_shape) if none does."""
        self.spec.check_shape(batch, height, width)
        index = find_profile(self.profiles, batch, height, width)
        if index is None:
            raise ShapeError(
                f"shape {format_shape((batch, height, width))} is outside this engine's optimization profiles "
                f"({describe_profiles(self.profiles)}); rebuild the engine with a profile that covers it"
            )
        return index

    # -- lifecycle ------------------------------------------------------------
    def _activate(self) -> None:
        what = f"running a {self.runtime.display} engine"
        gpu = require_gpu_runtime(self.runtime, what)
        try:
            import torch
        except ImportError as exc:  # torch is a core dependency, but say so clearly if it is absent
            raise MissingDependencyError(f"{what} needs {exc.name}: {self.runtime.install_hint}") from None
        if not torch.cuda.is_available():
            raise MissingDependencyError(f"{what} needs a CUDA build of PyTorch; this torch has no CUDA support")
        check_compatible(self.sidecar, str(trt.__version__), gpu.name, gpu.compute_capability, self.runtime.name)
        torch.cuda.set_device(self.device)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = self._runtime = trt.Runtime(logger)
        # engine_host_code_allowed stays False: only version-compatible plans (a lean runtime inside the plan)
        # carry host code, attn-export never builds them, and a plan is data, so none of its code is run.
        # The bindings return None when deserialization fails (their stubs say ICudaEngine).
        engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise UsageError(f"{self.runtime.display} could not load {self.path.name}; rebuild the engine with `attn-export trt`")
        self.engine = engine
        self.context = engine.create_execution_context()
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            self._dtypes[name] = getattr(torch, numpy_dtype(engine.get_tensor_dtype(name)).name)
            if is_input(engine, name):
                self._input_names.append(name)
            else:
                self._output_names.append(name)
        self._stream = self._user_stream if self._user_stream is not None else torch.cuda.Stream(device=self.device)

    def _deactivate(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.synchronize()
            # Graphs and buffers reference the context's memory: drop them first.
            self._graphs.clear()
            self._outputs.clear()
            self.context = None
            self.engine = None
            self._reset_state()

    def _context(self) -> trt.IExecutionContext:
        """The execution context of an active runner."""
        if self.context is None:
            raise UsageError("the TensorRT runner is not active; call activate() first")
        return self.context

    # -- inference ------------------------------------------------------------
    def _infer(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        if all(isinstance(v, torch.Tensor) and v.is_cuda for v in feeds.values()):
            return self._run(feeds)
        dev = torch.device("cuda", self.device)
        tensors = {k: torch.as_tensor(np.ascontiguousarray(v)).to(dev, non_blocking=False) for k, v in feeds.items()}
        outs = self._run(tensors)
        # .cpu() copies (and synchronizes), so callers never see reused buffers here.
        return {k: v.cpu().numpy() for k, v in outs.items()}

    def infer_torch(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Serving path: torch CUDA tensors in, torch CUDA tensors out (reused buffers; see class doc)."""
        if not self.is_active:
            self.activate()
        self.check_feeds(feeds)
        return self._run(feeds)

    def _output_buffer(self, name: str, shape: tuple[int, ...]) -> Any:
        import torch

        key = (name, shape)
        buf = self._outputs.get(key)
        if buf is None:
            # Keep only the latest shape per output: varying shapes must not grow memory without bound.
            for k in [k for k in self._outputs if k[0] == name]:
                del self._outputs[k]
            buf = torch.empty(shape, dtype=self._dtypes[name], device=torch.device("cuda", self.device))
            self._outputs[key] = buf
        return buf

    def _prepare(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Set shapes and addresses for one call; return the output tensors."""
        context = self._context()
        for name in self._input_names:
            t = inputs[name]
            if not context.set_input_shape(name, tuple(t.shape)):
                raise ShapeError(f"TensorRT refused shape {tuple(t.shape)} for input {name}")
            context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self._output_names:
            shape = tuple(dims_list(context.get_tensor_shape(name)))
            buf = self._output_buffer(name, shape)
            context.set_tensor_address(name, buf.data_ptr())
            outs[name] = buf
        return outs

    def _run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        x = feeds[self.spec.image_input.name]
        b, h, w = int(x.shape[0]), int(x.shape[2]), int(x.shape[3])
        profile = find_profile(self.profiles, b, h, w)
        if profile is None:
            profile = self._profile_index(b, h, w)  # raises with the profile ranges
        dev = torch.device("cuda", self.device)
        with self._lock:
            context = self._context()
            stream = self._stream
            caller = torch.cuda.current_stream(dev)
            if stream is not caller:
                stream.wait_stream(caller)  # inputs were produced on the caller's stream
            # Cast to the engine's I/O types (e.g. int64 timesteps) and make contiguous on our stream.
            with torch.cuda.stream(stream):
                inputs = {}
                for name in self._input_names:
                    t = feeds[name]
                    t = t.to(device=dev, dtype=self._dtypes[name]).contiguous()
                    if stream is not caller:
                        t.record_stream(stream)
                    inputs[name] = t
                if profile != self._profile:
                    context.set_optimization_profile_async(profile, stream.cuda_stream)
                    self._profile = profile
                    self._graphs.clear()  # captured graphs belong to the previous profile's setup
                key = (profile,) + tuple((n, tuple(inputs[n].shape)) for n in self._input_names)
                if self.use_cuda_graph and key in self._graphs:
                    graph, static_in, outs = self._graphs[key]
                    for n in self._input_names:
                        static_in[n].copy_(inputs[n])
                    graph.replay()
                elif self.use_cuda_graph and key in self._seen:
                    outs = self._capture(key, inputs, stream)
                else:
                    outs = self._prepare(inputs)
                    if not context.execute_async_v3(stream.cuda_stream):
                        raise EngineFailed("TensorRT execution failed (execute_async_v3 returned False)")
                    self._seen.add(key)
            if stream is not caller:
                caller.wait_stream(stream)  # results are ready for the caller's next op
        return dict(outs)

    def _capture(self, key: tuple, inputs: Mapping[str, Any], stream: Any) -> dict[str, Any]:
        """Capture one enqueue at this shape into a CUDA graph (after a warm-up call), then replay it."""
        import torch

        context = self._context()
        static_in = {n: t.clone() for n, t in inputs.items()}
        # Graph outputs must stay put: give them their own buffers, not the shared per-shape ones.
        outs = self._prepare(static_in)
        outs = {n: torch.empty_like(v) for n, v in outs.items()}
        for n, v in outs.items():
            context.set_tensor_address(n, v.data_ptr())
        # One plain run so TensorRT finishes any shape-dependent setup before capture.
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineFailed("TensorRT execution failed (execute_async_v3 returned False)")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            if not context.execute_async_v3(stream.cuda_stream):
                raise EngineFailed("TensorRT execution failed during CUDA graph capture")
        graph.replay()
        self._graphs[key] = (graph, static_in, outs)
        return outs
