"""Resumable checkpoints: a folder holding the adapter file and the training state.

``checkpoints/step-000120/`` = ``adapter.safetensors`` (the ordinary adapter file, usable by
infer.py) + ``train_state.pt`` (optimizer, scheduler, GradScaler, RNG state, position in the
data). The folder is written under a temporary name and renamed, so a checkpoint either exists
whole or not at all. The state holds only tensors and plain Python values and loads with
``weights_only=True``. A checkpoint that cannot be read or written raises CheckpointError, whose
message names the path (train.py prints it and exits 2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from lora import AdapterFileError, LoRAInjection, read_metadata, save_adapter

ADAPTER, STATE = "adapter.safetensors", "train_state.pt"
STEP_NAME = re.compile(r"step-(\d+)")
# How a failed write surfaces: OSError from Python, RuntimeError from torch.save's zip writer
# ("unexpected pos ..." on a full disk), SafetensorError from safetensors' Rust writer.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint that cannot be read or written; the one-line message names the path."""


@dataclass
class Position:
    """Where training stands: the next optimizer step, and where its window starts."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro: int = 0  # index of the window's first micro-batch within the epoch
    best_val: float = float("inf")  # --select-best value to beat, as selection_key minimises


def _steps(parent: Path) -> list[Path]:
    """The ``step-N`` folders in ``parent``, oldest first by N (as text, 1000000 < 999999)."""
    found = [p for p in parent.glob("step-*") if STEP_NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[len("step-"):]))


def _complete(folder: Path) -> bool:
    return (folder / ADAPTER).is_file() and (folder / STATE).is_file()


def _newest_complete(parent: Path) -> Path | None:
    """The newest complete ``step-N`` folder in ``parent``, warning about newer incomplete ones."""
    for folder in reversed(_steps(parent)):
        if _complete(folder):
            return folder
        log.warning("%s: incomplete checkpoint (needs %s and %s), skipped", folder, ADAPTER, STATE)
    return None


def save_checkpoint(
    folder: Path,
    injection: LoRAInjection,
    state: dict[str, Any],
    position: Position,
    adapter_meta: dict[str, str],
    keep: int = 3,
) -> Path:
    """Write ``folder`` atomically (temp dir + rename); prune older step-* siblings to ``keep``.

    A failed write (full disk, quota, I/O error) removes the temp dir and raises
    CheckpointError; every existing checkpoint, ``folder`` included if it exists, is untouched.
    """
    previous = _newest_complete(folder.parent)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            save_adapter(injection, tmp / ADAPTER,
                         base_model=adapter_meta.get("base_model", ""), extra=adapter_meta)
            torch.save({**state, "position": asdict(position)}, tmp / STATE)
            _replace_dir(tmp, folder)
        except BaseException:  # Ctrl-C included: no half-written temp dir stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except WRITE_ERRORS as e:
        raise CheckpointError(_write_failure(folder, previous, e)) from e
    if keep > 0:
        for old in _steps(folder.parent)[:-keep]:
            try:
                shutil.rmtree(old)
            except OSError as e:  # the new checkpoint is safe; an old one left is no failure
                log.warning("could not remove old checkpoint %s: %s", old, e)
    return folder


def _replace_dir(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``; an existing ``folder`` is moved aside first (a directory
    cannot be renamed over a non-empty one) and deleted only once the new one is in place."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    # A dot name starting ".step-", so run_dir.clean_stale_temporaries removes it after a crash.
    aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
    os.replace(folder, aside)  # onto the empty dir mkdtemp made: allowed for directories
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(aside, folder)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _write_failure(folder: Path, previous: Path | None, e: Exception) -> str:
    """One line: what failed, why, and which checkpoint a resume would use."""
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:
        reason = f"write failed ({(str(e) or type(e).__name__).splitlines()[0]})"
    with contextlib.suppress(OSError):  # torch's message never says "disk full": this does
        reason += f", {shutil.disk_usage(folder.parent).free / 1e6:.0f} MB free there"
    kept = (f"the previous checkpoint {previous} is intact" if previous
            else "no earlier checkpoint exists")
    return f"cannot write checkpoint {folder}: {reason}; {kept}"


def load_state(folder: Path) -> tuple[dict[str, Any], Position]:
    """The training state of checkpoint ``folder`` (never unpickles arbitrary objects).

    Checks the adapter file's header too (AdapterFileError becomes CheckpointError), so call it
    before loading the adapter: every damaged checkpoint ends in one CheckpointError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    path = folder / STATE
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint (no {STATE})")
    try:
        read_metadata(folder / ADAPTER)  # missing or truncated: safe_open checks the length
    except AdapterFileError as e:
        raise CheckpointError(f"damaged checkpoint: {e}") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch explains at length how to bypass weights_only; only the global it names matters
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(f"{path}: not a tensor-only training state (it pickles "
                                  f"{found[1]}), refused rather than unpickled") from e
        raise CheckpointError(f"{path}: truncated or corrupt (not a torch.save file)") from e
    except Exception as e:  # truncated or garbage: EOFError, RuntimeError, OSError, KeyError...
        detail = str(e).split(". ")[0].splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path}: truncated or corrupt ({type(e).__name__}"
                              f"{': ' + detail if detail else ''})") from e
    try:
        return state, Position(**state.pop("position"))
    except (AttributeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a lora-vlm training state (no valid 'position')") from e


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete ``step-*`` checkpoint under ``run_dir/checkpoints``, if any.

    Complete means both files are present (a folder only appears whole, unless damaged from
    outside); newer incomplete folders are skipped with a warning naming them. A complete but
    corrupt newest one is not skipped: load_state names it, and ``--resume <older>`` is the
    user's call, not a silent fallback.
    """
    return _newest_complete(Path(run_dir) / "checkpoints")


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
