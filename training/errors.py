"""User-facing failures of the command-line tools: one message, exit status 2, no traceback.

A ``RunError`` is a SystemExit, so it ends the program without a traceback when it reaches the
top; its message is printed once by ``exit_on_user_errors``. Library errors that describe bad
input (a data file, an adapter file, a checkpoint, a busy output folder) become RunErrors there.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

EXIT_USER_ERROR = 2
log = logging.getLogger(__name__)


class RunError(SystemExit):
    """Stop the run with ``message`` and exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_USER_ERROR)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _user_errors() -> tuple[type[BaseException], ...]:
    # Imported here: each module owns its error type, and this one must import cheaply.
    from data.formats import DataFormatError
    from lora import AdapterFileError
    from training.checkpoint import CheckpointError
    from training.run_dir import RunDirError

    return RunError, DataFormatError, AdapterFileError, CheckpointError, RunDirError


@contextlib.contextmanager
def exit_on_user_errors(prog: str) -> Iterator[None]:
    """Turn a user-facing error raised inside into one ``prog: error: ...`` line and exit 2."""
    try:
        yield
    except OSError as e:  # the machine's files: a full disk, a read-only or missing folder
        where = f": {e.filename}" if e.filename else ""
        message = f"{e.strerror or e}{where}"
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise RunError(message) from None
    except _user_errors() as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        raise RunError(str(e)) from None
