"""Prompts on the real tokenizer types (BERT WordPiece with [DEC] as bos, OPT's byte-level BPE,
T5's Unigram): one joining rule, the prompt's tokens masked and checked, generation that
returns the text after the prompt."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from real_tokenizers import real_model

from models.blip2 import Blip2Collator
from models.captioning import CaptionCollator
from models.loss import IGNORE
from models.tasks import make_task

PROMPTS = ["a picture of", "a picture of ", "a photo:", ""]
# Each prompt's words as the three tokenizers split them (spelled out, not computed).
PROMPT_TOKENS = {
    "blip-caption": {"a picture of": ["a", "picture", "of"], "a photo:": ["a", "photo", ":"]},
    "blip2-opt": {"a picture of": ["a", "Ġpicture", "Ġof"], "a photo:": ["a", "Ġphoto", ":"]},
    "blip2-t5": {"a picture of": ["▁a", "▁picture", "▁of"], "a photo:": ["▁a", "▁photo:"]},
}
CAPTIONS = ["a red cube stacked on a blue cube", "no block is present in the image"]
CAPTION_TOKENS = [["a", "red", "cube", "stacked", "on", "a", "blue", "cube"],
                  ["no", "block", "is", "present", "in", "the", "image"]]


@pytest.fixture(scope="module")
def models():
    """family -> (model, processor), real-shaped (real_tokenizers.py)."""
    return {f: real_model(f) for f in ("blip-caption", "blip2-opt", "blip2-t5")}


def images(n: int = 2) -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), c) for c in [(220, 30, 30), (30, 30, 220)][:n]]


def prompt_tokens(family: str, prompt: str) -> list[str]:
    return PROMPT_TOKENS[family].get(prompt.strip(), [])


def test_join_rule():
    from models.prompts import join_prompt

    for prompt in ("a picture of", "a picture of ", " a picture of  "):
        assert join_prompt(prompt, "red cube") == "a picture of red cube"
        assert join_prompt(prompt, " red cube ") == "a picture of red cube"
    assert join_prompt("a photo:", "red cube") == "a photo: red cube"
    assert join_prompt("", "red cube") == join_prompt(" ", "red cube") == "red cube"


@pytest.mark.parametrize("family", ["blip-caption", "blip2-opt", "blip2-t5"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_ids_are_opening_token_and_prompt_words(models, family, prompt):
    from models.prompts import Prompt

    tok = models[family][1].tokenizer
    opening = {"blip-caption": ["[CLS]"], "blip2-opt": ["</s>"], "blip2-t5": []}[family]
    ids = Prompt(tok, prompt).ids
    assert tok.convert_ids_to_tokens(ids) == opening + prompt_tokens(family, prompt)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_blip_caption_batch_on_bert_wordpiece(models, prompt):
    model, processor = models["blip-caption"]
    tok = processor.tokenizer
    dec = model.config.text_config.bos_token_id
    assert tok.convert_ids_to_tokens(dec) == "[DEC]" and dec != tok.cls_token_id  # real layout
    batch = make_task(model, processor, "caption", prompt=prompt).collate(
        list(zip(images(), CAPTIONS, strict=True)))
    head = prompt_tokens("blip-caption", prompt)
    width = batch["input_ids"].shape[1]
    for row, labels, words in zip(batch["input_ids"], batch["labels"], CAPTION_TOKENS,
                                  strict=True):
        # generate() starts from [DEC]: training must too, not from the tokenizer's [CLS].
        text = ["[DEC]", *head, *words, "[SEP]"]
        want = tok.convert_tokens_to_ids(text) + [tok.pad_token_id] * (width - len(text))
        assert row.tolist() == want
        learned = tok.convert_tokens_to_ids([*words, "[SEP]"])
        n_pad = width - len(text)
        assert labels.tolist() == [IGNORE] * (1 + len(head)) + learned + [IGNORE] * n_pad


@pytest.mark.parametrize("family", ["blip2-opt", "blip2-t5"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_blip2_batches_on_bpe_and_unigram(models, family, prompt):
    model, processor = models[family]
    tok = processor.tokenizer
    batch = make_task(model, processor, "caption", prompt=prompt).collate(
        list(zip(images(), CAPTIONS, strict=True)))
    q = model.config.num_query_tokens
    head = tok.convert_tokens_to_ids(prompt_tokens(family, prompt))
    for i, (caption, words) in enumerate(zip(CAPTIONS, CAPTION_TOKENS, strict=True)):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        real = batch["attention_mask"][i] == 1
        assert (ids[:q] == model.config.image_token_index).all()
        if family == "blip2-opt":
            # A word after a space is "Ġword": the first caption word is one only after a prompt.
            target = tok(" " + caption if head else caption, add_special_tokens=False).input_ids
            if words[0] == "a":
                assert tok.convert_ids_to_tokens(target[0]) == ("Ġa" if head else "a")
            text = [tok.bos_token_id, *head, *target, tok.eos_token_id]
            assert ids[real][q:].tolist() == text
            assert labels[real].tolist() == [IGNORE] * (q + 1 + len(head)) + text[1 + len(head):]
        else:
            # T5: the stripped prompt goes to the encoder, the caption to the decoder.
            assert ids[real][q:].tolist() == [*head, tok.eos_token_id]
            want = tok(caption).input_ids
            assert labels[labels != IGNORE].tolist() == want
            assert tok.convert_ids_to_tokens(want[:len(words)]) == ["▁" + w for w in words]


@pytest.fixture
def glued_phrase_processor():
    """BLIP's processor whose tokenizer has an added token spanning a prompt/caption
    boundary ("of a"), as a user's extended vocabulary can."""
    def make(family):
        _, processor = real_model(family)
        processor.tokenizer.add_tokens(["of a"])
        return processor
    return make


def test_prompt_changed_by_the_caption_is_refused_naming_token(models, glued_phrase_processor):
    from models.prompts import PromptError

    processor = glued_phrase_processor("blip-caption")
    collate = CaptionCollator(processor, "a picture of")
    with pytest.raises(PromptError) as e:
        collate([(images(1)[0], "a red cube", "caps.jsonl:7")])
    message = str(e.value)
    assert "caps.jsonl:7" in message and "'a picture of'" in message
    assert "'of a'" in message and "'of'" in message  # the first differing token, both ways
    collate([(images(1)[0], "the red cube", "caps.jsonl:8")])  # no boundary change: fine


def test_blip2_prompt_changed_by_the_target_is_refused_naming_token(models,
                                                                      glued_phrase_processor):
    from models.prompts import PromptError

    model, _ = models["blip2-opt"]
    processor = glued_phrase_processor("blip2-opt")
    collate = Blip2Collator.for_model(model, processor)
    with pytest.raises(PromptError) as e:
        collate([(images(1)[0], "a picture of", "a red cube", "caps.jsonl:9")])
    message = str(e.value)
    # "a picture of a red cube" -> a Ġpicture Ġ "of a" ...: token 3 differs.
    assert "caps.jsonl:9" in message and "'Ġ'" in message and "'Ġof'" in message


def test_train_py_reports_a_boundary_token_as_one_error(tmp_path, glued_phrase_processor):
    from conftest import write_tiny_dataset
    from real_tokenizers import write_real_checkpoint

    import train
    from training.errors import RunError

    model_dir = write_real_checkpoint(tmp_path / "m", "blip-caption")
    glued_phrase_processor("blip-caption").save_pretrained(model_dir)
    data = write_tiny_dataset(tmp_path / "d", n=3)  # "a red cube", ...
    with pytest.raises(RunError) as e:
        train.main(["--model", str(model_dir), "--train-file", str(data), "--eval-file", "none",
                    "--val-fraction", "0", "--epochs", "1", "--batch-size", "3",
                    "--prompt", "a picture of", "--output-dir", str(tmp_path / "run"),
                    "--threads", "1"])
    assert f"{data}:" in str(e.value) and "'of a'" in str(e.value)


def _suppressed(tokenizer, texts: list[str]) -> list[int]:
    """Every token id of ``texts`` (and the specials): what a random model must not generate,
    so a returned text can only contain the prompt if the prompt was not cut."""
    ids = {i for t in texts for i in tokenizer(t, add_special_tokens=False).input_ids}
    return sorted(ids | set(tokenizer.all_special_ids))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_blip_generation_returns_the_caption_without_the_prompt(models, num_beams):
    model, processor = models["blip-caption"]
    tok = processor.tokenizer
    prompt = "a photo:"
    gen = dict(max_new_tokens=4, min_new_tokens=4, num_beams=num_beams,
               suppress_tokens=_suppressed(tok, ["a photo:", " a photo:"]))
    captions = make_task(model, processor, "caption", prompt=prompt).predict(images(), **gen)
    # Independently: generate from [DEC] a photo : (BLIP drops the [SEP] and puts bos first)
    # and decode what follows those 4 tokens.
    pixels = processor(images=images(), return_tensors="pt")["pixel_values"]
    text = tok([prompt] * 2, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(pixel_values=pixels, input_ids=text["input_ids"],
                             attention_mask=text["attention_mask"], **gen)
    assert out[:, :4].tolist() == [tok.convert_tokens_to_ids(["[DEC]", "a", "photo", ":"])] * 2
    assert captions == [tok.decode(o[4:], skip_special_tokens=True).strip() for o in out]
    for caption in captions:
        assert caption and "photo" not in caption and ":" not in caption


@pytest.mark.parametrize("family", ["blip2-opt", "blip2-t5"])
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_blip2_generation_returns_only_new_text(models, family, num_beams, task):
    model, processor = models[family]
    tok = processor.tokenizer
    prompt = "a photo:" if task == "caption" else ""
    questions = ["what colour is the cube?"] * 2 if task == "vqa" else None
    said = ["a photo:", "Question: what colour is the cube? Answer:"]
    gen = dict(max_new_tokens=4, min_new_tokens=4, num_beams=num_beams,
               suppress_tokens=_suppressed(tok, said + [" " + s for s in said]))
    out = make_task(model, processor, task, prompt=prompt).predict(images(), questions, **gen)
    assert len(out) == 2
    for text in out:
        assert text and not any(w in text for w in ("photo", "Question", "Answer", ":"))


def test_generation_starts_from_the_training_prompt_tokens(models, monkeypatch):
    # Trailing space or not, BLIP's generate is fed exactly the tokens training masked.
    model, processor = models["blip-caption"]
    fed = []

    def spy(input_ids, **kw):
        fed.append(input_ids[0].tolist())
        return input_ids  # no new tokens: enough to see the start
    monkeypatch.setattr(model.text_decoder, "generate", spy)
    for prompt in PROMPTS:
        task = make_task(model, processor, "caption", prompt=prompt)
        batch = task.collate([(images(1)[0], CAPTIONS[0])])
        n = int((batch["labels"][0] == IGNORE).long().cumprod(0).sum())  # leading masked
        task.predict(images(1))
        assert fed[-1] == batch["input_ids"][0, :n].tolist(), prompt
