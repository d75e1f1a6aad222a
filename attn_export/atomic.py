"""Atomic file output: write next to the target, then rename into place."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from .errors import UsageError


def check_output_path(path: str | os.PathLike[str], *, force: bool) -> Path:
    """Validate an output path before any expensive work starts."""
    out = Path(path)
    if not out.parent.exists():
        raise UsageError(f"output folder does not exist: {out.parent}")
    if out.is_dir():
        raise UsageError(f"output path is a folder: {out}")
    if out.exists() and not force:
        raise UsageError(f"output file exists: {out} (use --force to replace it)")
    try:
        # Asking the OS is the only sure test (root ignores permission bits; some filesystems refuse new files).
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write in {out.parent}: {exc.strerror or exc}") from None
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over the target on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed,
    so an interrupted run never leaves a half-written output behind.
    """
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    except OSError as exc:
        raise UsageError(f"cannot write in {target.parent}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; outputs should get the permissions any new file gets (0666 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def publish_together(outputs: list[tuple[str | os.PathLike[str], bytes]]) -> None:
    """Write several files that belong together (an engine and its sidecar) and put them in place as one step.

    Every file is written in full to a temporary name next to its target
    first; then the renames run with SIGINT and SIGTERM held back (on the main
    thread), so a signal lands before the first rename or after the last,
    never between: a reader sees the old pair or the new pair. On any failure
    before the renames, every temporary file is removed.
    """
    with contextlib.ExitStack() as stack:
        temps = []
        for path, data in outputs:
            target = Path(path)
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            except OSError as exc:
                raise UsageError(f"cannot write in {target.parent}: {exc.strerror or exc}") from None
            os.close(fd)
            tmp_path = Path(tmp)
            stack.callback(tmp_path.unlink, missing_ok=True)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
            tmp_path.write_bytes(data)
            temps.append((tmp_path, target))
        main = threading.current_thread() is threading.main_thread()
        held = {signal.SIGINT, signal.SIGTERM}
        if main:
            signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            for tmp_path, target in temps:
                os.replace(tmp_path, target)
        finally:
            if main:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
