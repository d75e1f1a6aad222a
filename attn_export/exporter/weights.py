"""Weights kept out of the in-memory graph: written once to an external data file, streamed back when needed.

An export holds the weights in PyTorch and nowhere else: the traced graph
carries none (:func:`attach_external`), every graph pass works on the
weightless graph, and the bytes move from the data file to the final file
one tensor at a time (:func:`compact_external`, :func:`write_inline`). Peak
memory stays near the model's own size instead of several copies of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Collection, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..atomic import signals_deferred, staging_dir
from ..graph.index import external_info, read_external

# From this many initializer bytes on, a model is written as NAME.onnx + NAME.onnx.data: one protobuf cannot exceed
# 2 GiB, and the graph itself needs room under that limit.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
# Tensors up to this many elements stay inside the graph: scales, shapes and small biases that graph passes
# read (the onnxscript constant folder reads inputs up to 8192 elements), at a few KiB each.
INLINE_MAX_ELEMENTS = 8192
_CHUNK = 64 << 20


def _set_external(init: TensorProto, location: str, offset: int, length: int) -> None:
    del init.external_data[:]
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value



def attach_external(model: onnx.ModelProto, params: Mapping[str, Any], data_path: Path) -> int:
    """Turn the graph inputs named in ``params`` (torch tensors) into initializers; returns the bytes written.

    Large tensors are written to ``data_path`` (referenced by its file name,
    relative to the model's folder) straight from the tensor's memory; small
    ones become ordinary initializers.
    """
    g = model.graph
    keep_inputs = [vi for vi in g.input if vi.name not in params]
    written = 0
    with open(data_path, "ab") as f:
        written = f.tell()
        start = written
        for vi in g.input:
            if vi.name not in params:
                continue
            arr = params[vi.name].detach().cpu().contiguous().numpy()
            if arr.size <= INLINE_MAX_ELEMENTS:
                g.initializer.append(numpy_helper.from_array(arr, vi.name))
                continue
            init = g.initializer.add()
            init.name = vi.name
            init.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
            init.dims.extend(arr.shape)
            # raw_data is little-endian by the ONNX spec; numpy's native order on the platforms torch ships for.
            # .data: the array's buffer as a memoryview (numpy's stubs do not declare ndarray a Buffer).
            f.write(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).data.cast("B"))
            _set_external(init, data_path.name, written, arr.nbytes)
            written += arr.nbytes
        written -= start
    del g.input[:]
    g.input.extend(keep_inputs)
    return written


def is_large(init: TensorProto) -> bool:
    """True for tensors kept in a data file while a model is being worked on (see INLINE_MAX_ELEMENTS)."""
    return int(np.prod(init.dims, dtype=np.int64)) > INLINE_MAX_ELEMENTS


def detach_inline(model: onnx.ModelProto, data_path: Path) -> None:
    """Move the large inline initializers of ``model`` to ``data_path``, one at a time (each freed once written)."""
    with open(data_path, "ab") as f:
        for init in model.graph.initializer:
            if init.data_location == TensorProto.EXTERNAL or not is_large(init):
                continue
            if not init.HasField("raw_data"):
                continue  # typed fields (float_data, ...): rare for weights, left inline
            offset = f.tell()
            f.write(init.raw_data)
            length = len(init.raw_data)
            init.ClearField("raw_data")
            _set_external(init, data_path.name, offset, length)


def stage_weights(model: onnx.ModelProto, source_folder: Path, data_path: Path) -> onnx.ModelProto:
    """A weightless copy of ``model``: every large tensor, inline or in the source's data files, goes to ``data_path``.

    External references are read relative to ``source_folder`` (the input
    file's folder; their locations were checked when it was loaded). The
    returned model is parsed afresh from the weightless graph, so the caller
    can drop ``model`` and with it the memory its weights were parsed into.
    """
    files: dict[str, BinaryIO] = {}
    try:
        with open(data_path, "ab") as dst:
            for init in model.graph.initializer:
                if not is_large(init) and init.data_location != TensorProto.EXTERNAL:
                    continue
                offset = dst.tell()
                if init.data_location == TensorProto.EXTERNAL:
                    loc, start, length = external_info(init)
                    src = files.get(loc) or files.setdefault(loc, open(source_folder / loc, "rb"))
                    _copy_range(src, dst, start, length)
                elif init.HasField("raw_data"):
                    length = len(init.raw_data)
                    dst.write(init.raw_data)
                    init.ClearField("raw_data")
                else:
                    continue  # typed fields (float_data, ...): rare for weights, left inline
                _set_external(init, data_path.name, offset, length)
    finally:
        for fh in files.values():
            fh.close()
    return onnx.load_model_from_string(model.SerializeToString())


def has_external(model: onnx.ModelProto) -> bool:
    """True when some initializer keeps its bytes in a data file."""
    return any(i.data_location == TensorProto.EXTERNAL for i in model.graph.initializer)


def read_array(init: TensorProto, folder: Path | None) -> np.ndarray:
    """The values of one initializer, from its data file in ``folder`` when it is external."""
    if init.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(init)
    if folder is None:
        raise ValueError(f"initializer {init.name} is external and no folder was given")
    return read_external(init, folder)


class DataWriter:
    """Appends new tensors to one data file; small ones stay inline. Use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None

    def __enter__(self) -> "DataWriter":
        self._file = open(self.path, "ab")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def tensor(self, array: np.ndarray, name: str) -> TensorProto:
        """``array`` as an initializer named ``name``: external in the data file when large."""
        if array.size <= INLINE_MAX_ELEMENTS or self._file is None:
            return numpy_helper.from_array(array, name)
        init = TensorProto()
        init.name = name
        init.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        init.dims.extend(array.shape)
        offset = self._file.tell()
        self._file.write(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).data.cast("B"))
        _set_external(init, self.path.name, offset, array.nbytes)
        return init


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer, external or inline."""
    total = 0
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            total += external_info(init)[2]
        elif init.HasField("raw_data"):
            total += len(init.raw_data)
        else:
            total += int(np.prod(init.dims)) * 4
    return total


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, length: int) -> None:
    src.seek(offset)
    while length > 0:
        block = src.read(min(_CHUNK, length))
        if not block:
            raise OSError("external data file is shorter than its references")
        dst.write(block)
        length -= len(block)


def compact_external(model: onnx.ModelProto, folder: Path, location: str | Collection[str] | None, new_location: str,
                     move_inline_over: int | None = None) -> None:
    """Copy only the tensors the graph still uses, in graph order, from their data files to ``new_location``.

    Graph passes drop initializers (folded, deduplicated, rewritten away);
    their bytes would otherwise stay in the data file. ``location``: the data
    file (or files) every reference must name (None: any file in ``folder``).
    ``move_inline_over``: inline tensors with more raw bytes than this move
    to the data file too.
    """
    allowed = {location} if isinstance(location, str) else (set(location) if location is not None else None)
    files: dict[str, BinaryIO] = {}
    with open(folder / new_location, "wb") as dst:
        for init in model.graph.initializer:
            if init.data_location != TensorProto.EXTERNAL:
                if move_inline_over is not None and init.HasField("raw_data") and len(init.raw_data) > move_inline_over:
                    start = dst.tell()
                    dst.write(init.raw_data)
                    length = len(init.raw_data)
                    init.ClearField("raw_data")
                    _set_external(init, new_location, start, length)
                continue
            loc, offset, length = external_info(init)
            if allowed is not None and loc not in allowed:
                raise ValueError(f"initializer {init.name} refers to {loc}, not {' or '.join(sorted(allowed))}")
            if loc == new_location:
                raise ValueError(f"initializer {init.name} already refers to {new_location}")
            src = files.get(loc) or files.setdefault(loc, open(folder / loc, "rb"))
            start = dst.tell()
            _copy_range(src, dst, offset, length)
            _set_external(init, new_location, start, length)
        dst.flush()
        os.fsync(dst.fileno())
    for fh in files.values():
        fh.close()


def write_inline(model: onnx.ModelProto, folder: Path, out: Path) -> None:
    """Write ``model`` as one self-contained file, its external tensors read from ``folder`` one at a time.

    A protobuf parser merges repeated occurrences of a message field, so the
    file is the model without initializers followed by one
    ``ModelProto{graph{initializer}}`` record per initializer, in order:
    parsed, it is exactly the model with its weights inline, and no copy of
    all the weights (nor the serialized whole) is ever held in memory.
    """
    # The model is weightless here (large tensors are external), so copying it costs little.
    head = onnx.ModelProto()
    head.CopyFrom(model)
    del head.graph.initializer[:]
    header = head.SerializeToString()
    del head
    files: dict[str, BinaryIO] = {}
    try:
        with open(out, "wb") as f:
            f.write(header)
            for init in model.graph.initializer:
                rec = onnx.ModelProto()
                t = rec.graph.initializer.add()
                if init.data_location == TensorProto.EXTERNAL:
                    loc, offset, length = external_info(init)
                    src = files.get(loc) or files.setdefault(loc, open(folder / loc, "rb"))
                    src.seek(offset)
                    t.CopyFrom(init)
                    t.ClearField("external_data")
                    t.ClearField("data_location")
                    t.raw_data = src.read(length)
                else:
                    t.CopyFrom(init)
                f.write(rec.SerializeToString())
                del rec
            f.flush()
            os.fsync(f.fileno())
    finally:
        for fh in files.values():
            fh.close()


def publish(staged: Path, out: Path, data: Path | None) -> None:
    """Move a checked model into place: the data file first, so the model never points at a missing file."""
    umask = os.umask(0)
    os.umask(umask)
    for p in (staged, data):
        if p is not None:
            os.chmod(p, 0o666 & ~umask)
    # One critical section: a signal lands before the first rename or after the last, never between.
    with signals_deferred():
        if data is not None:
            os.replace(data, out.parent / data.name)
        os.replace(staged, out)


def write_model(model: onnx.ModelProto, out: Path, *, external: bool,
                check: Callable[[Path], None] | None = None) -> Path | None:
    """The one write transaction of an ONNX artifact: stage next to ``out``, check, publish; returns its data file.

    The model is saved in a hidden folder beside ``out`` (its weights in
    ``<out>.data`` when ``external``), passed through the ONNX checker (the
    path form, which reads external data itself: no 2 GB limit) and through
    ``check`` (given the staged path; it raises to stop), and only then moved
    into place by :func:`publish`. Whatever interrupts it, nothing is left.
    """
    data_name = out.name + ".data"
    with staging_dir(out) as stage:
        staged = stage / out.name
        if external:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        onnx.checker.check_model(str(staged), full_check=False)
        if check is not None:
            check(staged)
        publish(staged, out, stage / data_name if external else None)
    return out.parent / data_name if external else None


def save_staged(model: onnx.ModelProto, stage: Path, out_name: str, data_name: str, working: Sequence[str],
                threshold: int) -> tuple[Path, bool]:
    """Write the finished graph as ``stage/out_name``; returns its path and whether the output keeps a data file.

    The tensors the graph uses move, in graph order, from the ``working`` data
    files of the stage to ``data_name`` (the output's data file name), and the
    working files are removed. An output whose weights reach ``threshold``
    keeps only tensors up to 1 KiB inside the .onnx, as onnx.save_model does.
    """
    external = external_bytes(model) >= threshold
    compact_external(model, stage, working, data_name, move_inline_over=1024 if external else None)
    for name in working:
        (stage / name).unlink()
    staged = stage / out_name
    onnx.save_model(model, str(staged))
    return staged, external


def publish_staged(model: onnx.ModelProto, stage: Path, staged: Path, out: Path, data_name: str,
                   external: bool) -> Path | None:
    """Put a checked, staged model in place at ``out``; returns its data file, or None when it is one file.

    Not ``external``: the weights go back inside the .onnx, streamed one tensor at a time (see
    :func:`write_inline`), and the staged data file is removed. Otherwise ``data_name`` moves next to
    ``out`` first, then the model.
    """
    if not external:
        inline = stage / f"inline.{out.name}"
        write_inline(model, stage, inline)
        os.replace(inline, staged)
        (stage / data_name).unlink()
    publish(staged, out, stage / data_name if external else None)
    return out.parent / data_name if external else None
