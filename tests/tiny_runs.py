"""A tiny captioning run for train.py tests: a saved tiny BLIP, 12 images, and its flags."""

import json
from pathlib import Path

from conftest import write_tiny_dataset, write_tiny_model_dir


def write_tiny_run(root: Path) -> tuple[Path, Path]:
    """(model dir, data file) under ``root``: a saved tiny BLIP and 12 captioned images."""
    return write_tiny_model_dir(root / "model"), write_tiny_dataset(root / "data", n=12)


def train_args(setup: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    """train.py flags: 9 train / 3 val samples, 3 micro-batches of 3 -> 2 steps per epoch."""
    model_dir, data = setup
    return ["--model", str(model_dir), "--train-file", str(data), "--eval-file", "none",
            "--epochs", "3", "--batch-size", "3", "--grad-accum", "2", "--dropout", "0.1",
            "--val-fraction", "0.25", "--output-dir", str(out), "--threads", "1", *extra]


def records_without_time(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl records, every field but the wall-clock time (for comparing runs)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]
