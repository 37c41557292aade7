"""VQA training targets: every answer weighted by its share (BLIP's protocol) or the majority
answer. The weighted loss is checked against the model's own per-answer loss, summed by hand."""

import json
from pathlib import Path

import pytest
import torch
from conftest import COLOURS
from PIL import Image
from tiny_runs import train_args

import models.blip_vqa
import train
from data.errors import DataFormatError
from data.vqa_formats import VQASample
from data.vqa_targets import answer_weights, majority_answer, resolve_targets
from models.blip_vqa import VQACollator, VQAItem, WeightedVQAItem, vqa_loss_sum
from models.loading import load_model
from models.loss import IGNORE
from models.tasks import Task, make_task

TINY_VQA = Path(__file__).resolve().parents[1] / "models" / "tiny_blip_vqa"


@pytest.fixture(scope="module")
def tiny():
    model, processor, _ = load_model(str(TINY_VQA))
    return model, processor


def _sample(answers, question="what colour is the cube?"):
    return VQASample(Path("x.png"), question, tuple(answers), "f:1")


def own_answer_loss(model, processor, image, question, answer) -> torch.Tensor:
    """transformers' BlipForQuestionAnswering loss of one (image, question, answer): the mean
    token cross-entropy of the answer after its start token."""
    tok = processor.tokenizer
    ids = tok(answer, return_tensors="pt").input_ids
    ids[:, 0] = model.config.text_config.bos_token_id
    enc = processor(images=[image], text=[question], return_tensors="pt")
    return model(pixel_values=enc["pixel_values"], input_ids=enc["input_ids"],
                 attention_mask=enc["attention_mask"], decoder_input_ids=ids,
                 labels=ids).loss


def test_answer_weights_are_each_answers_share_in_first_seen_order():
    answers = ["red"] * 6 + ["blue"] * 3 + ["a red cube"]
    unique, weights = answer_weights(answers)
    assert unique == ("red", "blue", "a red cube")
    assert weights == pytest.approx((0.6, 0.3, 0.1))
    assert answer_weights(["blue", "red", "red", "blue"]) == (("blue", "red"), (0.5, 0.5))
    assert answer_weights(["yes"]) == (("yes",), (1.0,))
    assert majority_answer(["blue", "red", "red", "blue"]) == "blue"  # first seen wins ties
    with pytest.raises(ValueError, match="at least one answer"):
        answer_weights([])


def test_auto_targets_are_weighted_where_questions_have_ten_answers():
    single, ten = _sample(["red"]), _sample(["red"] * 7 + ["blue"] * 3)
    assert resolve_targets("auto", [single, single]) == "majority"
    assert resolve_targets("auto", [single, ten]) == "weighted"
    assert resolve_targets("majority", [ten]) == "majority"
    assert resolve_targets("weighted", [single]) == "weighted"
    with pytest.raises(ValueError, match="auto, weighted, majority"):
        resolve_targets("all", [single])


def test_weighted_loss_is_the_weighted_sum_of_each_answers_mean_token_loss(tiny):
    # Two questions of different lengths (the shorter padded), answers of 1-3 words.
    model, processor = tiny
    images = [Image.new("RGB", (32, 32), COLOURS[c]) for c in ("red", "blue")]
    questions = ["what colour is the cube in this picture?", "is it red?"]
    answers = [("red", "a red cube", "blue"), ("no", "yes")]
    weights = [(0.6, 0.3, 0.1), (0.8, 0.2)]
    collate = VQACollator(processor, model.config.text_config.bos_token_id)
    batch = collate([WeightedVQAItem(i, q, a, w) for i, q, a, w in
                     zip(images, questions, answers, weights, strict=True)])
    assert batch["input_ids"].shape[0] == 2 and batch["answer_ids"].shape[0] == 5
    assert batch["answer_question"].tolist() == [0, 0, 0, 1, 1]
    with torch.no_grad():
        total, n = vqa_loss_sum(model, batch)
        expected = sum(w * own_answer_loss(model, processor, images[q], questions[q], a)
                       for q in range(2) for a, w in zip(answers[q], weights[q], strict=True))
    assert n == 2  # the loss is a mean per question
    torch.testing.assert_close(total / n, expected / 2, rtol=1e-5, atol=1e-6)


def test_weighted_loss_gives_gradients_and_skips_answers_with_no_targets(tiny):
    model, processor = tiny
    image = Image.new("RGB", (32, 32), COLOURS["green"])
    collate = VQACollator(processor, model.config.text_config.bos_token_id)
    batch = collate([WeightedVQAItem(image, "what colour?", ("green", "red"), (0.9, 0.1)),
                     WeightedVQAItem(image, "is it green?", ("yes",), (1.0,))])
    full, n_full = vqa_loss_sum(model, batch)
    # The second question's only answer loses its targets: it adds nothing and is not counted.
    batch["labels"][2, 1:] = IGNORE
    part, n_part = vqa_loss_sum(model, batch)
    assert (n_full, n_part) == (2, 1)
    alone = collate([WeightedVQAItem(image, "what colour?", ("green", "red"), (0.9, 0.1))])
    torch.testing.assert_close(part, vqa_loss_sum(model, alone)[0], rtol=1e-5, atol=1e-6)
    assert full > part
    full.backward()
    grads = [p.grad for p in model.text_decoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_collator_refuses_a_batch_mixing_weighted_and_single_answer_items(tiny):
    model, processor = tiny
    image = Image.new("RGB", (32, 32), COLOURS["red"])
    collate = VQACollator(processor, model.config.text_config.bos_token_id)
    with pytest.raises(ValueError, match="mixes"):
        collate([WeightedVQAItem(image, "q?", ("red",), (1.0,)), VQAItem(image, "q?", "red")])


def test_task_items_and_counts_follow_the_chosen_targets(tiny):
    model, processor = tiny
    task = make_task(model, processor, "vqa")
    ten = _sample(["red"] * 7 + ["blue"] * 3)
    image = Image.new("RGB", (32, 32), COLOURS["red"])
    assert task.item(ten, image) == VQAItem(image, ten.question, "red", "f:1")  # before choosing
    assert task.choose_vqa_targets("auto", [ten]) == "weighted"
    item = task.item(ten, image)
    assert item == WeightedVQAItem(image, ten.question, ("red", "blue"), (0.7, 0.3), "f:1")
    batch = task.collate([item, item])
    assert task.count_targets(batch) == 2
    assert task.choose_vqa_targets("majority", [ten]) == "majority"
    assert isinstance(task.item(ten, image), VQAItem)


def test_weighted_targets_refused_where_they_do_not_apply():
    caption = Task("caption", "blip", None, None, None)
    assert caption.choose_vqa_targets("auto", []) == "none"
    with pytest.raises(DataFormatError, match="applies to VQA"):
        caption.choose_vqa_targets("weighted", [])
    blip2 = Task("vqa", "blip2", None, None, None)
    ten = _sample(["red"] * 10)
    assert blip2.choose_vqa_targets("auto", [ten]) == "majority"
    with pytest.raises(DataFormatError, match="BLIP-2 trains on the majority"):
        blip2.choose_vqa_targets("weighted", [ten])


def write_ten_answer_vqa(folder: Path, n: int = 12) -> Path:
    """n solid-colour images, one colour question each with 10 answers: 7 say the colour,
    3 another one (a VQA v2-like JSONL file)."""
    folder.mkdir(parents=True, exist_ok=True)
    names, lines = list(COLOURS), []
    for i in range(n):
        colour, other = names[i % len(names)], names[(i + 1) % len(names)]
        Image.new("RGB", (32, 32), COLOURS[colour]).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": "what colour is the cube?",
                                 "answers": [colour] * 7 + [other] * 3}))
    (folder / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "vqa.jsonl"


def test_tiny_vqa_run_trains_with_weighted_targets(tmp_path, monkeypatch, tiny):
    # train.py end to end on 10-answer questions: auto picks weighted targets, every training
    # batch carries both answers with weights 0.7 / 0.3, and the first step's logged loss is
    # the weighted loss of its six questions under the base (adapters start at zero, and the
    # tiny model has no dropout), summed by hand from transformers' own loss.
    data = write_ten_answer_vqa(tmp_path / "d")
    seen = []
    real = models.blip_vqa.weighted_vqa_loss_sum

    def spy(model, batch, label_smoothing=0.0):
        seen.append(batch["answer_weight"].tolist())
        return real(model, batch, label_smoothing)
    monkeypatch.setattr(models.blip_vqa, "weighted_vqa_loss_sum", spy)
    out = tmp_path / "run"
    adapter = train.main(train_args((TINY_VQA, data), out))
    assert adapter.exists()
    config = json.loads((out / "run_config.json").read_text())
    assert (config["vqa_targets"], config["vqa_targets_used"]) == ("auto", "weighted")
    assert seen and all(w == pytest.approx([0.7, 0.3] * (len(w) // 2)) for w in seen)

    model, processor = tiny
    samples = make_task(model, processor, "vqa").load_samples(data)[0]
    train_samples, _ = train.split_by_image(samples, 0.25, seed=0)
    window = [i for b in train.epoch_batches(len(train_samples), 3, 0, 0)[:2] for i in b]
    with torch.no_grad():
        expected = sum(w * own_answer_loss(model, processor, Image.open(s.image).convert("RGB"),
                                           s.question, a)
                       for s in (train_samples[i] for i in window)
                       for a, w in zip(*answer_weights(s.answers), strict=True)) / len(window)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(float(expected), rel=1e-4)


def test_majority_flag_trains_on_one_answer_per_question(tmp_path, monkeypatch):
    data = write_ten_answer_vqa(tmp_path / "d", n=4)
    called = []
    monkeypatch.setattr(models.blip_vqa, "weighted_vqa_loss_sum",
                        lambda *a, **k: called.append(1))
    out = tmp_path / "run"
    train.main([*train_args((TINY_VQA, data), out, "--vqa-targets", "majority"),
                "--epochs", "1", "--val-fraction", "0"])
    assert json.loads((out / "run_config.json").read_text())["vqa_targets_used"] == "majority"
    assert not called
