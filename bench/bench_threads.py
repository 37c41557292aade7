"""CPU thread settings of train.py on a quiet machine and next to one busy process.

OpenMP worker threads that finish a parallel region spin-wait for the next one. When another
process holds one of the cores, a spinning worker takes that core's time slices and the
thread that has real work waits for it: a 2-thread run next to one busy process slowed 5-10x
here. ``OMP_WAIT_POLICY=PASSIVE`` makes idle workers sleep instead; train.py, infer.py and
eval.py set it (unless it is set already) before torch loads its OpenMP runtime.

Each cell runs ``train.py --stop-after-steps N --eval-file none`` in a fresh process and reads
the training time of those N steps from its metrics.jsonl (model loading excluded):

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
# name -> (environment additions, extra train.py flags). An empty OMP_WAIT_POLICY is ignored by
# the OpenMP runtime (its own default policy) and kept by train.py's setdefault.
SETTINGS = {
    "OpenMP default policy, 2 threads": ({"OMP_WAIT_POLICY": ""}, ["--threads", "2"]),
    "PASSIVE (train.py default), 2 threads": ({}, ["--threads", "2"]),
    "1 thread": ({}, ["--threads", "1"]),
}


def train_seconds(env: dict[str, str], flags: list[str], steps: int) -> float:
    """Seconds the N training steps took in a fresh train.py process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        subprocess.run([sys.executable, "train.py", "--stop-after-steps", str(steps),
                        "--eval-file", "none", "--output-dir", str(out), *flags],
                       cwd=ROOT, env={**os.environ, **env}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if "loss" in r][-1]["time"]


def busy_process() -> subprocess.Popen:
    """One single-threaded process that keeps a core busy."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=2, help="runs per cell (median reported)")
    args = p.parse_args()
    print(f"{os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.2f}")
    print("| setting | quiet (s) | one busy process (s) | slowdown |\n|---|---:|---:|---:|")
    for name, (env, flags) in SETTINGS.items():
        quiet = statistics.median(train_seconds(env, flags, args.steps)
                                  for _ in range(args.repeats))
        hog = busy_process()
        try:
            time.sleep(0.5)
            busy = statistics.median(train_seconds(env, flags, args.steps)
                                     for _ in range(args.repeats))
        finally:
            hog.kill()
        print(f"| {name} | {quiet:.1f} | {busy:.1f} | {busy / quiet:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
