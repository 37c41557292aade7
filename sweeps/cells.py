"""One cell of a sweep: train.py in a child process, and the numbers its run folder holds.

A cell is finished when its marker (``sweep_cell.json``, the cell's results) exists: sweep.py
writes it last, after train.py exited 0 with its final adapter saved. A cell without the marker
is run again with ``--resume auto``: train.py continues from the newest checkpoint the
interrupted attempt left (or starts over if it left none). Peak memory is the child's peak
resident set size, read from the kernel when the child is reaped (wait4), so each cell is
measured alone; on a GPU it is host memory, not GPU memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from safetensors import safe_open

from evaluation.curves import read_metrics
from sweeps.grid import Cell, GridError
from training.checkpoint import ADAPTER
from training.metrics_log import is_step_record, read_records
from training.run_dir import LOCK_NAME

MARKER = "sweep_cell.json"


class CellFailed(RuntimeError):
    """train.py exited with an error; the message is its last log line."""


def finished_record(folder: Path, cell: Cell) -> dict[str, Any] | None:
    """The results of a finished cell, None if it has not finished; a cell finished with other
    train.py flags is a GridError (its folder would mix two settings)."""
    marker = folder / MARKER
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    if record["train_args"] != cell.train_args:
        then = " ".join(record["train_args"])
        raise GridError(f"{folder} holds a run with other train.py flags ({then}); choose "
                        "another --sweep-dir, or delete that folder to rerun it")
    return record


def run_cell(cell: Cell, folder: Path, log_path: Path, train_py: Path) -> dict[str, Any]:
    """Train the cell into ``folder`` (resuming an interrupted attempt), then write and return
    its results; CellFailed if train.py fails."""
    resumed = folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir())
    cmd = [sys.executable, str(train_py), *cell.train_args, "--output-dir", str(folder),
           *(["--resume", "auto"] if resumed else [])]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
        log.flush()
        code, wall_s, peak_rss = run_child(cmd, log, train_py.parent)
    if code != 0 or not (folder / ADAPTER).is_file():
        raise CellFailed(f"train.py exited {code}: {last_line(log_path)} (log: {log_path})")
    record = {"cell": cell.name, "settings": cell.settings, "train_args": cell.train_args,
              **results(folder), "wall_s": round(wall_s, 1),
              "peak_rss_mib": peak_rss and round(peak_rss, 1), "resumed": resumed}
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(folder / MARKER)  # atomic: a marker is complete or absent
    return record


def run_child(cmd: list[str], log, cwd: Path) -> tuple[int, float, float | None]:
    """(exit code, wall seconds, peak RSS in MiB or None) of ``cmd``, its output to ``log``.

    Ctrl-C reaches the child too (same process group): it checkpoints and exits, and we wait
    for that before letting the interrupt through."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        code, peak = reap(proc)
    except KeyboardInterrupt:
        reap(proc)
        raise
    return code, time.monotonic() - t0, peak


def reap(proc: subprocess.Popen) -> tuple[int, float | None]:
    """Wait for ``proc``; (exit code, its peak RSS in MiB) from wait4, where there is one."""
    if not hasattr(os, "wait4"):  # Windows: no resource usage of one child
        return proc.wait(), None
    while True:
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            break
        except InterruptedError:
            continue
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024
    return proc.returncode, usage.ru_maxrss * scale


def results(folder: Path) -> dict[str, Any]:
    """Exact match (adapter and base, from eval.json; the adapter's per split too), best
    validation loss, trainable parameters and training seconds of a finished run folder."""
    scores = json.loads((folder / "eval.json").read_text()) if (folder / "eval.json").is_file() \
        else {}
    val = [v for _, v in read_metrics(folder / "metrics.jsonl")["val_loss"]]
    return {"exact_match": scores.get("adapter", {}).get("all"),
            "base_exact_match": scores.get("base", {}).get("all"),
            "exact_match_by_split": scores.get("adapter", {}),  # the data's split field too
            "best_val_loss": min(val) if val else None,
            "trainable_params": trainable_params(folder / ADAPTER),
            "train_s": round(training_seconds(folder / "metrics.jsonl"), 1)}


def trainable_params(adapter: Path) -> int:
    """Elements of every tensor in the adapter file: exactly what training updated."""
    with safe_open(str(adapter), framework="pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def training_seconds(metrics: Path) -> float:
    """Seconds from the start of training to the last optimizer step, from metrics.jsonl.

    Each process stamps steps with the time since it started training, so a resumed run's
    stamps start again near 0: the sum of each stretch's last stamp counts every process that
    ran (minus the steps an interruption threw away, which are replayed)."""
    total, last = 0.0, 0.0
    for record in read_records(metrics):
        if not is_step_record(record):
            continue
        if record["time"] < last:  # a new process took over
            total += last
        last = record["time"]
    return total + last


def last_line(path: Path) -> str:
    """The last non-empty line of a log (train.py's one-line error), progress bars dropped."""
    text = path.read_text(errors="replace").replace("\r", "\n")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"
