"""Giving freed memory back to the operating system between the stages of a long command."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys


def release() -> None:
    """Collect garbage and return the C heap's free pages to the OS (glibc only; a no-op elsewhere).

    A finished stage (a PyTorch model, an ONNX Runtime session) frees its
    memory into the process heap, where the next stage's peak would be
    counted on top of it; trimming makes the process's peak the largest
    stage's, not their sum.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
