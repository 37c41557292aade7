"""CPU thread choice: one thread per core idle at start."""

import os
import subprocess
import sys
import time

import pytest
import torch

from training import threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("idle", "expected"), [(2.0, 2), (1.9, 2), (1.1, 1), (0.2, 1),
                                                (None, 2), (8.0, 2)])
def test_threads_follow_the_idle_cores_up_to_torchs_default(monkeypatch, restore_threads,
                                                             idle, expected):
    torch.set_num_threads(2)  # torch's default on a 2-core machine
    monkeypatch.setattr(threads, "idle_cores", lambda: idle)
    assert threads.choose_threads(0) == expected == torch.get_num_threads()


def test_an_explicit_thread_count_is_used_as_given(monkeypatch, restore_threads):
    monkeypatch.setattr(threads, "idle_cores", lambda: pytest.fail("must not measure"))
    assert threads.choose_threads(3) == 3 == torch.get_num_threads()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/stat")
def test_a_busy_process_takes_a_core_from_the_idle_count():
    usable = len(os.sched_getaffinity(0))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        idle = threads.idle_cores(interval=0.5)
    finally:
        busy.kill()
        busy.wait()
    assert idle is not None and idle <= usable - 0.7
