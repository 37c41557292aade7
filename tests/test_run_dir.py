"""training/run_dir.py: one run per output folder (a lock that dies with its process), and the
leftovers of interrupted atomic writes removed, nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from training.run_dir import LOCK_NAME, RunDirError, clean_stale_temporaries, lock_run_dir

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")

HOLDER = """
import sys, time
from pathlib import Path
from training.run_dir import lock_run_dir
with lock_run_dir(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_lock_is_refused_until_the_first_ends(tmp_path):
    out = tmp_path / "run"  # created by the lock
    with lock_run_dir(out) as lock:
        assert lock == out / LOCK_NAME
        with pytest.raises(RunDirError) as info, lock_run_dir(out):
            pass
        assert f"{out} is in use by another training run (pid {os.getpid()}, started " in str(
            info.value)
    with lock_run_dir(out):  # released on exit
        pass
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]


def test_lock_held_by_another_process_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # blocks until the child holds it
        with (pytest.raises(RunDirError, match=rf"\(pid {holder.pid}, started "),
              lock_run_dir(tmp_path)):
            pass
        holder.send_signal(signal.SIGKILL)  # no cleanup code runs: the kernel drops the flock
        holder.wait(timeout=30)
        with lock_run_dir(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()


def test_clean_stale_temporaries_removes_only_leftovers(tmp_path):
    stale = [
        "checkpoints/.step-000004.k3j_x2",  # save_checkpoint's temp dir (with files inside)
        "checkpoints/.step-000002.old-a8b9c0",  # an existing step moved aside, mid-replace
        ".adapter.safetensors.q1w2e3.tmp",  # atomic_save_tensors' temp of the final adapter
        ".best.safetensors.r4t5y6.tmp",
        ".tmpAbC123",  # safetensors' own temp file, renamed over the one above when done
        "checkpoints/step-000002/.adapter.safetensors.u7i8o9.tmp",
        "exports/.peft_model.safetensors.p0a1s2.tmp",  # any atomic_save_tensors target
    ]
    kept = ["adapter.safetensors", "best.safetensors", "metrics.jsonl", LOCK_NAME,
            "checkpoints/step-000002/adapter.safetensors",
            "checkpoints/step-000002/train_state.pt", "notes.tmp", ".hidden", ".tmp",
            "checkpoints/.keep", "step.tmp"]
    for name in stale + kept:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.startswith("checkpoints/.step-"):
            path.mkdir()
            (path / "adapter.safetensors").write_bytes(b"x")
            (path / "train_state.pt").write_bytes(b"x")
        else:
            path.write_bytes(b"x")
    removed = clean_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(tmp_path / name for name in stale)
    left = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert left == set(kept)
    assert clean_stale_temporaries(tmp_path) == []
    assert clean_stale_temporaries(tmp_path / "missing") == []
