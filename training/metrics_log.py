"""metrics.jsonl: one JSON record per optimizer step and one per finished epoch, crash-safe.

Step records hold ``loss`` (null for a window skipped for having no target tokens), ``lr``,
``grad_norm`` and ``time``; epoch records hold ``epoch`` and, with a validation split,
``val_loss`` and the --select-best metric (``val_exact_match``, ``val_cider``, ``val_vqa_acc``).
Every record is flushed as it is written, so a crash loses nothing already done; a ``mirror``
(training/tensorboard_log.py) gets each record too.
A resumed run first cuts the file back to what its checkpoint covers (``truncate_to``), so the
steps it replays are logged once: the file then reads exactly as an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol


def is_step_record(record: dict[str, Any]) -> bool:
    """Step records carry a ``loss`` key; epoch records never do."""
    return "loss" in record


def read_records(path: Path) -> list[dict[str, Any]]:
    """The file's records; a line cut short by a crash (the last one, unflushed) is dropped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def truncate_to(path: Path, step: int, epoch: int) -> int:
    """Keep the records a checkpoint at (``step``, ``epoch``) covers; returns how many went.

    Kept: step records up to ``step`` and epoch records of epochs before ``epoch`` (an epoch's
    record is written before the checkpoint that advances the epoch). The rest will be replayed.
    """
    records = read_records(path)
    kept = [r for r in records
            if (r["step"] <= step if is_step_record(r) else r["epoch"] < epoch)]
    lines = "".join(json.dumps(r) + "\n" for r in kept)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(lines)
    os.replace(tmp, path)
    return len(records) - len(kept)


class Mirror(Protocol):
    """Another sink for the same records (TensorBoard)."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class MetricsLog:
    """Appends records to metrics.jsonl, flushed one by one, and passes each to ``mirror``
    (a no-op when not ``enabled``)."""

    def __init__(self, path: Path, enabled: bool = True, mirror: Mirror | None = None) -> None:
        self.file = path.open("a") if enabled else None
        self.mirror = mirror if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to the OS (survives kill -9 of this process)."""
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.mirror is not None:
            self.mirror.write(record)

    def close(self) -> None:
        """Close the file and the mirror (idempotent)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None
