"""An engine rebuilt with intermediate tensors marked as outputs: how ``verify --localize`` looks inside an engine.

A built engine holds only its inputs and outputs; the tensors between them
exist only where TensorRT did not fuse them away. So, as Polygraphy's
``--trt-outputs mark all`` does, the ONNX file the engine was built from is
built again with the same settings (runtime, profiles, strongly typed,
optimization level, hardware compatibility or RTX targets, all read from
the engine's sidecar) and the requested tensors marked as network outputs.

Marking a tensor forces TensorRT to write it, so the marked engine fuses
less than the shipped one: a divergence it shows is a divergence of the same
kernels' precision, but a fused attention site, for one, runs as separate
layers there. The report says so. Tensors the network does not have (folded
constants, shape arithmetic) cannot be marked and are left out.

Building needs the runtime's module (TensorRT-RTX builds on a CPU); running
the marked engine needs a GPU, as any engine does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import EngineFailed
from . import runtime as runtimes
from .profiles import tensor_shapes
from .sidecar import sidecar_profiles, sidecar_runtime, sidecar_spec
from .trt_build import (BuildLog, _parse_network, make_logger, polygraphy_config, polygraphy_loader,
                        polygraphy_profiles, require_runtime)

if TYPE_CHECKING:  # typed as the real module; at run time `trt` forwards to the selected runtime's module
    import tensorrt as trt
else:
    from .runtime import trt


def mark_outputs(network: trt.INetworkDefinition, names: Sequence[str]) -> list[str]:
    """Mark each float tensor of ``network`` named in ``names`` as an output; the names marked, in layer order."""
    wanted = set(names)
    floats = {trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16}
    done = {network.get_output(i).name for i in range(network.num_outputs)}
    marked: list[str] = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            tensor = layer.get_output(j)
            if tensor.name in wanted and tensor.name not in done and tensor.dtype in floats:
                network.mark_output(tensor)
                done.add(tensor.name)
                marked.append(tensor.name)
    return marked


def build_marked(onnx_path: str | Path, sidecar: Mapping[str, Any], names: Sequence[str]) -> tuple[bytes, list[str]]:
    """The plan of ``onnx_path`` built as the sidecar's engine was, with ``names`` marked as outputs, and the
    names that could be marked. EngineFailed (exit 1) when the builder fails."""
    onnx_path = Path(onnx_path)
    data = dict(sidecar)
    rt = runtimes.get_runtime(sidecar_runtime(data))
    require_runtime(rt, "localizing an engine")
    spec = sidecar_spec(data)
    build = data.get("build") or {}
    caps = data.get("compute_capabilities") if rt is runtimes.RTX else None
    log = BuildLog()
    logger = make_logger(log)
    config = polygraphy_config(polygraphy_profiles([tensor_shapes(p, spec) for p in sidecar_profiles(data)]),
                               opt_level=int(build.get("builder_optimization_level", 3)),
                               hardware_compatibility=str(data.get("hardware_compatibility") or "none"),
                               verbosity="layer_names_only", workspace=build.get("workspace_bytes"), timing_cache=None,
                               monitor=None, compute_capabilities=caps)
    network = _parse_network(onnx_path, bool(build.get("strongly_typed", True)), logger)
    marked = mark_outputs(network[1], names)
    from polygraphy.logger import G_LOGGER

    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            plan = bytes(polygraphy_loader(network, config, None)())
    except Exception as exc:  # noqa: BLE001 - Polygraphy raises PolygraphyException on build failure
        said = log.errors[-1] if log.errors else (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise EngineFailed(f"{rt.display} could not build {onnx_path.name} with {len(marked)} tensors marked as "
                           f"outputs: {said}") from None
    return plan, marked
