"""BLIP-2 (OPT or Flan-T5 language model): training batches, the token loss, generation.

Items are ``(image, prompt, target)``: captioning uses prompt "" (or "a photo of"), VQA uses
"Question: {q} Answer:". Only target tokens are learned. Prompts are stripped, and joined to
their target by one space (models/prompts.py), in training and generation alike.

* Decoder-only (OPT): ``input_ids = [<image>×Q] </s> prompt target </s>``; ``labels`` are
  ``input_ids`` with image tokens, the prompt (with its BOS) and padding set to -100, aligned
  position for position so that logits[:, t] predicts labels[:, t + 1] (the model's own shift).
  The prompt's tokens must be the joined text's first ones (checked: a PromptError otherwise).
* Encoder-decoder (T5): ``input_ids = [<image>×Q] prompt </s>``, ``labels = target </s>``; the
  decoder input is ``labels`` shifted right (decoder start = pad), as T5 does internally.

transformers (checked on 5.23 and 5.24) scatters the Q-Former outputs into the embeddings of the
``Q`` image tokens that Blip2Processor puts in front of the text; ``model.config.image_token_index``
must name that token, or the image is silently (partly) ignored: ``check_compatible`` fails
loudly instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from .loss import IGNORE, token_loss_sum
from .prompts import Prompt
from .truncation import TruncationLog, cut_rows, mask_cut_ends


def is_encoder_decoder(model: Blip2ForConditionalGeneration) -> bool:
    """Whether the language model is an encoder-decoder (Flan-T5) rather than decoder-only."""
    return not model.config.use_decoder_only_language_model


def image_token_id(processor: Blip2Processor) -> int:
    """Id of the processor's image placeholder token."""
    return processor.tokenizer.convert_tokens_to_ids(str(processor.image_token))


def check_compatible(model: Blip2ForConditionalGeneration, processor: Blip2Processor) -> None:
    """Raise if processor and model disagree on the image token or the query-token count."""
    want = (model.config.image_token_index, model.config.num_query_tokens)
    have = (image_token_id(processor), processor.num_query_tokens)
    if want != have:
        raise ValueError(f"model expects (image_token_index, num_query_tokens) = {want}, the "
                         f"processor makes {have}: the image would be ignored or misplaced")


def max_sequence_length(model: Blip2ForConditionalGeneration) -> int | None:
    """The longest ``input_ids`` (image tokens included) the language model takes, or None.

    OPT's learned position table covers the whole sequence, image tokens and text alike
    (positions follow the attention mask). T5 has relative position buckets, no table: no
    length overflows it (cost and the lengths it was trained on are the limits there).
    """
    if is_encoder_decoder(model):
        return None
    return model.config.text_config.max_position_embeddings


class Blip2Item(NamedTuple):
    """One training example; ``source`` ("file:line") names it in truncation warnings."""

    image: Image.Image
    prompt: str
    target: str
    source: str | None = None


@dataclass
class Blip2Collator:
    """(image, prompt, target[, source]) items -> BLIP-2 batch, ``labels`` on target tokens only.

    ``max_length`` counts the image tokens too (Blip2Processor subtracts them for the text); T5's
    targets (decoder side, no image tokens) are cut to ``max_length`` on their own. A cut
    target's kept tokens are learned, its end token is not; a prompt that fills the window
    leaves the row without targets.
    """

    processor: Blip2Processor
    max_length: int = 64
    encoder_decoder: bool = False
    truncations: TruncationLog = field(default_factory=TruncationLog)

    def __post_init__(self) -> None:
        self.text_length = self.max_length - (self.processor.num_query_tokens or 0)
        if self.text_length < 1:
            raise ValueError(f"max_length {self.max_length} leaves no room for text after the "
                             f"{self.processor.num_query_tokens} image tokens")

    @classmethod
    def for_model(cls, model: Blip2ForConditionalGeneration, processor: Blip2Processor,
                  max_length: int = 64) -> Blip2Collator:
        """A collator matching ``model``'s language-model family, after check_compatible."""
        check_compatible(model, processor)
        return cls(processor, max_length, is_encoder_decoder(model))

    def __call__(self, items: Sequence[tuple]) -> dict[str, torch.Tensor]:
        items = [Blip2Item(*it) for it in items]  # plain (image, prompt, target) triples too
        images, targets = [it.image for it in items], [it.target for it in items]
        tok = self.processor.tokenizer
        by_text = {p: Prompt(tok, p) for p in {it.prompt for it in items}}
        heads = [by_text[it.prompt] for it in items]
        prompts = [h.text for h in heads]
        common = dict(padding="longest", truncation=True, return_tensors="pt")
        if self.encoder_decoder:
            enc = self.processor(images=images, text=prompts, max_length=self.max_length,
                                 **common)
            dec = tok(targets, max_length=self.max_length, **common)
            labels = dec["input_ids"].masked_fill(dec["attention_mask"] == 0, IGNORE)
            cut_prompt = cut_rows(tok, prompts, self._text_mask(enc).sum(1), self.text_length)
            cut_target = cut_rows(tok, targets, dec["attention_mask"].sum(1), self.max_length)
            mask_cut_ends(labels, dec["attention_mask"], cut_target, IGNORE)
            self._report(items, {f"prompt to {self.text_length} tokens": cut_prompt,
                                 f"target to {self.max_length} tokens": cut_target})
            return {**enc, "labels": labels}
        texts = [h.join(t) + tok.eos_token for h, t in zip(heads, targets, strict=True)]
        # Right padding: the loss ignores pads, and positions of real tokens stay 0..n-1.
        enc = self.processor(images=images, text=texts, max_length=self.max_length,
                             padding_side="right", **common)
        ids, text = enc["input_ids"], self._text_mask(enc)
        for row, mask, head, it in zip(ids, text, heads, items, strict=True):
            head.check(row[mask].tolist(), it.source, it.target)
        rank = text.cumsum(1)  # 1-based index of each real text token in its row
        n_prompt = torch.tensor([len(h) for h in heads])  # </s> (BOS) + prompt tokens
        # A cut text loses its </s> (it ends the string) and, when the prompt fills the window,
        # every target token: such a row has no labels.
        in_prompt = text & (rank <= n_prompt[:, None])
        labels = ids.masked_fill(~text | in_prompt, IGNORE)
        self._report(items, {f"prompt + target to {self.text_length} tokens after the image "
                             "tokens": cut_rows(tok, texts, text.sum(1), self.text_length)})
        return {**enc, "labels": labels}

    def _text_mask(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) True on real text tokens: not padding, not an image token."""
        return (enc["attention_mask"] == 1) & (enc["input_ids"] != image_token_id(self.processor))

    def _report(self, items: list[Blip2Item], cuts: dict[str, list[bool]]) -> None:
        for i, it in enumerate(items):
            self.truncations.report(it.source, [part for part, cut in cuts.items() if cut[i]],
                                    it.prompt + " " + it.target)


def model_inputs(model: Blip2ForConditionalGeneration,
                 batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` without labels, for ``model(**...)``; T5 gets decoder_input_ids from labels."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if is_encoder_decoder(model):
        # What T5 builds from labels itself: shifted right, decoder start = pad, -100 -> pad.
        inputs["decoder_input_ids"] = model.language_model.prepare_decoder_input_ids_from_labels(
            batch["labels"])
    return inputs


def blip2_loss_sum(model: Blip2ForConditionalGeneration, batch: dict[str, torch.Tensor],
                   label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """(sum of target-token cross-entropies in fp32, number of target tokens) for one batch.

    Dividing the sums of a whole accumulation window by its token count gives the exact mean,
    which averaging per-batch means does not when batches hold different numbers of tokens.
    """
    logits = model(**model_inputs(model, batch), use_cache=False).logits
    # T5's decoder position t predicts labels[:, t]; OPT's position t predicts t + 1.
    return token_loss_sum(logits, batch["labels"], label_smoothing,
                          shift=not is_encoder_decoder(model))


@torch.no_grad()
def blip2_generate(model: Blip2ForConditionalGeneration, processor: Blip2Processor,
                   images: Sequence[Image.Image], prompts: str | Sequence[str],
                   max_new_tokens: int = 30, num_beams: int = 1, do_sample: bool = False,
                   top_p: float = 1.0, temperature: float = 1.0, **kw) -> list[str]:
    """Answer/caption ``images`` given ``prompts`` (one, or one per image); new text only.

    The prompts are stripped, as in training. OPT's generate returns its whole input (image
    tokens, padding, prompt) in front of the new tokens: cut by that token count. T5's
    decoder output holds new tokens only.
    """
    check_compatible(model, processor)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    enc_dec = is_encoder_decoder(model)
    # OPT continues the last prompt token, so pad on the left (its positions follow the
    # attention mask); T5's relative positions would shift, so it pads on the right.
    enc = processor(images=list(images), text=[p.strip() for p in prompts], padding="longest",
                    padding_side="right" if enc_dec else "left", return_tensors="pt")
    enc = enc.to(next(model.parameters()).device)
    enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    # Sampling settings only when sampling: generate warns about them otherwise.
    sampling = dict(do_sample=True, top_p=top_p, temperature=temperature) if do_sample else {}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=num_beams, **sampling,
                         **kw)
    if not enc_dec:
        out = out[:, enc["input_ids"].shape[1]:]  # (B, new tokens)
    return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
