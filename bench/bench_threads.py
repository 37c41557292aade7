"""CPU thread settings of train.py on a quiet machine and next to one busy process.

Between parallel regions an idle OpenMP worker spin-waits (libgomp: 300,000 iterations). When
another process holds one of the cores, the spinning worker takes that core's time slices from
the thread that has real work: a 2-thread run next to one busy process slowed ~6x here. train.py
(and infer.py, eval.py) therefore (1) use one thread per core idle at start (--threads 0) and
(2) set GOMP_SPINCOUNT=10000 before torch loads OpenMP, for a process that starts later.

Each cell runs ``train.py --stop-after-steps N --eval-file none`` in a fresh process and reads
the training time of those N steps from its metrics.jsonl (model loading excluded). Columns:
quiet; a busy single-thread process running before train.py starts; one started 2 s after it
(when the threads are already chosen):

    python bench/bench_threads.py --steps 20 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> (environment additions, train.py flags). An empty variable is ignored by libgomp (its
# own default) and kept by the entry points' os.environ.setdefault.
TORCH_DEFAULTS = {"GOMP_SPINCOUNT": "", "OMP_WAIT_POLICY": ""}
SETTINGS = {
    "torch/OpenMP defaults, 2 threads": (TORCH_DEFAULTS, ["--threads", "2"]),
    "OMP_WAIT_POLICY=PASSIVE, 2 threads": ({**TORCH_DEFAULTS, "OMP_WAIT_POLICY": "PASSIVE"},
                                           ["--threads", "2"]),
    "1 thread": (TORCH_DEFAULTS, ["--threads", "1"]),
    "GOMP_SPINCOUNT=10000, 2 threads": ({}, ["--threads", "2"]),
    "train.py defaults (idle cores at start, spin 10000)": ({}, []),
}


def busy_process() -> subprocess.Popen:
    """One single-threaded process that keeps a core busy."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def train_seconds(env: dict[str, str], flags: list[str], steps: int, hog: str) -> float:
    """Seconds the N training steps took in a fresh train.py process; ``hog``: "none", or a
    busy process started "before" train.py or "after" it chose its threads (run_config.json
    is written after that, before the first step)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        busy = busy_process() if hog == "before" else None
        if busy:
            time.sleep(1.0)
        run = subprocess.Popen([sys.executable, "train.py", "--stop-after-steps", str(steps),
                                "--eval-file", "none", "--output-dir", str(out), *flags],
                               cwd=ROOT, env={**os.environ, **env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while hog == "after" and run.poll() is None and not (out / "run_config.json").exists():
                time.sleep(0.01)
            busy = busy or (busy_process() if hog == "after" else None)
            if run.wait() != 0:
                raise RuntimeError(f"train.py {flags} failed")
        finally:
            if busy:
                busy.kill()
                busy.wait()
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if "loss" in r][-1]["time"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=2, help="runs per cell (median reported)")
    args = p.parse_args()
    print(f"{os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.2f}")
    print("| setting | quiet (s) | busy process before (s) | × quiet | busy process after (s) "
          "| × quiet |\n|---|---:|---:|---:|---:|---:|")
    for name, (env, flags) in SETTINGS.items():
        quiet, before, after = (
            statistics.median(train_seconds(env, flags, args.steps, hog)
                              for _ in range(args.repeats))
            for hog in ("none", "before", "after"))
        print(f"| {name} | {quiet:.2f} | {before:.2f} | {before / quiet:.1f} | {after:.2f} | "
              f"{after / quiet:.1f} |", flush=True)


if __name__ == "__main__":
    main()
