"""The run folder's housekeeping: one training run at a time, and no leftovers of crashed writes.

``lock_run_dir`` holds an ``fcntl.flock`` on ``<out_dir>/.lock`` for the whole run. The kernel
drops a flock when its process dies, kill -9 included, so a crashed run never leaves a stale
lock behind (a pid file would). The lock file itself stays in the folder: deleting it on exit
would let a third run lock a new inode while a second still waits on the old one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs are not locked, everything else works
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
# Leftovers of atomic writes: checkpoint.save_checkpoint's temp dirs (".step-000120.k3j_x2",
# ".step-000120.old-..."), lora.adapter_file.atomic_save_tensors' temp files
# (".adapter.safetensors.k3j_x2.tmp", ".best.safetensors....tmp"), and the temp file
# safetensors' own writer renames into place (".tmp" + 6 characters, from Rust's tempfile).
STALE_STEP_DIR = re.compile(r"\.step-.+")
STALE_FILE = re.compile(r"\..+\.tmp|\.tmp[A-Za-z0-9]{6}")
log = logging.getLogger(__name__)


class RunDirError(Exception):
    """The output folder cannot be used for this run; the one-line message says why."""


@contextlib.contextmanager
def lock_run_dir(out_dir: Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``out_dir`` (created if needed) until the block ends.

    Raises RunDirError naming the holder's pid and start time if another live process holds
    it. Under torchrun only rank 0 takes it (the ranks of one run share the folder; a flock is
    per open file, so a second lock from any process, this one included, is refused). Yields
    the lock file's path. Not POSIX: a no-op with a warning.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    if fcntl is None:
        log.warning("no fcntl on this platform: %s is not locked against a second run", out_dir)
        yield path
        return
    # O_RDWR without O_TRUNC: the holder's pid must survive our open() for the message below.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
            raise RunDirError(f"{out_dir} is in use by another training run ({holder}); wait "
                              "for it to end or choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock; the file stays (see the module docstring)


def clean_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove what interrupted atomic writes left under ``out_dir``; returns the removed paths.

    Removes ``checkpoints/.step-*`` temp folders and every ``.<name>.tmp`` / ``.tmpXXXXXX``
    file at any depth. Nothing else is a temporary of ours: finished files are never dot-named.
    Call it only while holding ``lock_run_dir(out_dir)``, or it may delete a live run's writes.
    """
    out_dir = Path(out_dir)
    removed: list[Path] = []
    checkpoints = out_dir / "checkpoints"
    if checkpoints.is_dir():
        for path in sorted(checkpoints.iterdir()):
            if STALE_STEP_DIR.fullmatch(path.name):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
    for root, dirs, files in os.walk(out_dir):  # does not follow links out of the run
        dirs.sort()
        for name in sorted(files):
            if STALE_FILE.fullmatch(name):
                path = Path(root) / name
                path.unlink()
                removed.append(path)
    return removed
