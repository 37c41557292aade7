"""User-facing failures of the command-line tools: one message, exit status 2, no traceback.

A ``RunError`` is a SystemExit, so it ends the program without a traceback when it reaches the
top; its message is printed once by ``exit_on_user_errors``. Library errors that describe bad
input (a data file, an adapter file, a checkpoint, a busy output folder) become RunErrors there.
With ``debug`` (the entry points' ``--debug``) the traceback is printed above that line.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
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
    from lora import AdapterConflictError, AdapterFileError
    from training.checkpoint import CheckpointError
    from training.run_dir import RunDirError

    return (RunError, DataFormatError, AdapterFileError, AdapterConflictError, CheckpointError,
            RunDirError)


def _stop(prog: str, message: str, error: BaseException, debug: bool) -> RunError:
    """Print ``prog: error: message`` (after the traceback when ``debug``); the RunError to
    raise."""
    if debug:
        # Errors re-raised as RunError ``from None`` hide their cause; a bug report needs it.
        error.__suppress_context__ = False
        traceback.print_exception(error, file=sys.stderr)
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return RunError(message)


@contextlib.contextmanager
def exit_on_user_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn a user-facing error raised inside into one ``prog: error: ...`` line and exit 2;
    ``debug`` prints its traceback first."""
    try:
        yield
    except OSError as e:  # the machine's files: a full disk, a read-only or missing folder
        where = f": {e.filename}" if e.filename else ""
        raise _stop(prog, f"{e.strerror or e}{where}", e, debug) from None
    except _user_errors() as e:
        raise _stop(prog, str(e), e, debug) from None
