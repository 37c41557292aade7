"""Resumable checkpoints: a folder holding the adapter file and the training state.

``checkpoints/step-000120/`` = ``adapter.safetensors`` (the ordinary adapter file, usable by
infer.py) + ``train_state.pt`` (optimizer, scheduler, GradScaler, RNG state, position in the
data). The folder is written under a temporary name and renamed, so a checkpoint either exists
whole or not at all. The state holds only tensors and plain Python values and loads with
``weights_only=True``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lora import LoRAInjection, save_adapter

ADAPTER, STATE = "adapter.safetensors", "train_state.pt"


@dataclass
class Position:
    """Where training stands: the next optimizer step, and where its window starts."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro: int = 0  # index of the window's first micro-batch within the epoch
    best_val: float = float("inf")


def save_checkpoint(
    folder: Path,
    injection: LoRAInjection,
    state: dict[str, Any],
    position: Position,
    adapter_meta: dict[str, str],
    keep: int = 3,
) -> Path:
    """Write ``folder`` atomically (temp dir + rename); prune older step-* siblings to ``keep``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        save_adapter(injection, tmp / ADAPTER, base_model=adapter_meta.get("base_model", ""),
                     extra=adapter_meta)
        torch.save({**state, "position": asdict(position)}, tmp / STATE)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(folder.parent.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return folder


def load_state(folder: Path) -> tuple[dict[str, Any], Position]:
    """The training state of checkpoint ``folder`` (never unpickles arbitrary objects)."""
    path = folder / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a checkpoint (no {STATE})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state, Position(**state.pop("position"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete ``step-*`` checkpoint under ``run_dir/checkpoints``, if any."""
    found = sorted((run_dir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from (dropout): CPU, and CUDA when present."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of rng_state."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
