"""Errors that the CLI turns into a one-line message and an exit code."""

from __future__ import annotations


class AttnExportError(Exception):
    """A problem with the user's input or environment, shown as one line.

    ``exit_code`` follows the project convention: 2 for bad usage or input,
    1 for a check that ran and failed.
    """

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(AttnExportError):
    """Bad options, bad shapes, missing files: exit 2."""


class OptionNeeded(UsageError):
    """The command needs one more option; ``options`` are the words to add (the command line prints the whole command)."""

    def __init__(self, message: str, options: list[str]) -> None:
        super().__init__(message)
        self.options = list(options)

    def __reduce__(self) -> tuple[type, tuple[str, list[str]]]:  # crosses process boundaries (bench's children)
        return (type(self), (str(self), self.options))


class ProviderUnavailable(UsageError):
    """An execution device asked for by name (an ONNX Runtime provider, PyTorch on CUDA) that this machine cannot start."""


class CheckpointError(AttnExportError):
    """A checkpoint that cannot be read or does not fit the model."""


class ShapeError(AttnExportError):
    """A shape the model or artifact cannot serve."""


class MissingDependencyError(AttnExportError):
    """An optional dependency (TensorRT, a GPU, ...) is not available."""


class CheckFailed(AttnExportError):
    """A check that ran and failed (an export that disagrees with PyTorch, attention left unfused): exit 1."""

    exit_code = 1


class ExportFailed(CheckFailed):
    """No PyTorch exporter could export a model that runs in PyTorch: exit 1."""


class EngineFailed(CheckFailed):
    """TensorRT could not build or run an engine from valid input: exit 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that temporary outputs are cleaned up on the way out (exit 143)."""
