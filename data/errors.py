"""What the data loaders raise and report: DataFormatError, BadEntry, SkipReport, collect."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MAX_LISTED_ERRORS = 10  # in the message of the raised DataFormatError


class DataFormatError(ValueError):
    """A dataset file or sample that cannot be used; the message names the file (and line)."""


class BadEntry(Exception):
    """One entry is unusable; the loader reports it (or skips it) and goes on."""


@dataclass
class SkipReport:
    """Bad entries skipped with skip_bad_samples=True: how many, and the first messages.

    An entry is a JSONL line, a captions-map key, a COCO annotation, a per-image file, or in a
    folder tree one image (with all its captions) or one caption file / image folder.
    """

    count: int = 0
    messages: list[str] = field(default_factory=list)
    max_messages: int = 20

    def add(self, message: str) -> None:
        """Count one skipped entry, keeping its message if fewer than max_messages are kept."""
        self.count += 1
        if len(self.messages) < self.max_messages:
            self.messages.append(message)

    def summary(self) -> str:
        """A human-readable account: the count, then the kept messages one per line."""
        if self.count == 0:
            return "skipped 0 bad entries"
        shown = "" if self.count <= len(self.messages) else f" (first {len(self.messages)})"
        return f"skipped {self.count} bad entries{shown}:\n  " + "\n  ".join(self.messages)


def collect(path: Path, entries: Iterable[Any],
            skip_bad_samples: bool) -> tuple[list[Any], SkipReport]:
    """Samples of ``entries`` (each a sample, a list of samples, or an error message): errors
    raise together, or with skip_bad_samples are skipped, counted and logged."""
    samples: list[Any] = []
    errors: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            errors.append(entry)
        elif isinstance(entry, list):
            samples.extend(entry)
        else:
            samples.append(entry)
    report = SkipReport()
    if errors and not skip_bad_samples:
        listed = "\n  ".join(errors[:MAX_LISTED_ERRORS])
        more = len(errors) - MAX_LISTED_ERRORS
        listed += f"\n  ... and {more} more" if more > 0 else ""
        # The CLI flag is named: this message is what train.py users read.
        raise DataFormatError(f"{len(errors)} bad entries in {path} (--skip-bad-samples, "
                              f"skip_bad_samples=True in Python, skips them):\n  {listed}")
    for message in errors:
        report.add(message)
    if report.count:
        logger.warning("%s: %s", path, report.summary())
    if not samples:
        why = f"; {report.summary()}" if report.count else ""
        raise DataFormatError(f"{path}: dataset has no samples{why}")
    return samples, report
