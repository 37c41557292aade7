"""BLIP captioning: training batches, the token loss, caption generation, a tiny Python API.

Training text is the prompt and the caption joined by one space (models/prompts.py); the
prompt's tokens (and padding) are -100 in ``labels`` so only the caption is learned (as LAVIS
does with "a picture of "). Generation starts from the same prompt tokens and cuts exactly
that many tokens from what it returns. A text longer than ``max_length`` is cut (see
models/truncation.py): its kept caption tokens are learned, its [SEP] is not.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from PIL import Image
from transformers import BlipProcessor, PreTrainedModel

from .loss import IGNORE
from .prompts import Prompt, PromptError
from .truncation import TruncationLog, cut_rows, mask_cut_ends

log = logging.getLogger(__name__)
_WARNED: set[tuple[int, int]] = set()  # (start, max_new_tokens) settings already warned about


class CaptionItem(NamedTuple):
    """One training caption; ``source`` ("file:line") names it in truncation warnings."""

    image: Image.Image
    text: str
    source: str | None = None


@dataclass
class CaptionCollator:
    """(PIL image, caption[, source]) items -> BLIP batch with ``labels`` masked on prompt and
    padding; ``max_length`` must not exceed the text model's position table."""

    processor: BlipProcessor
    prompt: str = ""
    max_length: int = 64
    # generate() starts from bos_token_id; real BLIP checkpoints use [DEC] there, not the
    # tokenizer's [CLS], so training must too (the model's forward does not replace it).
    bos_token_id: int | None = None
    truncations: TruncationLog = field(default_factory=TruncationLog)

    def __post_init__(self) -> None:
        # [CLS] + prompt tokens, masked in labels; [CLS] is checked, then replaced by bos.
        self.prompt_tokens = Prompt(self.processor.tokenizer, self.prompt)

    def __call__(self, items: Sequence[tuple]) -> dict[str, torch.Tensor]:
        items = [CaptionItem(*it) for it in items]  # plain (image, caption) pairs too
        texts = [self.prompt_tokens.join(it.text) for it in items]
        enc = self.processor(images=[it.image for it in items], text=texts, padding="longest",
                             truncation=True, max_length=self.max_length, return_tensors="pt")
        for row, n, it in zip(enc["input_ids"], enc["attention_mask"].sum(1), items, strict=True):
            self.prompt_tokens.check(row[:n].tolist(), it.source, it.text)
        if self.bos_token_id is not None:
            enc["input_ids"][:, 0] = self.bos_token_id
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE)
        # A prompt as long as the window leaves no target at all: a batch row with 0 targets.
        labels[:, : len(self.prompt_tokens)] = IGNORE
        cut = cut_rows(self.processor.tokenizer, texts, enc["attention_mask"].sum(1),
                       self.max_length)
        mask_cut_ends(labels, enc["attention_mask"], cut, IGNORE)
        for it, c in zip(items, cut, strict=True):
            if c:
                self.truncations.report(it.source, [f"prompt + caption to {self.max_length} "
                                                    "tokens"], it.text)
        return {"pixel_values": enc["pixel_values"], "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"], "labels": labels}


def fit_new_tokens(model: PreTrainedModel, start: int, max_new_tokens: int, what: str) -> int:
    """``max_new_tokens`` lowered so ``start`` tokens (bos + prompt) plus the generated ones fit
    BLIP's text position table (beyond it generate fails with an IndexError); a PromptError
    when the start alone fills it."""
    limit = model.config.text_config.max_position_embeddings
    if start >= limit:
        raise PromptError(f"{what} takes {start} tokens with the start token, and "
                          f"{type(model).__name__}'s text model has {limit} positions: shorten "
                          f"the text (--prompt) to under {limit - 1} tokens")
    if start + max_new_tokens <= limit:
        return max_new_tokens
    if (start, max_new_tokens) not in _WARNED:  # once per setting, not once per batch
        _WARNED.add((start, max_new_tokens))
        log.warning("--max-new-tokens %d lowered to %d: %s (%d tokens with the start token) "
                    "and the generated text must fit the text model's %d positions",
                    max_new_tokens, limit - start, what, start, limit)
    return limit - start


@torch.no_grad()
def generate_captions(
    model: PreTrainedModel,
    processor: BlipProcessor,
    images: Sequence[Image.Image],
    prompt: str = "",
    max_new_tokens: int = 30,
    num_beams: int = 1,
    do_sample: bool = False,
    top_p: float = 1.0,
    temperature: float = 1.0,
    **generate_kwargs: Any,
) -> list[str]:
    """Caption ``images`` (one batch); returns the text after the prompt.

    BLIP's generate starts from bos + ``prompt``'s tokens (it replaces [CLS] and drops the
    closing [SEP]) and returns them in front of the caption: cut by token count. Other
    ``generate_kwargs`` go to ``model.generate``.
    """
    device = next(model.parameters()).device
    inputs = processor(images=list(images), return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    head = Prompt(processor.tokenizer, prompt)
    max_new_tokens = fit_new_tokens(model, len(head), max_new_tokens, "the prompt")
    if head.text:
        text = processor.tokenizer([head.text] * len(images), return_tensors="pt").to(device)
        inputs.update(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    sampling = dict(do_sample=True, top_p=top_p, temperature=temperature) if do_sample else {}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams,
                         **sampling, **generate_kwargs)
    return [t.strip() for t in processor.batch_decode(head.cut(out), skip_special_tokens=True)]
