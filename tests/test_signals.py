"""training/signals.py: SIGTERM checkpoints like Ctrl-C; a second signal exits quietly.

The signals go to a small child process that runs train.py's pattern: a loop inside
graceful_interrupts(), an ``except KeyboardInterrupt`` that "writes a checkpoint" (sleeps)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from training.signals import graceful_interrupts

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

CHILD = """
import sys, time
from training.signals import graceful_interrupts
with graceful_interrupts() as interrupts:
    try:
        print("ready", flush=True)
        while True:
            time.sleep(0.01)
    except KeyboardInterrupt:
        print("checkpoint", flush=True)
        time.sleep(float(sys.argv[1]))  # the checkpoint write
        print("saved", flush=True)
        raise SystemExit(interrupts.exit_code) from None
"""


def _run(*signals: signal.Signals) -> tuple[int, str, str]:
    """Start the child, send ``signals[0]`` once it is ready and each next one once it is
    writing its checkpoint; returns (exit status, stdout, stderr). With a second signal the
    write takes 60 s, so it is still running when that signal lands on a loaded machine."""
    write_s = 60 if len(signals) > 1 else 0.5
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(write_s)], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(120, child.kill)  # a hung child fails the test, not the suite
    watchdog.start()
    try:
        lines = [child.stdout.readline()]  # waiting for a line, however loaded the machine
        for sig, ready in zip(signals, ("ready", "checkpoint"), strict=False):
            assert lines[-1] == f"{ready}\n", lines
            child.send_signal(sig)
            lines.append(child.stdout.readline())
        out, err = child.communicate(timeout=60)
    finally:
        watchdog.cancel()
        child.kill()
    return child.returncode, "".join(lines) + out, err


def test_sigterm_checkpoints_like_ctrl_c():
    code, out, err = _run(signal.SIGTERM)
    assert out.split() == ["ready", "checkpoint", "saved"]
    assert code == 143 and err == ""


def test_first_sigint_exits_130():
    code, out, _ = _run(signal.SIGINT)
    assert out.split() == ["ready", "checkpoint", "saved"] and code == 130


@pytest.mark.parametrize(("second", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_second_signal_exits_quietly(second, code):
    status, out, err = _run(signal.SIGINT, second)
    assert out.split() == ["ready", "checkpoint"]  # the write never finished
    assert status == code
    assert err == ("second interrupt: exiting without finishing the checkpoint; the previous "
                   "checkpoint is intact\n")


def test_handlers_restored_and_sigterm_raises_inside():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt), graceful_interrupts() as interrupts:
        signal.raise_signal(signal.SIGTERM)
    assert interrupts.signum == signal.SIGTERM and interrupts.exit_code == 143
    assert {s: signal.getsignal(s) for s in before} == before


def test_no_op_outside_the_main_thread():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def worker() -> None:
        with graceful_interrupts() as interrupts:  # signal.signal would raise ValueError here
            seen.append(interrupts.exit_code)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=30)
    assert seen == [130] and signal.getsignal(signal.SIGTERM) is before
