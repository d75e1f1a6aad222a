"""The console entry point (``attn-export``, ``python -m attn_export``).

Its first act is to catch SIGINT and SIGTERM: importing the command line
takes a moment, and a signal then must end the run with 130 or 143 and one
line, like a signal at any later point (nothing is written before the
command starts). :func:`attn_export.cli.main` then installs the handlers
that clean up what a command stages; once it has returned, a signal ends
the process at once with the same codes (the output is already complete).
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType


def _early(signum: int, frame: FrameType | None) -> None:
    sys.stderr.write("interrupted; no partial output was left behind\n")
    sys.exit(143 if signum == signal.SIGTERM else 130)


def _late(signum: int, frame: FrameType | None) -> None:
    # The command has ended (its output, if any, is in place) and the interpreter is on its way out.
    sys.stdout.flush()
    sys.stderr.write("interrupted as the command ended\n")
    sys.stderr.flush()
    os._exit(143 if signum == signal.SIGTERM else 130)


def main() -> None:
    """Run the command line, with the signals handled from the first instruction to the last."""
    # SIGINT first: a caught SIGTERM then means both are ours (tests read that from /proc before signalling).
    signal.signal(signal.SIGINT, _early)
    signal.signal(signal.SIGTERM, _early)
    from .cli import main as cli_main

    code = 0
    try:
        cli_main()
    except SystemExit as exc:
        if isinstance(exc.code, str):
            sys.stderr.write(exc.code + "\n")
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt as exc:
        # Raised after the command's own handling ended, as its exit unwound: the output, if any, is complete.
        sys.stderr.write("interrupted as the command ended\n")
        code = 143 if type(exc).__name__ == "Terminated" else 130
    finally:
        signal.signal(signal.SIGTERM, _late)
        signal.signal(signal.SIGINT, _late)
    # Interpreter shutdown restores the default handlers before it tears down torch and ONNX Runtime (a few
    # tenths of a second), so a signal then killed the process (exit -2) with no word: the command is done,
    # its files are closed and in place, so the process ends here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
