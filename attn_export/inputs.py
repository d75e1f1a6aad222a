"""Model inputs as data: checked against a model's description, saved to and loaded from ``.npz`` files.

``verify --save-inputs`` / ``--load-inputs`` and ``--localize`` use them, so a
check can run on the user's real inputs. An inputs file is untrusted data:
it is read with ``allow_pickle=False`` and every header is checked first.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .compare import json_number
from .errors import ShapeError, UsageError
from .shapes import Shape
from .spec import DYNAMIC_DIMS, ModelSpec


def describe_inputs(feeds: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Shape, dtype and value range of each input (JSON-safe)."""
    out: dict[str, dict[str, Any]] = {}
    for name, a in feeds.items():
        a = np.asarray(a)
        entry: dict[str, Any] = {"shape": list(a.shape), "dtype": str(a.dtype)}
        if a.size and a.dtype != np.bool_:
            entry.update(min=json_number(float(a.min())), max=json_number(float(a.max())))
        out[name] = entry
    return out


def check_inputs(feeds: Mapping[str, Any], spec: ModelSpec, origin: str = "inputs") -> tuple[Shape, dict[str, np.ndarray]]:
    """The (batch, H, W) of ``feeds`` and the feeds as arrays, checked against the model's inputs.

    Names, dtypes (exactly the declared ones: a silent cast would run other
    data), ranks, static dims, the shape rules of the model and the named axes
    shared between inputs. UsageError with one line naming what is wrong.
    """
    want = [t.name for t in spec.inputs]
    missing = [n for n in want if n not in feeds]
    extra = sorted(set(feeds) - set(want))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)[:120]}"] if extra else [])
        raise UsageError(f"{origin}: {'; '.join(parts)} (the model takes {', '.join(want)})")
    arrays: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        a = feeds[t.name]
        if not isinstance(a, np.ndarray):
            raise UsageError(f"{origin}: input {t.name} is a {type(a).__name__}, not a numpy array")
        if a.dtype != np.dtype(t.dtype):
            raise UsageError(f"{origin}: input {t.name} is {a.dtype}; the model takes {t.dtype}")
        if a.ndim != len(t.dims):
            raise UsageError(f"{origin}: input {t.name} has rank {a.ndim} (shape {list(a.shape)}); the model takes rank "
                             f"{len(t.dims)} ({', '.join(map(str, t.dims))})")
        arrays[t.name] = a
    image = arrays[spec.image_input.name]
    if image.ndim != 4:
        raise UsageError(f"{origin}: input {spec.image_input.name} must be 4-D (B, C, H, W)")
    b, _, h, w = (int(d) for d in image.shape)
    try:
        spec.check_shape(b, h, w)
    except ShapeError as exc:
        raise UsageError(f"{origin}: {exc}") from None
    axes: dict[str, int] = {}
    for t in spec.inputs:
        for size, d in zip(arrays[t.name].shape, t.dims):
            if isinstance(d, str) and d not in DYNAMIC_DIMS:
                low, _, high = spec.axis_sizes.get(d, [1, 0, 1 << 62])
                if not low <= size <= high or axes.setdefault(d, int(size)) != size:
                    raise UsageError(f"{origin}: input {t.name}: axis {d} must be one size in {low}..{high} across the "
                                     f"inputs; got {size}")
    for t in spec.inputs:
        expected = t.shape_for(b, h, w, axes)
        if tuple(arrays[t.name].shape) != expected:
            raise UsageError(f"{origin}: input {t.name} has shape {list(arrays[t.name].shape)}; at {b}x{h}x{w} the model "
                             f"takes {list(expected)}")
    return (b, h, w), arrays


def save_inputs(path: str | Path, feeds: Mapping[str, np.ndarray], *, force: bool = False) -> Path:
    """Write ``feeds`` (input name -> array) to an uncompressed ``.npz`` file, atomically; returns the path.

    :func:`load_inputs` reads it back; ``numpy.load`` and Polygraphy-style
    tools read it too. An existing file is replaced only with ``force``.
    """
    from .atomic import atomic_path, check_output_path

    out = check_output_path(path, force=force)
    arrays: dict[str, np.ndarray] = {}
    for name, value in feeds.items():
        a = np.asarray(value)
        if a.dtype.hasobject:
            raise UsageError(f"input {name} holds Python objects; only numeric and boolean arrays are saved")
        arrays[str(name)] = a
    # Written member by member rather than with numpy.savez, whose own keywords (file, allow_pickle) would clash
    # with inputs of those names.
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w") as z:
        for name, a in arrays.items():
            with z.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, a, allow_pickle=False)
    return out


def _npz_headers(z: zipfile.ZipFile, origin: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each member's declared shape and dtype, read from its .npy header without reading its data, and checked
    against the member's size: a header is data too, and one that lies about its size could exhaust memory."""
    fmt = np.lib.format
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for info in z.infolist():
        if not info.filename.endswith(".npy"):
            raise UsageError(f"{origin}: member {info.filename[:60]!r} is not a .npy array; not an inputs file")
        name = info.filename[:-4]
        with z.open(info) as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(f)
            else:
                raise UsageError(f"{origin}: array {name[:60]} uses .npy format {version}; save it with numpy.savez")
            offset = f.tell()
        if dtype.hasobject:
            raise UsageError(f"{origin}: array {name[:60]} holds Python objects (pickled); refusing to load it")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
        if info.file_size != offset + nbytes:
            raise UsageError(f"{origin}: array {name[:60]} declares {nbytes} bytes of data but holds "
                             f"{info.file_size - offset}; the file is damaged")
        out[name] = (tuple(int(d) for d in shape), dtype)
    return out


def load_inputs(path: str | Path, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Read model inputs from an ``.npz`` file, checked against ``spec`` (names, dtypes, ranks, shapes).

    The file is data: it is opened with ``allow_pickle=False``, every array's
    header is checked (no Python objects, sizes as declared, names and dtypes
    the model's) before any data is read, and anything wrong is a UsageError
    with one line.
    """
    from .graph.memory import default_memory_limit

    p = Path(path)
    origin = str(p)
    if not p.is_file():
        raise UsageError(f"inputs file not found: {p}")
    if not zipfile.is_zipfile(p):
        raise UsageError(f"{origin} is not an .npz file (numpy.savez writes one)")
    try:
        with zipfile.ZipFile(p) as z:
            headers = _npz_headers(z, origin)
    except UsageError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError) as exc:
        raise UsageError(f"{origin} cannot be read as an .npz file ({first_line(exc)})") from None
    want = {t.name: t for t in spec.inputs}
    missing = [n for n in want if n not in headers]
    extra = sorted(set(headers) - set(want))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)[:120]}"] if extra else [])
        raise UsageError(f"{origin}: {'; '.join(parts)} (the model takes {', '.join(want)})")
    for name, (shape, dtype) in headers.items():
        t = want[name]
        if dtype != np.dtype(t.dtype):
            raise UsageError(f"{origin}: input {name} is {dtype}; the model takes {t.dtype}")
        if len(shape) != len(t.dims):
            raise UsageError(f"{origin}: input {name} has rank {len(shape)} (shape {list(shape)}); the model takes rank "
                             f"{len(t.dims)} ({', '.join(map(str, t.dims))})")
    total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in headers.values())
    if total > default_memory_limit() // 2:
        raise UsageError(f"{origin}: its arrays need {total >> 20} MiB, more than half the memory free here")
    try:
        with np.load(p, allow_pickle=False) as npz:
            feeds = {name: np.asarray(npz[name]) for name in want}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError) as exc:
        raise UsageError(f"{origin} cannot be read as an .npz file ({first_line(exc)})") from None
    check_inputs(feeds, spec, origin)
    return feeds


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:120] if text else type(exc).__name__)
