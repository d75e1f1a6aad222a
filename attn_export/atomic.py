"""Atomic file output: write next to the target, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import Terminated, UsageError

# Signals that arrived inside a critical section (a staging folder being made or removed, files being renamed
# into place): the handler records them here and the section raises on its way out, so the interruption lands
# before or after the section, never inside it. A per-thread signal mask would not do: Linux hands a process's
# signal to any thread that does not block it (ONNX Runtime's and the progress bar's threads among them).
_held = 0
_pending: list[int] = []


def defer_signal(signum: int) -> bool:
    """For the signal handler: True (and the signal kept for later) when a critical section is running."""
    if _held:
        _pending.append(signum)
        return True
    return False


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Run the block whole: SIGINT/SIGTERM arriving meanwhile are raised (as KeyboardInterrupt) when it ends."""
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending:
            terminated = signal.SIGTERM in _pending
            _pending.clear()
            raise Terminated() if terminated else KeyboardInterrupt()


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A hidden temporary folder next to ``target``, removed on the way out, whatever interrupts the block.

    Making the folder and taking charge of it happen in one critical section,
    and so does removing it: no signal can leave it behind.
    """
    out = Path(target)
    path: Path | None = None
    try:
        with signals_deferred():
            try:
                path = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
            except OSError as exc:
                raise UsageError(f"cannot write in {out.parent}: {exc.strerror or exc}") from None
        yield path
    finally:
        if path is not None:
            with signals_deferred():
                shutil.rmtree(path, ignore_errors=True)


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


def _temp_beside(target: Path, suffix: str = "") -> Path:
    """A new empty file next to ``target`` (hidden, ``.tmp``), with the permissions any new file gets."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    except OSError as exc:
        raise UsageError(f"cannot write in {target.parent}: {exc.strerror or exc}") from None
    os.close(fd)
    # mkstemp creates 0600; outputs should get the permissions any new file gets (0666 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over the target on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed,
    so an interrupted run never leaves a half-written output behind.
    """
    target = Path(path)
    tmp_path: Path | None = None
    try:
        with signals_deferred():  # made and owned in one step: no signal in between
            tmp_path = _temp_beside(target, suffix)
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        if tmp_path is not None:
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
    first; then the renames run as one critical section (:func:`signals_deferred`),
    so a signal lands before the first rename or after the last, never
    between: a reader sees the old pair or the new pair. On any failure
    before the renames, every temporary file is removed.
    """
    with contextlib.ExitStack() as stack:
        temps = []
        for path, data in outputs:
            target = Path(path)
            with signals_deferred():  # made and owned in one step: no signal in between
                tmp_path = _temp_beside(target)
                stack.callback(tmp_path.unlink, missing_ok=True)
            tmp_path.write_bytes(data)
            temps.append((tmp_path, target))
        with signals_deferred():
            for tmp_path, target in temps:
                os.replace(tmp_path, target)
