"""The one progress callback every long-running library function accepts.

``progress(text, done, total)``: ``text`` says what runs now; ``done`` and
``total`` count steps when the function knows them (else None). Library code
never draws anything: the command line (or the caller) decides how to show it.
"""

from __future__ import annotations

from typing import Optional, Protocol


class ProgressFn(Protocol):
    """A progress callback: ``progress("audit: running at 1x32x32")`` or ``progress("verify 2x64x64", 3, 7)``."""

    def __call__(self, text: str, done: Optional[int] = None, total: Optional[int] = None, /) -> None: ...


def no_progress(text: str, done: Optional[int] = None, total: Optional[int] = None, /) -> None:
    """A progress callback that shows nothing."""
