"""train.py's arithmetic and its promises: schedule, exact accumulation, exact resume."""

import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_dataset, write_tiny_model_dir
from safetensors.torch import load_file
from tiny_runs import records_without_time, train_args, write_tiny_run

import infer
import train
from lora import LoRAConfig, inject_lora
from models.api import Pipeline
from models.loading import load_model
from models.tasks import make_task
from training.accumulation import steps_per_epoch, windows
from training.schedule import make_scheduler, warmup_cosine

ROOT = Path(__file__).resolve().parents[1]


def test_warmup_cosine_shape():
    w, total = 4, 20
    lrs = [warmup_cosine(s, w, total) for s in range(total + 1)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up, (s + 1) / w
    assert lrs[4] == 1.0 and lrs[total] == pytest.approx(0.0, abs=1e-12)
    assert lrs[12] == pytest.approx(0.5)  # half-way through the decay: (1 + cos(pi/2)) / 2
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 16)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert warmup_cosine(20, 4, 20, min_ratio=0.1) == pytest.approx(0.1)


def test_scheduler_follows_formula_per_optimizer_step():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make_scheduler(opt, 3, 10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * warmup_cosine(s, 3, 10) for s in range(10)])


def test_windows_cover_every_micro_batch_once():
    assert [list(w) for w in windows(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert steps_per_epoch(7, 3) == 3 and steps_per_epoch(6, 3) == 2
    assert [list(w) for w in windows(2, 4)] == [[0, 1]]


def test_accumulated_gradient_equals_big_batch(tmp_path):
    model_dir = write_tiny_model_dir(tmp_path / "m")
    write_tiny_dataset(tmp_path / "d", n=5)
    model, processor, _ = load_model(str(model_dir))
    inj = inject_lora(model, LoRAConfig(r=2, alpha=4))
    with torch.no_grad():
        for p in inj.parameters():
            p.normal_(0, 0.1)
    # Captions of different lengths, so micro-batches hold different token counts.
    texts = ["a red cube", "no block", "a single blue cube on a green cube", "a cube", "red"]
    from PIL import Image
    items = [(Image.open(tmp_path / "d" / f"{i}.png").convert("RGB"), t)
             for i, t in enumerate(texts)]
    task = make_task(model, processor, "caption")
    collate = task.collate
    params = inj.adapter_parameters()

    def grads(micro_batches):
        n = sum(task.count_targets(b) for b in micro_batches)
        for b in micro_batches:
            loss, _ = train.forward_loss(task, model, b, torch.device("cpu"), None, 0.0)
            (loss / n).backward()
        g = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return g

    big = grads([collate(items)])
    accumulated = grads([collate(items[:3]), collate(items[3:])])
    for a, b in zip(big, accumulated, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("train"))


def test_resume_is_bit_identical(setup, tmp_path):
    full = load_file(train.main(train_args(setup, tmp_path / "a")))
    # 9 train samples / 3 = 3 micro-batches -> windows [0, 2), [2, 3): 2 steps per epoch.
    train.main(train_args(setup, tmp_path / "b", "--stop-after-steps", "3"))  # mid-epoch 1
    state = torch.load(tmp_path / "b/checkpoints/step-000003/train_state.pt", weights_only=True)
    assert state["position"]["epoch"] == 1 and state["position"]["micro"] == 2
    resumed = load_file(train.main(train_args(setup, tmp_path / "b", "--resume", "auto")))
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert any(not torch.equal(full[k], torch.zeros_like(full[k])) for k in full if "lora_B" in k)
    best_a, best_b = (load_file(tmp_path / d / "best.safetensors") for d in "ab")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)

    assert records_without_time(tmp_path / "a") == records_without_time(tmp_path / "b")


def test_outputs_and_refusals(setup, tmp_path):
    out = tmp_path / "run"
    adapter = train.main(train_args(setup, out, "--epochs", "1", "--save-every", "1"))
    config = json.loads((out / "run_config.json").read_text())
    assert config["global_batch"] == 6 and config["total_steps"] == 2 and config["r"] == 16
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2]
    assert (out / "best.safetensors").exists() and adapter == out / "adapter.safetensors"
    from PIL import Image

    from evaluation.curves import PANEL_H, WIDTH, read_metrics
    assert Image.open(out / "curves.png").size == (WIDTH, 2 * PANEL_H)
    curves = read_metrics(out / "metrics.jsonl")
    assert [s for s, _ in curves["loss"]] == [1, 2] and len(curves["val_loss"]) == 1
    assert [v for _, v in curves["lr"]] == [x["lr"] for x in lines if "lr" in x]
    with pytest.raises(SystemExit, match="not empty"):
        train.main(train_args(setup, out))
    with pytest.raises(SystemExit, match="settings differ"):
        train.main(train_args(setup, out, "--resume", str(out / "checkpoints/step-000002"),
                         "--lr", "0.1"))
    with pytest.raises(SystemExit):
        train.main(train_args(setup, tmp_path / "x", "--r", "0"))


def test_train_save_load_infer_round_trip(setup, tmp_path):
    adapter = train.main(train_args(setup, tmp_path / "run", "--epochs", "2", "--lr", "1e-2"))
    images = sorted(str(p) for p in setup[1].parent.glob("*.png"))[:4]
    hooked = infer.main([*images, "--adapter", str(adapter), "--output",
                         str(tmp_path / "c.jsonl")])
    merged = infer.main([*images, "--adapter", str(adapter), "--merge"])
    base = infer.main([*images, "--model", str(setup[0])])
    assert [r["caption"] for r in hooked] == [r["caption"] for r in merged]
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == hooked
    cap = Pipeline(adapters=[adapter])  # base model read from the adapter's metadata
    assert cap.injection is not None and cap.task.name == "caption"
    with torch.no_grad():
        cap.injection.set_active([])
    from PIL import Image
    assert cap.caption([Image.open(p).convert("RGB") for p in images]) == [
        r["caption"] for r in base]


def test_fp16_autocast_with_grad_scaler_runs(setup, tmp_path):
    # The CUDA recipe (fp16 autocast + GradScaler) exercised on CPU: finite, trained adapters.
    adapter = load_file(train.main(train_args(setup, tmp_path / "r", "--epochs", "1",
                                         "--precision", "fp16")))
    config = json.loads((tmp_path / "r/run_config.json").read_text())
    assert config["grad_scaler"] is True and config["amp_dtype"] == "torch.float16"
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)


def test_half_precision_base_trains_fp32_adapters(setup, tmp_path):
    # --base-dtype halves the frozen weights; adapters (and their file) stay fp32.
    adapter = load_file(train.main(train_args(setup, tmp_path / "r", "--epochs", "1",
                                         "--base-dtype", "bf16", "--precision", "fp32")))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in adapter.values())
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)


def _own_data_args(setup, out, *extra: str) -> list[str]:
    """train_args without --eval-file: a user's data, no test file named."""
    args = train_args(setup, out, "--epochs", "1", *extra)
    i = args.index("--eval-file")
    return args[:i] + args[i + 2 :]


def test_own_data_is_scored_on_its_validation_split(setup, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train.main(_own_data_args(setup, tmp_path / "r"))
    report = json.loads((tmp_path / "r/eval.json").read_text())
    # 12 images, --val-fraction 0.25: the 3 held-out ones, never the shipped cube test set.
    assert report["evaluated_on"] == {"file": str(setup[1]), "split": "validation",
                                      "samples": 3}
    assert set(report) == {"adapter", "base", "evaluated_on"}
    assert "annotations_test" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train.main(_own_data_args(setup, tmp_path / "r2", "--val-fraction", "0"))
    assert not (tmp_path / "r2/eval.json").exists()
    assert "no exact-match report" in caplog.text and "--eval-file" in caplog.text


def test_run_output_lists_files_steps_and_is_group_readable(setup, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *train_args(setup, out, "--epochs", "1")]
    umask = os.umask(0o022)
    try:
        stopped = subprocess.run([*cmd, "--stop-after-steps", "1"], capture_output=True,
                                 text=True, timeout=300)
        resumed = subprocess.run([*cmd, "--resume", "auto"], capture_output=True, text=True,
                                 timeout=300)
    finally:
        os.umask(umask)
    assert stopped.returncode == 0 and resumed.returncode == 0, resumed.stderr
    # The log line starts its own line: the progress bar was closed first.
    assert any(s.startswith("stopped after 1 steps") for s in re.split(r"[\r\n]",
                                                                       stopped.stderr))
    # stdout holds the adapter line alone; the run's log (val loss included) is on stderr.
    assert resumed.stdout == f"adapter: {out / 'adapter.safetensors'}\n"
    assert "val loss" in resumed.stderr
    assert "1 of 2 optimizer steps ran in this process (resumed at step 1)" in resumed.stderr
    for name in ("adapter.safetensors", "best.safetensors", "curves.png", "metrics.jsonl",
                 "run_config.json", "checkpoints"):
        assert str(out / name) in resumed.stderr, name
    for name in ("adapter.safetensors", "best.safetensors",
                 "checkpoints/step-000002/adapter.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_infer_passes_sampling_flags_only_when_sampling(setup, monkeypatch):
    from transformers import BlipForConditionalGeneration
    seen, real = [], BlipForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BlipForConditionalGeneration, "generate", spy)
    image = str(sorted(setup[1].parent.glob("*.png"))[0])
    infer.main([image, "--model", str(setup[0])])
    infer.main([image, "--model", str(setup[0]), "--do-sample", "--top-p", "0.5"])
    assert not {"do_sample", "top_p", "temperature"} & set(seen[0])
    assert seen[1]["do_sample"] is True and seen[1]["top_p"] == 0.5
