"""How a command runs: library errors as one line and an exit code, signals, progress drawn on stderr.

Errors from the library (AttnExportError) become one line on stderr and the
error's exit code (2 for bad input, 1 for a failed check); no tracebacks
unless ATTN_EXPORT_DEBUG=1. SIGINT and SIGTERM end a command with 130 and
143: outputs are staged, so an interrupted command leaves none behind.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from . import render
from .atomic import defer_signal
from .errors import AttnExportError, OptionNeeded, Terminated
from .progress import ProgressFn
from .render import err_console


def _plain_help(option: Any) -> Any:
    """``--help`` read as the flag it is: typer draws it as ``--help <bool>``."""
    if option is not None and option.metavar is None:
        option.metavar = ""
    return option


class PathOrder(TyperGroup):
    """Commands listed in the order of the path (onnx, optimize, fp16, trt, verify, ...), not alphabetically."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)

    def get_help_option(self, ctx: Any) -> Any:
        return _plain_help(super().get_help_option(ctx))


class PlainHelpCommand(TyperCommand):
    """A command whose ``--help`` reads as a flag."""

    def get_help_option(self, ctx: Any) -> Any:
        return _plain_help(super().get_help_option(ctx))


def print_version(value: bool) -> None:
    """The eager --version flag."""
    if value:
        from .version import __version__

        render.console.print(f"attn-export {__version__}")
        raise typer.Exit()


def write_report(report: Optional[Path], data: dict[str, Any]) -> None:
    """The --report file, written atomically, and a line saying where."""
    if report is not None:
        from .atomic import write_text_atomic

        write_text_atomic(report, json.dumps(data, indent=2, default=str) + "\n")
        render.written("report written to", report)


def print_error(message: str, label: str = "error:") -> None:
    """One line on stderr; the message is plain text (a '[trt]' in it is not rich markup)."""
    from rich.text import Text

    err_console.print(Text.assemble((label, "bold red"), " ", message), highlight=False, soft_wrap=True)


# The command line as given (set by run_app), so a refusal for a missing option can print the command to run.
_ARGV: list[str] = []


def _command_to_run(exc: AttnExportError) -> str:
    if not isinstance(exc, OptionNeeded) or not _ARGV:
        return ""
    import shlex

    return f"; run: {shlex.join(['attn-export', *_ARGV, *exc.options])}"


def guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` with library errors, OS errors and interruptions turned into one line and an exit code."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
            _raise_if_signalled()  # one that landed during an import, after the last progress report
        except AttnExportError as exc:
            print_error(str(exc) + _command_to_run(exc))
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            # A file the OS refuses (full disk, permissions, a folder where a file was expected): the user's
            # environment, so exit 2. Partial outputs are temporary files, removed on the way out.
            where = f"{exc.filename}: " if exc.filename else ""
            print_error(f"{where}{exc.strerror or exc}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            err_console.print("interrupted; no partial output was left behind")
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None

    return run


# Signals received while a command runs. Native code (the TorchScript tracer among it) can swallow the
# exception a handler raises, so every progress report raises it again: the command stops at its next step,
# before anything is put in place.
_SIGNALS: list[int] = []


def _on_signal(signum: int, frame: Any) -> None:
    # defer_signal is imported with this module, before the handler is installed: importing it here could meet
    # attn_export.atomic half-initialized, when the signal lands while a command is importing it.
    _SIGNALS.append(signum)
    if defer_signal(signum):  # inside a critical section: raised when it ends
        return
    if _importing(frame):
        # An exception raised inside an import can cross a native module's initialisation (onnx's nanobind module
        # builds enums as it loads), which aborts the process ("terminate called"). The signal is raised at the
        # command's next progress report instead, or as the command returns.
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _importing(frame: Any) -> bool:
    """Whether the interrupted code runs inside an import (a module being initialised)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib."):
            return True
        frame = frame.f_back
    return False


def _raise_if_signalled() -> None:
    if _SIGNALS:
        raise Terminated() if signal.SIGTERM in _SIGNALS else KeyboardInterrupt()


def progress(kind: str = "spinner") -> Any:
    """A rich Progress on stderr (drawn only on a terminal) whose every update re-raises a swallowed signal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    class SignalAwareProgress(Progress):
        def update(self, *args: Any, **kwargs: Any) -> None:
            _raise_if_signalled()
            super().update(*args, **kwargs)

    text = TextColumn("[progress.description]{task.description}")
    columns = {"spinner": (SpinnerColumn(), text), "bar": (text, BarColumn(), MofNCompleteColumn()),
               "steps": (text, BarColumn(), TextColumn("{task.completed}/{task.total}"))}[kind]
    return SignalAwareProgress(*columns, TimeElapsedColumn(), console=err_console, transient=True,
                               disable=not err_console.is_terminal)


def reporter(prog: Any, prefix: str = "") -> ProgressFn:
    """The library's progress callback drawn as one task of a rich Progress (the library draws nothing)."""
    task = prog.add_task(prefix or "working", total=None)

    def report(text: str, done: Optional[int] = None, total: Optional[int] = None, /) -> None:
        prog.update(task, description=f"{prefix}{text}", completed=done, total=total)

    return report


def run_app(app: typer.Typer) -> None:
    """Run ``app`` with the signal handlers installed, keeping the one-line promise for anything unexpected."""
    # SIGTERM unwinds like Ctrl-C, so every temporary output is removed on the way out.
    # SIGINT is set too: a parent that ignores it (a CI runner, nohup) would pass that on to us.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    _ARGV[:] = sys.argv[1:]
    try:
        app()
    except AttnExportError as exc:
        print_error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        err_console.print("interrupted; no partial output was left behind")
        sys.exit(143 if isinstance(exc, Terminated) else 130)
    except Exception as exc:  # noqa: BLE001 - last resort: keep the one-line promise
        if os.environ.get("ATTN_EXPORT_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print_error(f"{type(exc).__name__}: {first} (set ATTN_EXPORT_DEBUG=1 for the traceback)", "internal error:")
        sys.exit(1)
