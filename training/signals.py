"""SIGTERM handled like Ctrl-C, and a second signal that leaves quietly.

Schedulers (Slurm, Kubernetes) and torchrun stop a job with SIGTERM, which by default kills
Python without running any handler: the checkpoint an interrupted run writes on Ctrl-C was
lost. Inside ``graceful_interrupts()`` both signals raise one KeyboardInterrupt; a second signal
while that is handled (the checkpoint being written) exits at once with a one-line message.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SECOND = (b"second interrupt: exiting without finishing the checkpoint; the previous checkpoint "
          b"is intact\n")


@dataclass
class Interrupts:
    """What ``graceful_interrupts`` saw: the first signal received inside it, if any."""

    signum: int | None = None
    count: int = 0

    @property
    def exit_code(self) -> int:
        """The shell's status for that signal: 130 for SIGINT (and by default), 143 for SIGTERM."""
        return 128 + (self.signum or signal.SIGINT)


@contextlib.contextmanager
def graceful_interrupts() -> Iterator[Interrupts]:
    """Inside: SIGINT and SIGTERM raise KeyboardInterrupt once; the next one exits quietly.

    The first signal raises KeyboardInterrupt where the main thread is, so an ``except
    KeyboardInterrupt`` *inside the block* can write a checkpoint and exit with the yielded
    ``exit_code``. A second signal prints one line on stderr and raises SystemExit(128 +
    signum), which unwinds ``finally`` blocks (the temp checkpoint folder is removed) without a
    traceback; a third calls ``os._exit`` in case that unwinding hangs. The previous handlers
    are restored on exit. Outside the main thread, where Python cannot set handlers, a no-op.
    """
    interrupts = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield interrupts
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        interrupts.count += 1
        if interrupts.count == 1:
            interrupts.signum = signum
            raise KeyboardInterrupt
        if interrupts.count == 2:
            # os.write, not print: the signal may arrive while Python is inside a write to
            # sys.stderr (tqdm, logging), and re-entering that buffered stream raises.
            os.write(2, SECOND)
            raise SystemExit(128 + signum)
        os._exit(128 + signum)

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield interrupts
    finally:
        for s, handler in previous.items():
            # None: a handler installed outside Python, which cannot be put back; the default
            # is the closest.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
