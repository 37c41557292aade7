"""CPU threads: as many as there are idle cores when the program starts.

Two OpenMP threads on a 2-core machine next to one busy process ran train.py 5-6x slower than
on a quiet machine (bench/bench_threads.py): between parallel regions an idle OpenMP worker
spin-waits, taking the busy core's time slices from the thread that has work. One thread per
idle core avoids that; a short spin (GOMP_SPINCOUNT, set by the entry points before torch loads
OpenMP) bounds the cost when the other process starts after this one has chosen.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
# train.py, infer.py and eval.py set GOMP_SPINCOUNT=10000 before importing torch: OpenMP workers
# then spin 10,000 iterations (libgomp's default: 300,000) before sleeping. Measured on 2 cores,
# 20 steps of the demo: +3% on a quiet machine; next to a busy process that started after the
# threads were chosen, 2.9x instead of 5.6x slower.


def _cpu_times() -> tuple[float, float, int] | None:
    """(idle, total) jiffies summed over the machine's CPUs, and how many CPUs /proc/stat lists;
    None where there is no /proc/stat."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    values = [float(x) for x in lines[0].split()[1:]]  # the "cpu" line: all CPUs summed
    n_cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return values[3] + values[4], sum(values), n_cpus  # idle + iowait


def idle_cores(interval: float = 0.2) -> float | None:
    """How many of this process's usable cores sat idle over the next ``interval`` seconds
    (None: cannot tell)."""
    first = _cpu_times()
    time.sleep(interval)
    second = _cpu_times()
    if first is None or second is None or second[1] <= first[1]:
        return None
    idle_share = (second[0] - first[0]) / (second[1] - first[1])
    return min(idle_share * second[2], _usable_cpus())


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def choose_threads(requested: int) -> int:
    """Set torch's CPU threads: ``requested`` if positive, else one per core idle at start (at
    most torch's default, at least 1). Returns the number set."""
    if requested > 0:
        torch.set_num_threads(requested)
        return requested
    default = torch.get_num_threads()
    idle = idle_cores()
    if idle is None:
        return default
    threads = max(1, min(default, math.floor(idle + 0.3)))  # 0.3: background noise is idle
    torch.set_num_threads(threads)
    if threads < default:
        log.info("using %d CPU thread(s): %.1f of %d cores idle at start (--threads N to choose)",
                 threads, idle, _usable_cpus())
    return threads
