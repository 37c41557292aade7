"""BLIP VQA on the real tokenizer layout ([DEC] bos): our answer loss equals the model's own,
batched answers match single ones, and train.py --task vqa runs end to end."""

import json

import pytest
import torch
from conftest import (
    randomize_adapters,
    tiny_blip_vqa,
    write_tiny_dataset,
    write_tiny_vqa_dataset,
)
from PIL import Image
from real_tokenizers import write_real_checkpoint

import infer
import train
from lora import LoRAConfig, inject_lora
from models.blip_vqa import (
    VQACollator,
    answer_logits,
    restore_cross_attention_masks,
    vqa_generate,
    vqa_loss_sum,
)
from models.loading import enable_activation_checkpointing, load_model
from training.errors import RunError


def _setup(tmp_path):
    model_dir = write_real_checkpoint(tmp_path / "m", "blip-vqa")
    model, processor, task = load_model(str(model_dir))
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]
    return model_dir, model, processor, task, images


def test_loss_sum_matches_model_loss_and_grads_reach_adapters(tmp_path):
    _, model, processor, task, images = _setup(tmp_path)
    assert task == "vqa"
    inj = inject_lora(model, LoRAConfig(r=2, alpha=4, targets=("vision", "text")))
    randomize_adapters(inj)
    collate = VQACollator(processor, model.config.text_config.bos_token_id)
    batch = collate([(images[0], "what colour is the cube?", "red"),
                     (images[1], "is the cube red?", "no"),
                     (images[2], "what colour?", "a green cube")])
    total, n = vqa_loss_sum(model, batch)
    own = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"], decoder_input_ids=batch["answer_ids"],
                decoder_attention_mask=batch["answer_mask"], labels=batch["labels"]).loss
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(total / n, own, rtol=1e-5, atol=1e-6)
    total.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad.abs().sum() > 0 for p in inj.parameters())


def test_padded_questions_are_masked_everywhere(tmp_path):
    # Question padding must not leak into the answer: batched = one by one, per real token.
    _, model, processor, _, images = _setup(tmp_path)
    collate = VQACollator(processor, model.config.text_config.bos_token_id)
    items = [(images[0], "what colour is the cube?", "red"), (images[1], "is it?", "no yes")]
    batch = collate(items)
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # padded
    with torch.no_grad():
        batched = answer_logits(model, batch)
        for i, item in enumerate(items):
            single = answer_logits(model, collate([item]))
            n = single.shape[1]
            torch.testing.assert_close(batched[i, :n], single[0], rtol=1e-4, atol=1e-5)
    answers = vqa_generate(model, processor, images[:2], [q for _, q, _ in items],
                           max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_generate_returns_the_answer_and_samples_only_when_asked(tmp_path, monkeypatch):
    # The answer decoder starts from [DEC], which is not part of the answer; top_p/temperature
    # go to generate only when sampling (transformers warns about them otherwise, and infer.py
    # always passes them).
    _, model, processor, _, images = _setup(tmp_path)
    tok = processor.tokenizer
    dec, red, cube = tok.convert_tokens_to_ids(["[DEC]", "red", "cube"])
    seen = []

    def fake_generate(input_ids, **kw):
        seen.append(kw)
        assert input_ids.tolist() == [[dec]]
        return torch.tensor([[dec, red, cube]])
    monkeypatch.setattr(model.text_decoder, "generate", fake_generate)
    for do_sample in (False, True):
        answers = vqa_generate(model, processor, images[:1], ["what is it?"],
                               do_sample=do_sample, top_p=0.9, temperature=0.7)
        assert answers == ["red cube"]
    assert not {"do_sample", "top_p", "temperature"} & set(seen[0])
    assert (seen[1]["do_sample"], seen[1]["top_p"], seen[1]["temperature"]) == (True, 0.9, 0.7)


def test_image_index_encodes_each_image_once(tmp_path):
    # Three questions about two images: indexing one encoding per image must give the logits
    # of the plain batch, where every question carries its own copy of the image.
    _, model, processor, _, images = _setup(tmp_path)
    collate = VQACollator(processor, model.config.text_config.bos_token_id)
    items = [(images[0], "what colour is the cube?", "red"), (images[1], "is it?", "no"),
             (images[0], "how many?", "one")]
    batch = collate(items)
    shared = {**batch, "pixel_values": batch["pixel_values"][:2],
              "image_index": torch.tensor([0, 1, 0])}
    with torch.no_grad():
        torch.testing.assert_close(answer_logits(model, shared), answer_logits(model, batch),
                                   rtol=1e-5, atol=1e-6)


def test_train_vqa_then_infer_questions(tmp_path):
    model_dir = write_real_checkpoint(tmp_path / "m", "blip-vqa")
    data = write_tiny_vqa_dataset(tmp_path / "d")
    adapter = train.main(["--model", str(model_dir), "--train-file", str(data), "--eval-file",
                          str(data), "--epochs", "2", "--batch-size", "4",
                          "--output-dir", str(tmp_path / "run")])
    report = json.loads((tmp_path / "run/eval.json").read_text())
    assert set(report) == {"adapter", "base", "evaluated_on"}  # values: see test_eval
    assert report["evaluated_on"] == {"file": str(data), "split": "test", "samples": 12}
    image = str(tmp_path / "d/0.png")
    out = infer.main([image, "--adapter", str(adapter), "--question", "is the cube red?",
                      "--question", "what colour is the cube?"])
    assert [r["question"] for r in out] == ["is the cube red?", "what colour is the cube?"]
    merged = infer.main([image, "--adapter", str(adapter), "--merge", "--question",
                         "is the cube red?", "--question", "what colour is the cube?"])
    assert out == merged


def test_caption_model_refuses_vqa(tmp_path):
    model_dir = write_real_checkpoint(tmp_path / "m", "blip-caption")
    data = write_tiny_dataset(tmp_path / "d")
    try:
        train.main(["--model", str(model_dir), "--task", "vqa", "--train-file", str(data),
                    "--output-dir", str(tmp_path / "r")])
    except ValueError as e:
        assert "not 'vqa'" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_gradient_checkpointing_same_adapter_grads(tmp_path):
    _, model, processor, _, images = _setup(tmp_path)
    collate = VQACollator(processor, model.config.text_config.bos_token_id)
    batch = collate([(images[0], "what colour is the cube?", "red"),
                     (images[1], "is it?", "no")])
    inj = inject_lora(model, LoRAConfig(r=2, alpha=4))
    randomize_adapters(inj)
    model.train()
    grads = []
    for ckpt in (False, True):
        if ckpt:
            enable_activation_checkpointing(model)
        vqa_loss_sum(model, batch)[0].backward()
        grads.append([p.grad.clone() for p in inj.parameters()])
        for p in inj.parameters():
            p.grad = None
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    assert all(g.abs().sum() > 0 for g in grads[1])


def test_train_on_vqa_v2_with_image_root_and_annotations(tmp_path):
    # COCO-style layout: questions and annotations under meta/ (the annotations not named after
    # the questions file), images in their own folder: needs --image-root and --annotations.
    model_dir = write_real_checkpoint(tmp_path / "m", "blip-vqa")
    (tmp_path / "train2014").mkdir()
    questions, annotations = [], []
    for i, colour in enumerate(["red", "blue", "green", "red"]):
        Image.new("RGB", (32, 32), colour).save(
            tmp_path / f"train2014/COCO_train2014_{i:012d}.jpg")
        questions.append({"image_id": i, "question": "what colour is the cube?",
                          "question_id": i})
        annotations.append({"question_id": i, "image_id": i,
                            "answers": [{"answer": colour}] * 10})
    (tmp_path / "meta").mkdir()
    q = tmp_path / "meta/questions.json"
    q.write_text(json.dumps({"data_subtype": "train2014", "questions": questions}))
    a = tmp_path / "meta/answers.json"
    a.write_text(json.dumps({"annotations": annotations}))
    args = ["--model", str(model_dir), "--train-file", str(q), "--eval-file", "none",
            "--val-fraction", "0", "--epochs", "1", "--batch-size", "2",
            "--output-dir", str(tmp_path / "run")]
    adapter = train.main([*args, "--image-root", str(tmp_path / "train2014"),
                          "--annotations", str(a)])
    assert adapter.exists()
    config = json.loads((tmp_path / "run/run_config.json").read_text())
    assert config["train_samples"] == 4 and config["annotations"] == str(a)
    # Not found without the flag: train.py reports the loader's error as one line, exit 2.
    with pytest.raises(RunError, match="annotations"):
        train.main([*args[:-1], str(tmp_path / "run2"), "--image-root",
                    str(tmp_path / "train2014")])


def _question_padding_leaks(model) -> bool:
    """Checked apart from the probe: does a padded question's answer differ from the same
    question's answer alone (decoder logits, two of four question states padded)?"""
    cfg = model.config.text_config
    gen = torch.Generator().manual_seed(1)
    question = torch.randn(2, 4, cfg.encoder_hidden_size, generator=gen)  # (B, Tq, H)
    ids = torch.tensor([[cfg.bos_token_id, 5, 6]] * 2)
    with torch.no_grad():
        batched = model.text_decoder(input_ids=ids, encoder_hidden_states=question,
                                     encoder_attention_mask=torch.tensor([[1] * 4, [1, 1, 0, 0]]),
                                     use_cache=False).logits
        alone = model.text_decoder(input_ids=ids[1:], encoder_hidden_states=question[1:, :2],
                                   encoder_attention_mask=torch.ones(1, 2, dtype=torch.long),
                                   use_cache=False).logits
    return not torch.allclose(batched[1], alone[0], rtol=1e-4, atol=1e-5)


def _cross_attentions(model):
    return [m for n, m in model.named_modules() if n.endswith("crossattention.self")]


def test_cross_attention_mask_workaround_added_exactly_where_needed():
    # On whichever transformers is installed (5.23 and 5.24 drop the mask; a fixed one would
    # not): hooks are added if and only if question padding leaks without them, never after.
    model = tiny_blip_vqa(0)
    leaks = _question_padding_leaks(model)
    assert (restore_cross_attention_masks(model) > 0) == leaks
    assert not _question_padding_leaks(model)
    assert restore_cross_attention_masks(model) == 0  # a second call sees the mask working


def test_cross_attention_mask_workaround_skipped_where_the_mask_works():
    # A transformers that honours the mask, simulated by passing it on before the probe runs.
    model = tiny_blip_vqa(0)
    def fixed(module, args, kwargs):
        if kwargs.get("encoder_attention_mask") is None:
            kwargs["encoder_attention_mask"] = kwargs.get("attention_mask")
        return args, kwargs
    for m in _cross_attentions(model):
        m.register_forward_pre_hook(fixed, with_kwargs=True)
    assert not _question_padding_leaks(model)
    assert restore_cross_attention_masks(model) == 0
    assert all(len(m._forward_pre_hooks) == 1 for m in _cross_attentions(model))


def test_cross_attention_mask_workaround_fails_loudly_where_it_stops_working():
    # A transformers whose cross-attention loses the mask past the hook: an error at load,
    # and no hooks left behind.
    def losing_masks(forward):
        def call(*args, attention_mask=None, encoder_attention_mask=None, **kwargs):
            return forward(*args, **kwargs)
        return call
    model = tiny_blip_vqa(0)
    for m in _cross_attentions(model):
        m.forward = losing_masks(m.forward)
    with pytest.raises(RuntimeError, match="encoder_attention_mask"):
        restore_cross_attention_masks(model)
    assert all(not m._forward_pre_hooks for m in _cross_attentions(model))
