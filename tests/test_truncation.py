"""Over-long texts: every collator cuts to what the model's text side takes, warns once per
sample source, and labels only the kept part of the target."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from blip2_tiny import QUERY_TOKENS, tiny_blip2
from conftest import write_tiny_dataset
from PIL import Image
from real_tokenizers import write_real_checkpoint

import train
from data.formats import CaptionSample
from data.vqa_formats import VQASample
from models.loading import load_model
from models.loss import IGNORE
from models.tasks import TaskDataset, make_task

LONG = " ".join(["red"] * 10_000)
ASKED = 100  # --max-length asked for: above BLIP's 32 and OPT's 64 positions, T5 keeps it
BLIP_POSITIONS = 32


def blip_dir(path: Path, family: str = "blip-caption") -> Path:
    """A real-layout BLIP checkpoint ([DEC] bos, WordPiece) with 32 text positions."""
    return write_real_checkpoint(path, family, text_positions=BLIP_POSITIONS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(model, processor) per family: BLIP caption / VQA (32 positions), BLIP-2 OPT (64
    positions, QUERY_TOKENS of them image tokens) and T5 (relative positions: no table), each
    with its real tokenizer type."""
    root = tmp_path_factory.mktemp("models")
    blip = load_model(str(blip_dir(root / "cap")))[:2]
    blip_vqa = load_model(str(blip_dir(root / "vqa", "blip-vqa")))[:2]
    return {"blip-caption": blip, "blip-vqa": blip_vqa, "opt": tiny_blip2("opt"),
            "t5": tiny_blip2("t5")}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "0.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(path)
    return path


def _batch(task, samples):
    """The collated batch of ``samples``, built the way train.py builds it (TaskDataset)."""
    data = TaskDataset(samples, task)
    return task.collate([data[i] for i in range(len(data))])


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _ids(processor, word: str) -> int:
    """The id of ``word`` after a space, as in "a red": "red" (WordPiece), "Ġred" (byte-level
    BPE), "▁red" (Unigram)."""
    ids = processor.tokenizer("a " + word, add_special_tokens=False).input_ids
    assert len(ids) == 2, f"{word!r} is not one token here"
    return ids[1]


def _kept_targets(labels: torch.Tensor) -> list[int]:
    return labels[labels != IGNORE].tolist()


@pytest.mark.parametrize("family", ["blip-caption", "opt", "t5"])
def test_caption_collators_cut_long_captions(models, image_file, caplog, family):
    model, processor = models[family]
    # "a cube on": three tokens in every vocabulary; one space joins it to the caption.
    task = make_task(model, processor, "caption", prompt="a cube on ", max_length=ASKED)
    limit = {"blip-caption": 32, "opt": 64, "t5": ASKED}[family]
    samples = [CaptionSample(image_file, "a red cube", "short.jsonl:1"),
               CaptionSample(image_file, LONG, "long.jsonl:7")]
    caplog.set_level(logging.INFO)
    caplog.clear()
    batch = _batch(task, samples)
    assert all(v.shape[1] <= limit for k, v in batch.items() if k != "pixel_values")
    assert task.max_length == limit
    warned = _warnings(caplog)
    assert len(warned) == 1 and "long.jsonl:7" in warned[0] and "short.jsonl" not in warned[0]
    red = _ids(processor, "red")
    kept = _kept_targets(batch["labels"][1])
    # Only caption tokens of the kept part are targets: no prompt, and no end-of-text marker,
    # since the caption does not end where it was cut.
    if family == "blip-caption":  # [DEC] a cube on red ... red [SEP]: 32 positions
        assert kept == [red] * (limit - 1 - 3 - 1)
    elif family == "opt":  # 4 image tokens, </s> a cube on red ... red (the </s> cut away)
        assert kept == [red] * (limit - QUERY_TOKENS - 1 - 3)
    else:  # T5 labels: red ... red </s>
        assert kept == [red] * (limit - 1)
    # The short caption is learned whole, with its end marker.
    short = _kept_targets(batch["labels"][0])
    assert short[-1] == (processor.tokenizer.sep_token_id if family == "blip-caption"
                         else processor.tokenizer.eos_token_id)
    # The model takes the batch, and the loss counts exactly the labelled tokens.
    with torch.no_grad():
        _, n = task.loss_sum(model, batch, 0.0)
    assert n == task.count_targets(batch) > 0
    # Once per source: the next epoch's batch does not warn again.
    caplog.clear()
    _batch(task, samples)
    assert _warnings(caplog) == []


def test_blip_vqa_cuts_questions_and_answers(models, image_file, caplog):
    model, processor = models["blip-vqa"]
    task = make_task(model, processor, "vqa", max_length=ASKED)
    samples = [VQASample(image_file, "what colour is the cube?", ("red",), "v.jsonl:1"),
               VQASample(image_file, LONG, (LONG,), "v.jsonl:2"),
               VQASample(image_file, "what colour is the cube?", (LONG,), "v.jsonl:3")]
    caplog.clear()
    batch = _batch(task, samples)
    for key in ("input_ids", "attention_mask", "answer_ids", "answer_mask", "labels"):
        assert batch[key].shape[1] <= 32, key
    warned = _warnings(caplog)
    assert len(warned) == 2  # one per offending sample, question and answer in one line
    assert "v.jsonl:2" in warned[0] and "question" in warned[0] and "answer" in warned[0]
    assert "v.jsonl:3" in warned[1] and "question" not in warned[1]
    red, sep = _ids(processor, "red"), processor.tokenizer.sep_token_id
    assert _kept_targets(batch["labels"][0]) == [model.config.text_config.bos_token_id, red, sep]
    for row in (1, 2):  # bos (position 0, never a target after the shift), 30 × red, no [SEP]
        assert _kept_targets(batch["labels"][row]) == [model.config.text_config.bos_token_id,
                                                       *[red] * 30]
    with torch.no_grad():
        _, n = task.loss_sum(model, batch, 0.0)
    assert n == task.count_targets(batch) == 2 + 30 + 30  # shifted: bos is never a target


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_blip2_vqa_cuts_question_and_answer(models, image_file, caplog, family):
    model, processor = models[family]
    task = make_task(model, processor, "vqa", max_length=ASKED)
    samples = [VQASample(image_file, LONG, ("red",), "q.jsonl:4"),
               VQASample(image_file, "what colour is the cube?", (LONG,), "q.jsonl:5")]
    caplog.clear()
    batch = _batch(task, samples)
    limit = 64 if family == "opt" else ASKED
    assert all(v.shape[1] <= limit for k, v in batch.items() if k != "pixel_values")
    warned = _warnings(caplog)
    assert len(warned) == 2 and "q.jsonl:4" in warned[0] and "q.jsonl:5" in warned[1]
    red = _ids(processor, "red")
    if family == "opt":
        # The prompt "Question: red red ... Answer:" fills the window: no target token is left,
        # and that is a batch with zero targets, not an error.
        assert _kept_targets(batch["labels"][0]) == []
        # "</s> question : what colour is the cube ? answer :" then red ... red.
        n_prompt = len(processor.tokenizer("Question: what colour is the cube? Answer:")
                       .input_ids)
        assert _kept_targets(batch["labels"][1]) == [red] * (limit - QUERY_TOKENS - n_prompt)
    else:
        # T5: the encoder prompt is cut, the decoder's target is whole; a long answer is cut.
        assert _kept_targets(batch["labels"][0]) == [red, processor.tokenizer.eos_token_id]
        assert _kept_targets(batch["labels"][1]) == [red] * (limit - 1)
    with torch.no_grad():
        _, n = task.loss_sum(model, batch, 0.0)
    assert n == task.count_targets(batch)


@pytest.mark.parametrize("family", ["blip-caption", "opt"])
def test_prompt_filling_the_window_leaves_zero_targets(models, image_file, family):
    model, processor = models[family]
    prompt = "a cube on " * 30
    task = make_task(model, processor, "caption", prompt=prompt, max_length=ASKED)
    batch = _batch(task, [CaptionSample(image_file, "a red cube", "p.jsonl:1")])
    assert task.count_targets(batch) == 0
    with torch.no_grad():
        loss, n = task.loss_sum(model, batch, 0.0)
    assert n == 0 and loss.item() == 0.0


def test_max_length_lowered_once_and_said(models, caplog):
    model, processor = models["blip-caption"]
    caplog.set_level(logging.INFO)
    caplog.clear()
    assert make_task(model, processor, "caption", max_length=16).max_length == 16
    assert not any("max-length" in r.getMessage() for r in caplog.records)
    assert make_task(model, processor, "caption", max_length=64).max_length == 32
    said = [r.getMessage() for r in caplog.records if "max-length" in r.getMessage()]
    assert len(said) == 1 and "64" in said[0] and "32" in said[0]
    # Without a request (inference), the model's limit is taken silently.
    caplog.clear()
    assert make_task(model, processor, "caption").max_length == 32
    assert not any("max-length" in r.getMessage() for r in caplog.records)


def test_max_length_too_small_is_refused(models):
    model, processor = models["opt"]
    with pytest.raises(ValueError, match="image tokens"):
        make_task(model, processor, "caption", max_length=QUERY_TOKENS)
    model, processor = models["blip-caption"]
    with pytest.raises(ValueError, match="positive"):
        make_task(model, processor, "caption", max_length=0)


def test_train_py_with_a_10000_word_caption(tmp_path, caplog):
    """The reported crash: --max-length 64 (the default then) on a model with 32 positions."""
    model_dir = blip_dir(tmp_path / "m")
    data = write_tiny_dataset(tmp_path / "d", n=6)
    lines = data.read_text().splitlines()
    record = json.loads(lines[3])
    lines[3] = json.dumps({**record, "text": LONG})
    data.write_text("\n".join(lines) + "\n")
    caplog.set_level(logging.INFO)
    adapter = train.main(["--model", str(model_dir), "--train-file", str(data), "--eval-file",
                          "none", "--epochs", "1", "--batch-size", "3", "--val-fraction", "0",
                          "--output-dir", str(tmp_path / "run"), "--threads", "1"])
    assert adapter.exists()
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
              and "truncat" in r.getMessage()]
    assert len(warned) == 1 and f"{data}:4" in warned[0]
    # The default (64, or the model's limit if lower) is not reported as lowered; the count is.
    assert not any("lowered" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage().startswith("1 training/validation samples were longer")
               for r in caplog.records)
