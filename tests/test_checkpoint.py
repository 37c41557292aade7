"""training/checkpoint.py: atomic checkpoints, and one clear CheckpointError for every way a
checkpoint can be missing, damaged or impossible to write (the previous one stays intact)."""

from __future__ import annotations

import errno
import logging
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from lora import LoRAConfig, inject_lora
from training.checkpoint import (
    ADAPTER,
    STATE,
    CheckpointError,
    Position,
    latest_checkpoint,
    load_state,
    save_checkpoint,
)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)


@pytest.fixture
def injection():
    torch.manual_seed(0)
    return inject_lora(Tiny(), LoRAConfig(r=2, alpha=4, targets=("q",)))


def _save(run: Path, injection, step: int, keep: int = 3, **state) -> Path:
    state = {"optimizer": {"lr": torch.tensor(0.1)}, **state}
    return save_checkpoint(run / "checkpoints" / f"step-{step:06d}", injection, state,
                           Position(step=step, epoch=1, micro=4, best_val=0.5),
                           {"base_model": "tiny"}, keep=keep)


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def _hidden(folder: Path) -> list[str]:
    """Temporaries left behind: any dot-name under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def test_round_trip_and_pruning_by_step_number(tmp_path, injection):
    for step in (999_998, 999_999, 1_000_000):  # 7 digits sorts before 6 as text
        _save(tmp_path, injection, step, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-1000000", "step-999999"]
    newest = latest_checkpoint(tmp_path)
    assert newest == tmp_path / "checkpoints" / "step-1000000"
    state, pos = load_state(newest)
    assert pos == Position(step=1_000_000, epoch=1, micro=4, best_val=0.5)
    assert state == {"optimizer": {"lr": torch.tensor(0.1)}}
    assert _hidden(tmp_path) == []


def test_rewriting_a_step_replaces_it_whole(tmp_path, injection):
    _save(tmp_path, injection, 3, extra=torch.tensor(1.0))
    _save(tmp_path, injection, 3, extra=torch.tensor(2.0))
    state, _ = load_state(tmp_path / "checkpoints" / "step-000003")
    assert state["extra"] == 2.0
    assert _hidden(tmp_path) == []


def test_latest_checkpoint_skips_an_incomplete_newest(tmp_path, injection, caplog):
    _save(tmp_path, injection, 1)
    broken = tmp_path / "checkpoints" / "step-000002"
    broken.mkdir()
    (broken / ADAPTER).write_bytes(b"")  # no train_state.pt
    (tmp_path / "checkpoints" / ".step-000003.x1y2z3").mkdir()  # an interrupted write
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000001"
    assert "step-000002" in caplog.text
    assert latest_checkpoint(tmp_path / "nowhere") is None


def _damage(folder: Path, how: str) -> Path:
    """Damage checkpoint ``folder`` one way; returns the path the message must name."""
    state, adapter = folder / STATE, folder / ADAPTER
    if how == "no folder":
        return folder.with_name("step-000099")
    if how == "no state":
        state.unlink()
        return folder
    if how == "truncated state":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        return state
    if how == "empty state":
        state.write_bytes(b"")
        return state
    if how == "garbage state":
        state.write_bytes(b"not a checkpoint at all " * 20)
        return state
    if how == "pickled object":  # loads only with weights_only=False: could run any code
        torch.save({"position": {}, "model": Tiny()}, state)
        return state
    if how == "no position":
        torch.save({"optimizer": {}}, state)
        return state
    if how == "no adapter":
        adapter.unlink()
        return adapter
    if how == "truncated adapter":
        adapter.write_bytes(adapter.read_bytes()[:-8])
        return adapter
    raise AssertionError(how)


@pytest.mark.parametrize(("how", "says"), [
    ("no folder", "no such checkpoint folder"), ("no state", "not a checkpoint"),
    ("truncated state", "truncated or corrupt"), ("empty state", "truncated or corrupt"),
    ("garbage state", "truncated or corrupt"), ("pickled object", "not a tensor-only"),
    ("no position", "no valid 'position'"), ("no adapter", "no such adapter file"),
    ("truncated adapter", "not a readable safetensors file")])
def test_load_state_damage_is_one_clear_error(tmp_path, injection, how, says):
    folder = _save(tmp_path, injection, 5)
    named = _damage(folder, how)
    with pytest.raises(CheckpointError) as info:
        load_state(named if how == "no folder" else folder)
    message = str(info.value)
    assert str(named) in message and says in message
    assert "\n" not in message


@pytest.mark.parametrize("where", ["state", "adapter"])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, injection, monkeypatch, where):
    previous = _save(tmp_path, injection, 2)
    before = _snapshot(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(*(("torch.save", full) if where == "state"
                          else ("lora.adapter_file.save_file", full)))
    target = tmp_path / "checkpoints" / "step-000004"
    with pytest.raises(CheckpointError) as info:
        _save(tmp_path, injection, 4, keep=1)  # keep=1 would prune step-2 after a success
    message = str(info.value)
    assert f"cannot write checkpoint {target}" in message
    assert "No space left on device" in message
    assert f"previous checkpoint {previous} is intact" in message
    assert _snapshot(tmp_path) == before  # byte-identical, no temp dir, no new folder


def test_real_write_failure_is_a_checkpoint_error(tmp_path, injection):
    """torch.save reports a failed write as RuntimeError, safetensors as SafetensorError (not
    OSError): a file size limit makes the write fail for real."""
    resource = pytest.importorskip("resource")
    previous = _save(tmp_path, injection, 2)
    before = _snapshot(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of dying
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, hard))
    try:
        with pytest.raises(CheckpointError) as info:
            _save(tmp_path, injection, 4, big=torch.zeros(100_000))  # 400 kB > 64 kB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert f"previous checkpoint {previous} is intact" in str(info.value)
    assert _snapshot(tmp_path) == before


def test_first_checkpoint_failure_says_there_is_none(tmp_path, injection, monkeypatch):
    monkeypatch.setattr("torch.save", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointError, match="no earlier checkpoint"):
        _save(tmp_path, injection, 1)
    assert list((tmp_path / "checkpoints").iterdir()) == []
