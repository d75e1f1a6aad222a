"""Schema checks for descriptions read from artifacts (ONNX metadata, engine sidecars).

An artifact may come from anywhere, so its embedded JSON is validated before
any field is used: known keys only, the right types, values in range. A
failure is one :class:`UsageError` line naming the field and what is wrong
(exit 2), never a traceback from deep inside a command.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

from .errors import UsageError

# Generous bounds: far above any real UNet, low enough that nothing downstream overflows or allocates absurdly.
MAX_DIM = 1 << 20
MAX_TENSORS = 64
MAX_RANK = 8
MAX_TEXT = 4096
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
NAME_RE = re.compile(r"^[^\x00-\x1f]{1,256}$")
SYMBOL_RE = re.compile(r"^[A-Za-z_?][A-Za-z0-9_?]{0,63}$")
FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

Check = Callable[[Any, str], None]


class SchemaError(UsageError):
    """An artifact's description breaks its schema (exit 2)."""


def fail(where: str, what: str) -> None:
    """Raise the one-line schema error for field ``where``."""
    raise SchemaError(f"{where}: {what}")


def integer(low: int, high: int) -> Check:
    """An int (not a bool) in [low, high]."""
    def check(v: Any, where: str) -> None:
        if isinstance(v, bool) or not isinstance(v, int):
            fail(where, f"must be an integer (got {type(v).__name__})")
        if not low <= v <= high:
            fail(where, f"must be in {low}..{high} (got {v})")
    return check


def number(v: Any, where: str) -> None:
    """A finite int or float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        fail(where, f"must be a finite number (got {v!r:.40})")


def text(pattern: re.Pattern[str] | None = None, choices: tuple[str, ...] | None = None) -> Check:
    """A string of at most MAX_TEXT characters, matching ``pattern`` or one of ``choices``."""
    def check(v: Any, where: str) -> None:
        if not isinstance(v, str):
            fail(where, f"must be a string (got {type(v).__name__})")
        if len(v) > MAX_TEXT:
            fail(where, f"is {len(v)} characters long (at most {MAX_TEXT})")
        if choices is not None and v not in choices:
            fail(where, f"must be one of {', '.join(choices)} (got {v[:40]!r})")
        if pattern is not None and not pattern.match(v):
            fail(where, f"has an unexpected form ({v[:40]!r})")
    return check


def optional(inner: Check) -> Check:
    """``None`` or what ``inner`` accepts."""
    def check(v: Any, where: str) -> None:
        if v is not None:
            inner(v, where)
    return check


def boolean(v: Any, where: str) -> None:
    """True or False."""
    if not isinstance(v, bool):
        fail(where, f"must be true or false (got {type(v).__name__})")


def items(inner: Check, low: int = 0, high: int = MAX_TENSORS) -> Check:
    """A list of ``low``..``high`` entries, each checked by ``inner``."""
    def check(v: Any, where: str) -> None:
        if not isinstance(v, list):
            fail(where, f"must be a list (got {type(v).__name__})")
        if not low <= len(v) <= high:
            fail(where, f"must have {low}..{high} entries (got {len(v)})")
        for i, entry in enumerate(v):
            inner(entry, f"{where}[{i}]")
    return check


def json_value(v: Any, where: str, depth: int = 0) -> None:
    """Plain JSON data of bounded depth (for free-form fields such as model keyword arguments)."""
    if depth > 8:
        fail(where, "is nested too deeply")
    if v is None or isinstance(v, (bool, str)):
        if isinstance(v, str) and len(v) > MAX_TEXT:
            fail(where, "holds a string that is too long")
        return
    if isinstance(v, (int, float)):
        number(v, where)
    elif isinstance(v, list):
        for i, e in enumerate(v[:10_000]):
            json_value(e, f"{where}[{i}]", depth + 1)
        if len(v) > 10_000:
            fail(where, "holds a list that is too long")
    elif isinstance(v, dict):
        for k, e in v.items():
            json_value(e, f"{where}.{k}", depth + 1)
    else:
        fail(where, f"holds a {type(v).__name__}")


def all_of(*checks: Check) -> Check:
    """Every one of ``checks``, in order (the first failure raises)."""
    def check(v: Any, where: str) -> None:
        for c in checks:
            c(v, where)
    return check


def record(fields: Mapping[str, Check], required: tuple[str, ...] = (), *, open_keys: bool = False) -> Check:
    """A JSON object with the given fields; unknown keys are refused unless ``open_keys``."""
    def check(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            fail(where, f"must be a JSON object (got {type(v).__name__})")
        missing = [k for k in required if k not in v]
        if missing:
            fail(where, f"lacks {', '.join(missing)}")
        unknown = sorted(str(k)[:40] for k in v if k not in fields)
        if unknown and not open_keys:
            fail(where, f"has unknown keys {', '.join(unknown[:5])}")
        for key, sub in fields.items():
            if key in v:
                sub(v[key], f"{where}.{key}")
    return check


def input_dim(v: Any, where: str) -> None:
    """A model input dim: a positive size or a symbol (batch, height, width, or an axis with axis_sizes)."""
    if isinstance(v, str):
        text(SYMBOL_RE)(v, where)
    else:
        integer(1, MAX_DIM)(v, where)


def axis_range(v: Any, where: str) -> None:
    """[min, opt, max] sizes of a named axis, min <= opt <= max."""
    items(integer(1, MAX_DIM), 3, 3)(v, where)
    if not v[0] <= v[1] <= v[2]:
        fail(where, f"must be [min, opt, max] with min <= opt <= max (got {v})")


def output_dim(v: Any, where: str) -> None:
    """A model output dim: a size, a symbol, or '?' (informative only)."""
    if isinstance(v, str):
        text(SYMBOL_RE)(v, where)
    else:
        integer(0, MAX_DIM)(v, where)


def tensor(dim: Check) -> Check:
    """One TensorSpec."""
    return record({"name": text(NAME_RE), "dtype": text(choices=DTYPES), "dims": items(dim, 0, MAX_RANK)},
                  ("name", "dtype", "dims"))


def value_range(v: Any, where: str) -> None:
    """[low, high] with low <= high, both finite."""
    items(number, 2, 2)(v, where)
    if v[0] > v[1]:
        fail(where, f"low {v[0]} is above high {v[1]}")


def mapping(value: Check) -> Check:
    """A JSON object with string keys and checked values."""
    def check(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            fail(where, f"must be a JSON object (got {type(v).__name__})")
        if len(v) > MAX_TENSORS:
            fail(where, f"has {len(v)} entries (at most {MAX_TENSORS})")
        for k, e in v.items():
            text(NAME_RE)(k, f"{where} key")
            value(e, f"{where}.{k}")
    return check


SEED = integer(-(1 << 63), (1 << 64) - 1)
SOURCE = record({
    "kind": text(choices=("preset", "config", "import", "onnx")),
    "preset": text(re.compile(r"^[\w.-]{1,64}$")),
    "seed": SEED,
    # The UNet config's own validation runs when a model is built from it; here: plain JSON data only.
    "config": all_of(record({}, open_keys=True), json_value),
    "model": text(FACTORY_RE),
    "model_kwargs": all_of(record({}, open_keys=True), json_value),
    "num_classes": optional(integer(1, 1_000_000)),
    "hw_multiple": optional(integer(1, 4096)),
    "static_hw": optional(items(integer(1, MAX_DIM), 2, 2)),
    "extra_inputs": items(tensor(input_dim), 0, 16),
    "extra_axes": mapping(axis_range),
    "origin": text(),
})
CHECKPOINT = record({
    "path": optional(text()), "sha256": optional(text(SHA256_RE)), "key": optional(text()),
    "layout": optional(text()),
})


def model_spec(max_format: int) -> Check:
    """The schema of a ModelSpec dict (``attn_export.spec``)."""
    def export_shape(v: Any, where: str) -> None:
        items(integer(1, MAX_DIM), 0, 3)(v, where)
        if len(v) not in (0, 3):
            fail(where, "must be [] or [batch, height, width]")

    return record({
        "format": integer(1, max_format),
        "inputs": items(tensor(input_dim), 1),
        "outputs": items(tensor(output_dim), 1),
        "hw_multiple": integer(1, 4096),
        "min_deep_positions": integer(1, MAX_DIM),
        "num_timesteps": integer(1, 10_000_000),
        "num_classes": optional(integer(1, 1_000_000)),
        "source": SOURCE,
        "checkpoint": optional(CHECKPOINT),
        "attention": text(choices=("op", "decomposed")),
        "opset": integer(1, 1000),
        "precision": text(choices=("fp32", "fp16")),
        "export_shape": export_shape,
        "tool_version": text(),
        "exporter": text(choices=("", "torchscript", "dynamo")),
        "input_ranges": mapping(value_range),
        "axis_sizes": mapping(axis_range),
    }, ("inputs", "outputs", "hw_multiple"))
