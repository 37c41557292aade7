"""train.py under faults: crashes, signals, NaNs, empty windows, busy folders, full disks.

Each test compares against what an uninterrupted run writes: the adapter, best.safetensors and
metrics.jsonl (minus wall-clock times) must come out the same.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_dataset, write_tiny_model_dir
from safetensors.torch import load_file
from tiny_runs import train_args, write_tiny_run

import train
from cli import train_flags
from training.run_dir import lock_run_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("train"))


def _records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field (the only one that may differ)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]


def _assert_same_outputs(a: Path, b: Path) -> None:
    for name in ("adapter.safetensors", "best.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert _records(a) == _records(b)


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    train.main(train_args(setup, out, "--save-every", "2"))
    records = _records(out)
    # 9 train samples / 3 = 3 micro-batches -> 2 steps per epoch; 3 epochs.
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in records if "loss" not in r] == [0, 1, 2]
    assert all("val_loss" in r for r in records if "loss" not in r)
    return out


# Loss calls: epoch 0 = micro 1, 2 (step 1), 3 (step 2), validation 4; epoch 1 = 5, 6, 7, 8 ...
@pytest.mark.parametrize("at_call", [6, 8, 12], ids=["mid-window", "in-validation", "last-val"])
def test_ctrl_c_then_resume_gives_every_output_of_an_uninterrupted_run(
        setup, uninterrupted, tmp_path, monkeypatch, at_call):
    calls, real = {"n": 0}, train.forward_loss

    def interrupting(*a, **kw):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(train, "forward_loss", interrupting)
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(setup, tmp_path / "b", "--save-every", "2"))
    assert stop.value.code == 130
    monkeypatch.setattr(train, "forward_loss", real)
    train.main(train_args(setup, tmp_path / "b", "--save-every", "2", "--resume", "auto"))
    _assert_same_outputs(uninterrupted, tmp_path / "b")


CRASHING_RUN = """
import os, sys
sys.path.insert(0, {root!r})
import train
real, calls = train.forward_loss, [0]
def crash(*a, **kw):
    calls[0] += 1
    if calls[0] == {at_call}:
        os._exit(137)  # as kill -9: no handler, no flush, no cleanup
    return real(*a, **kw)
train.forward_loss = crash
train.main({argv!r})
"""


@pytest.mark.parametrize("at_call", [7, 11], ids=["after-periodic-checkpoint", "late"])
def test_kill_9_then_resume_logs_each_step_once(setup, uninterrupted, tmp_path, at_call):
    argv = train_args(setup, tmp_path / "b", "--save-every", "2")
    script = CRASHING_RUN.format(root=str(ROOT), at_call=at_call, argv=argv)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 137, done.stderr
    # Steps after the last checkpoint were logged (flushed per record) and will be replayed.
    logged = [r["step"] for r in _records(tmp_path / "b") if "loss" in r]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) >= 3
    train.main([*argv, "--resume", "auto"])
    _assert_same_outputs(uninterrupted, tmp_path / "b")


def test_sigterm_checkpoints_like_ctrl_c(setup, uninterrupted, tmp_path):
    out = tmp_path / "b"
    argv = train_args(setup, out, "--save-every", "2")
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(_records(out)) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM could be sent")
    assert proc.returncode == 143, err  # 128 + SIGTERM, as the shell reports it
    assert "Traceback" not in err and "checkpoint at step" in err
    train.main([*argv, "--resume", "auto"])
    _assert_same_outputs(uninterrupted, out)


def test_resume_auto_without_a_checkpoint_starts_over_and_cleans_leftovers(
        setup, uninterrupted, tmp_path):
    out = tmp_path / "b"
    (out / "checkpoints" / ".step-000002.abcd").mkdir(parents=True)  # an interrupted write
    (out / ".adapter.safetensors.x1y2.tmp").write_bytes(b"half")
    (out / "metrics.jsonl").write_text('{"step": 1, "epoch": 0, "loss": 9.0, "lr": 0.1}\n{"st')
    with pytest.raises(SystemExit, match="not empty"):
        train.main(train_args(setup, out, "--save-every", "2"))
    train.main(train_args(setup, out, "--save-every", "2", "--resume", "auto"))
    assert not list(out.rglob("*.tmp")) and not list((out / "checkpoints").glob(".step-*"))
    _assert_same_outputs(uninterrupted, out)


def test_a_second_run_on_a_busy_folder_stops_with_a_message(setup, tmp_path, capsys):
    out = tmp_path / "b"
    with lock_run_dir(out), pytest.raises(SystemExit) as stop:
        train.main(train_args(setup, out, "--resume", "auto"))
    assert stop.value.code == 2
    assert "in use" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()


def test_changed_max_length_is_refused_on_resume(setup, tmp_path):
    out = tmp_path / "b"
    train.main(train_args(setup, out, "--stop-after-steps", "1"))
    with pytest.raises(SystemExit, match="max_length: 32 then, 16 now") as stop:
        train.main(train_args(setup, out, "--resume", "auto", "--max-length", "16"))
    assert stop.value.code == 2
    # Settings that only change speed or reporting may change.
    train.main(train_args(setup, out, "--resume", "auto", "--num-workers", "0",
                          "--save-every", "5"))


def test_every_flag_is_compared_on_resume_unless_it_cannot_change_the_adapters():
    flags = set(vars(train_flags.parse_args([])))
    assert flags >= train.MAY_CHANGE_ON_RESUME
    compared = flags - train.MAY_CHANGE_ON_RESUME
    for key in ("max_length", "prompt", "skip_bad_samples", "image_root", "annotations",
                "gradient_checkpointing", "eval_batch_size", "lr", "seed", "quantize"):
        assert key in compared


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        setup, tmp_path, monkeypatch, capsys):
    calls, real = {"n": 0}, train.forward_loss

    def nan_at_step_3(*a, **kw):
        calls["n"] += 1
        loss, n = real(*a, **kw)
        return (loss * float("nan"), n) if calls["n"] == 5 else (loss, n)  # step 3's 1st micro

    monkeypatch.setattr(train, "forward_loss", nan_at_step_3)
    out = tmp_path / "b"
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(setup, out, "--save-every", "1"))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "step 3 (epoch 1)" in err and "not finite" in err and "step-000002" in err
    assert not (out / "adapter.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001",
                                                                         "step-000002"]
    last = load_file(out / "checkpoints/step-000002/adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in last.values())
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 2]


def test_windows_without_target_tokens_are_skipped_not_nan(setup, tmp_path, caplog):
    # A prompt that fills --max-length leaves no caption token to learn in any window.
    out = tmp_path / "b"
    adapter = load_file(train.main(train_args(setup, out, "--epochs", "1", "--dropout", "0",
                                         "--prompt", "a red green blue cube on a single",
                                         "--max-length", "6")))
    records = _records(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["loss"] is None and r["skipped"] == "no target tokens" for r in steps)
    assert "no target tokens" in caplog.text
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert all(torch.count_nonzero(t) == 0 for k, t in adapter.items() if "lora_B" in k)


def test_full_disk_ends_with_one_message_and_the_previous_checkpoint_intact(
        setup, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    out = tmp_path / "b"
    real, calls = safetensors.torch.save_file, {"n": 0}

    def full_disk(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # step 1's checkpoint is written, step 2's hits a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **kw)

    monkeypatch.setattr("lora.adapter_file.save_file", full_disk)
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(setup, out, "--save-every", "1"))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    first = out / "checkpoints/step-000001"
    assert load_file(first / "adapter.safetensors") and (first / "train_state.pt").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]


def test_accumulated_window_logs_the_loss_and_gradient_of_one_big_batch(tmp_path):
    # train.py's own loop: 2 micro-batches of 3 with captions of different lengths must give
    # the step-1 loss and (pre-clipping) gradient norm of one batch of 6 (dropout off).
    model_dir = write_tiny_model_dir(tmp_path / "model")
    data = write_tiny_dataset(tmp_path / "data", n=6)
    texts = ["a red cube", "no block", "a single blue cube on a green cube", "a cube", "red",
             "a green cube on a red cube on a blue cube"]
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "text": t}) + "\n"
                            for r, t in zip(rows, texts, strict=True)))

    def first_step(out, batch, accum):
        train.main(["--model", str(model_dir), "--train-file", str(data), "--eval-file", "none",
                    "--val-fraction", "0", "--epochs", "1", "--dropout", "0", "--threads", "1",
                    "--batch-size", str(batch), "--grad-accum", str(accum),
                    "--output-dir", str(out)])
        return _records(out)[0]

    big, accumulated = first_step(tmp_path / "big", 6, 1), first_step(tmp_path / "acc", 3, 2)
    assert accumulated["step"] == big["step"] == 1
    assert accumulated["loss"] == pytest.approx(big["loss"], rel=1e-6)
    assert accumulated["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-5)
    # A per-micro-batch mean (the classic mistake) would differ by far more than that.
    assert big["grad_norm"] > 0


@pytest.mark.parametrize("damage", ["truncated", "not-tensors", "adapter-missing"])
def test_a_damaged_checkpoint_is_one_message_not_a_traceback(setup, tmp_path, capsys, damage):
    out = tmp_path / "b"
    train.main(train_args(setup, out, "--stop-after-steps", "1"))
    folder = out / "checkpoints/step-000001"
    if damage == "truncated":
        state = folder / "train_state.pt"
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "not-tensors":
        torch.save({"position": {"step": 1}, "run": object()}, folder / "train_state.pt")
    else:
        (folder / "adapter.safetensors").unlink()
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(setup, out, "--resume", str(folder)))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    message = err.splitlines()[-1]  # after the loading progress bar
    assert message.startswith("train.py: error: ") and str(folder) in message
    assert "Traceback" not in err
