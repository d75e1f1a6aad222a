"""ONNX Runtime's serving form as an artifact: built once, described inside the file, never rebuilt from it.

The serving form (:func:`attn_export.graph.onnxruntime_serving_form`) runs
faster in ONNX Runtime than the file TensorRT reads, but uses ONNX Runtime's
contrib ops and CPU-tuned rewrites. Written by ``attn-export optimize --for
onnxruntime``, it records what was rewritten, for which provider and on what
CPU under the metadata key :data:`SERVING_KEY`; runners then run it as written,
and the engine path refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from ..errors import UsageError
from ..graph import onnxruntime_serving_form
from ..graph.serving import SERVING_ATTENTION, ServingForm
from ..host import cpu_info
from ..spec import ModelSpec
from .metadata import read_record, set_record
from .weights import EXTERNAL_DATA_THRESHOLD, external_bytes, has_external

SERVING_KEY = "attn_export.serving"
# --provider spelling -> ONNX Runtime's name. The form is built for one; it runs on the others, only slower.
SERVING_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# What the attention rewrite may add to a one-file model beyond its weights (its nodes and small constants).
_MARGIN = 2**24


@dataclass
class ServingChoice:
    """Which rewrites a serving form makes: its attention (a serving attention, or "none") and Winograd; with the
    measurements that chose them, when they were measured (``--tune``)."""

    attention: str
    winograd: bool
    tuning: dict[str, Any] | None = field(default=None)


def serving_description(model: onnx.ModelProto) -> dict[str, Any] | None:
    """What a serving-form file records about itself; None for any other file.

    Only read as data (counts and names); a malformed record is one line, exit 2.
    """
    if not any(p.key == SERVING_KEY for p in model.metadata_props):
        return None
    value = read_record(model, SERVING_KEY)
    if value is None or not isinstance(value.get("parts", []), list):
        raise UsageError(f"the {SERVING_KEY} record of this file is not a JSON object of the expected form")
    return value


def serving_room(path: Path, model: onnx.ModelProto, *, one_file: bool) -> int:
    """Bytes the transformed convolution weights may add.

    Weights kept in data files: twice their bytes (they are read into memory).
    ``one_file``: the result must also stay below 2 GB in one protobuf.
    Otherwise four times the weights, the most Winograd F(4x4, 3x3) can make of them.
    """
    room = (2 if has_external(model) else 4) * external_bytes(model)
    if one_file:
        # The file's size stands for the model's (ByteSize() costs seconds on a large model).
        room = min(room, EXTERNAL_DATA_THRESHOLD - path.stat().st_size - _MARGIN)
    return max(room, 0)


def build_serving_form(model: onnx.ModelProto, path: Path, spec: ModelSpec, *, provider: str = "CPUExecutionProvider",
                       attention: str = "auto", winograd: bool = True, with_arrays: bool = False,
                       one_file: bool = True) -> ServingForm:
    """Rewrite ``model`` (read from ``path``, weights possibly left in their data files) into its serving form.

    A file that already is a serving form is left alone. ``one_file``: the
    result must stay below 2 GB in one protobuf (a session from bytes, a Triton
    model); ``with_arrays``: the transformed weights stay out of the graph
    (see :func:`attn_export.graph.onnxruntime_serving_form`).
    """
    if attention not in SERVING_ATTENTION:
        raise UsageError(f"the serving attention must be one of {', '.join(SERVING_ATTENTION)} (got {attention!r})")
    if serving_description(model) is not None:
        return ServingForm()
    return onnxruntime_serving_form(model, provider=provider, hw_multiple=spec.hw_multiple, winograd=winograd,
                                    weights_folder=path.parent,
                                    max_added_bytes=serving_room(path, model, one_file=one_file),
                                    with_arrays=with_arrays, attention=attention)


def describe_serving_form(model: onnx.ModelProto, form: ServingForm, *, provider: str, attention: str,
                          source: Path, tuning: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record in ``model`` what its serving form holds, for which provider, tuned on which CPU; returns the record.

    ``tuning``: the measurements that chose the rewrites (``--tune``), recorded with them.
    """
    record = {"form": "onnxruntime", "provider": provider, "attention": attention, "parts": form.parts(),
              "attention_sites": form.attention_sites, "winograd_convolutions": form.winograd_convolutions,
              "source": source.name, "tuned_on": cpu_info(), **({"tuning": tuning} if tuning else {})}
    set_record(model, SERVING_KEY, record)
    return record


def refuse_serving_form(model: onnx.ModelProto, origin: str | Path, what: str) -> None:
    """UsageError when ``model`` is a serving form: ``what`` (FP16 conversion, an engine) takes its source file."""
    made = serving_description(model)
    if made is not None:
        source = made.get("source")
        raise UsageError(f"{origin} is ONNX Runtime's serving form (contrib ops, CPU-tuned rewrites); {what} takes "
                         f"the file it was made from{f' ({source})' if isinstance(source, str) else ''}")


def written_parts(graph: onnx.ModelProto) -> list[str]:
    """The file as written, in words, as reports say what ran: the serving form it holds, or its attention ops."""
    from collections import Counter

    made = serving_description(graph)
    if made is not None:
        return [f"the file as written: ONNX Runtime's serving form for {made.get('provider', '?')}",
                *[str(p) for p in made.get("parts", [])]]
    counts = Counter(n.op_type for n in graph.graph.node if n.op_type in ("Attention", "MultiHeadAttention", "Softmax"))
    named = {"Attention": "Attention op", "MultiHeadAttention": "MultiHeadAttention", "Softmax": "Softmax"}
    return ["the file as written"] + [f"{n} x {named[op]}" for op, n in sorted(counts.items())]
