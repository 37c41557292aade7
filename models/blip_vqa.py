"""BLIP VQA (BlipForQuestionAnswering): training batches, answer logits, answer generation.

The model encodes the image (ViT), then the question with cross-attention to the image
(text_encoder), then decodes the answer with cross-attention to the question (text_decoder).
Its own ``forward`` returns no logits, and its ``generate`` attends to question padding; both
paths are written out here with the question mask applied consistently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BlipForQuestionAnswering, BlipProcessor

from .loss import IGNORE, token_loss_sum
from .truncation import TruncationLog, cut_rows, mask_cut_ends


def cross_attention_mask_effect(model: BlipForQuestionAnswering) -> tuple[float, float]:
    """(max |change| of the answer decoder's logits when a masked encoder state changes, when
    an unmasked one changes): a one-token decoder pass against three question states, the last
    masked out. The first is 0 where the cross-attention honours ``encoder_attention_mask``;
    the second shows the probe can see the encoder states at all. Global RNG untouched."""
    dec = model.text_decoder
    cfg = model.config.text_config
    gen = torch.Generator().manual_seed(0)
    # (variant, B=1, Tq=3, H): 0 the reference, 1 its masked state changed, 2 an unmasked one
    states = torch.randn(1, 1, 3, cfg.encoder_hidden_size, generator=gen).repeat(3, 1, 1, 1)
    states[1, :, 2] = 10 * torch.randn(cfg.encoder_hidden_size, generator=gen)
    states[2, :, 0] = 10 * torch.randn(cfg.encoder_hidden_size, generator=gen)
    states = states.to(dec.device, dec.dtype)
    ids = torch.full((1, 1), cfg.bos_token_id, device=dec.device)
    mask = torch.tensor([[1, 1, 0]], device=dec.device)
    was_training = dec.training
    dec.eval()
    try:
        with torch.no_grad():
            logits = [dec(input_ids=ids, encoder_hidden_states=s, encoder_attention_mask=mask,
                          use_cache=False).logits.float() for s in states]
    finally:
        dec.train(was_training)
    return ((logits[1] - logits[0]).abs().max().item(),
            (logits[2] - logits[0]).abs().max().item())


def restore_cross_attention_masks(model: BlipForQuestionAnswering) -> int:
    """Make BLIP's text cross-attention honour ``encoder_attention_mask`` where it does not;
    returns the number of pre-hooks added (0 where the mask already reaches the attention).

    transformers 5.23 and 5.24: BlipTextLayer hands the cross-attention mask to
    BlipTextSelfAttention as ``attention_mask``, which then discards it (it reads
    ``encoder_attention_mask`` for cross-attention), so the answer decoder attends to question
    padding and a batched answer depends on its neighbours' question lengths. A pre-hook passes
    the mask on under the name read. Whether it is needed is decided by behaviour, on this
    model (``cross_attention_mask_effect``), not by version; after hooking, the mask must work,
    else RuntimeError. If the probe cannot see the encoder states (e.g. all-zero cross-attention
    key/value weights, which LoRA may later change), the hooks are added unverified: where the
    mask already works they pass on nothing new. Captioning is unaffected (its encoder states,
    the image patches, have no padding).
    """
    masked, unmasked = cross_attention_mask_effect(model)
    conclusive = unmasked > 0
    if conclusive and masked <= 1e-3 * unmasked:
        return 0  # the mask already reaches the cross-attention

    def pass_mask(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("encoder_attention_mask") is None:
            kwargs["encoder_attention_mask"] = kwargs.get("attention_mask")
        return args, kwargs

    names = [n for n, _ in model.named_modules() if n.endswith("crossattention.self")]
    handles = [model.get_submodule(n).register_forward_pre_hook(pass_mask, with_kwargs=True)
               for n in names]
    if conclusive:
        masked, unmasked = cross_attention_mask_effect(model)
        if masked > 1e-3 * unmasked:
            for h in handles:
                h.remove()
            raise RuntimeError(
                "BLIP's text cross-attention ignores encoder_attention_mask (answers would attend "
                "to question padding) and the pre-hook workaround no longer fixes it in this "
                f"transformers: masked states change the logits by {masked:.3g}")
    return len(handles)


class VQAItem(NamedTuple):
    """One training question; ``source`` ("file:line") names it in truncation warnings."""

    image: Image.Image
    question: str
    answer: str
    source: str | None = None


class WeightedVQAItem(NamedTuple):
    """One training question with every answer it trains on and their weights
    (data/vqa_targets.answer_weights)."""

    image: Image.Image
    question: str
    answers: tuple[str, ...]
    weights: tuple[float, ...]
    source: str | None = None


@dataclass
class VQACollator:
    """Items -> question inputs + answer ids and labels.

    VQAItem (or plain (image, question, answer) triples): one answer row per question.
    WeightedVQAItem: one answer row per (question, answer), plus ``answer_question`` (A,), the
    question each row answers, and ``answer_weight`` (A,); the question is encoded once and
    its states repeated per answer in the loss (weighted_vqa_loss_sum), as BLIP does.
    Questions and answers are each cut to ``max_length`` tokens (the text encoder and decoder
    each have that many positions at most); a cut answer's kept tokens are learned, its [SEP]
    is not.
    """

    processor: BlipProcessor
    bos_token_id: int  # the answer decoder starts from this id, as in generate
    max_length: int = 40
    truncations: TruncationLog = field(default_factory=TruncationLog)

    def __call__(self, items: Sequence[tuple]) -> dict[str, torch.Tensor]:
        weighted = {isinstance(it, WeightedVQAItem) for it in items}
        if len(weighted) > 1:
            raise ValueError("a VQA batch mixes weighted and single-answer items")
        if weighted == {True}:
            text = self.weighted_text([it.question for it in items], [it.answers for it in items],
                                      [it.weights for it in items], [it.source for it in items])
        else:
            items = [VQAItem(*it) for it in items]  # plain (image, question, answer) triples too
            text = self.text([it.question for it in items], [it.answer for it in items],
                             [it.source for it in items])
        pixels = self.processor.image_processor(images=[it.image for it in items],
                                                return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"], **text}

    def _tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.processor.tokenizer(list(texts), padding="longest", truncation=True,
                                        max_length=self.max_length, return_tensors="pt")

    def answer_tensors(self, answers: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """({answer_ids (from bos), answer_mask, labels}, which answers were cut)."""
        ans = self._tokenize(answers)
        answer_ids = ans["input_ids"].clone()
        answer_ids[:, 0] = self.bos_token_id
        labels = answer_ids.masked_fill(ans["attention_mask"] == 0, IGNORE)
        cut = cut_rows(self.processor.tokenizer, answers, ans["attention_mask"].sum(1),
                       self.max_length)
        mask_cut_ends(labels, ans["attention_mask"], cut, IGNORE)
        return {"answer_ids": answer_ids, "answer_mask": ans["attention_mask"],
                "labels": labels}, cut

    def _questions(self, questions: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[bool]]:
        enc = self._tokenize(questions)
        cut = cut_rows(self.processor.tokenizer, questions, enc["attention_mask"].sum(1),
                       self.max_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, cut

    def _report(self, questions: Sequence[str], cut_q: Sequence[bool], cut_a: Sequence[bool],
                sources: Sequence[str | None] | None) -> None:
        for i, (q, a) in enumerate(zip(cut_q, cut_a, strict=True)):
            parts = [f"{name} to {self.max_length} tokens"
                     for name, c in (("question", q), ("answer", a)) if c]
            self.truncations.report(sources[i] if sources else None, parts, questions[i])

    def text(self, questions: Sequence[str], answers: Sequence[str],
             sources: Sequence[str | None] | None = None) -> dict[str, torch.Tensor]:
        """The batch without its images: question inputs, answer ids (from bos) and labels;
        ``sources`` name the samples in truncation warnings."""
        enc, cut_q = self._questions(questions)
        ans, cut_a = self.answer_tensors(answers)
        self._report(questions, cut_q, cut_a, sources)
        return {**enc, **ans}

    def weighted_text(self, questions: Sequence[str], answers: Sequence[Sequence[str]],
                      weights: Sequence[Sequence[float]],
                      sources: Sequence[str | None] | None = None) -> dict[str, torch.Tensor]:
        """As ``text`` with several weighted answers per question: answer rows (A, Ta) in
        question order, ``answer_question`` (A,) and ``answer_weight`` (A,)."""
        if any(len(a) != len(w) or not a for a, w in zip(answers, weights, strict=True)):
            raise ValueError("each question needs one weight per answer, and an answer")
        enc, cut_q = self._questions(questions)
        ans, cut = self.answer_tensors([a for row in answers for a in row])
        index = [i for i, row in enumerate(answers) for _ in row]
        cut_a = [any(c for c, i in zip(cut, index, strict=True) if i == q)
                 for q in range(len(questions))]
        self._report(questions, cut_q, cut_a, sources)
        return {**enc, **ans, "answer_question": torch.tensor(index),
                "answer_weight": torch.tensor([w for row in weights for w in row],
                                              dtype=torch.float32)}


def encode_question(model: BlipForQuestionAnswering, pixel_values: torch.Tensor,
                    input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    image_index: torch.Tensor | None = None) -> torch.Tensor:
    """Question states (B, Tq, H) conditioned on the image.

    ``image_index`` (B,), optional: question i is about image ``image_index[i]`` of
    ``pixel_values`` (N, 3, H, W), so an image asked several questions is encoded once. The
    vision tower sees each image on its own, so this equals passing every question its image.
    """
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state  # (N, P, H)
    if image_index is not None:
        image_embeds = image_embeds[image_index]  # (B, P, H)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    return model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                              encoder_hidden_states=image_embeds,
                              encoder_attention_mask=image_mask).last_hidden_state


def answer_logits(model: BlipForQuestionAnswering, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Decoder logits (B, Ta, V) for the answer tokens, teacher-forced (``batch`` may hold an
    ``image_index``, as in encode_question)."""
    question = encode_question(model, batch["pixel_values"], batch["input_ids"],
                               batch["attention_mask"], batch.get("image_index"))
    return model.text_decoder(input_ids=batch["answer_ids"], attention_mask=batch["answer_mask"],
                              encoder_hidden_states=question,
                              encoder_attention_mask=batch["attention_mask"]).logits


def vqa_loss_sum(model: BlipForQuestionAnswering, batch: dict[str, torch.Tensor],
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """(summed answer-token cross-entropy, answer-token count); a weighted batch (one with
    ``answer_weight``) gives weighted_vqa_loss_sum's (loss, question count) instead."""
    if "answer_weight" in batch:
        return weighted_vqa_loss_sum(model, batch, label_smoothing)
    return token_loss_sum(answer_logits(model, batch), batch["labels"], label_smoothing)


def weighted_vqa_loss_sum(model: BlipForQuestionAnswering, batch: dict[str, torch.Tensor],
                          label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """(sum over answer rows of weight x the answer's mean token cross-entropy, number of
    questions with a target token): divided, the weighted loss per question.

    BLIP's loss is sum_a w_a * NLL_a / batch size with NLL_a summed over the answer's tokens;
    here NLL_a is the mean over its tokens, so a long answer does not outweigh a short one of
    the same weight, and a one-answer question's loss is its answer's token-mean loss. An answer
    with no target token (cut to nothing) adds 0.
    """
    question = encode_question(model, batch["pixel_values"], batch["input_ids"],
                               batch["attention_mask"], batch.get("image_index"))  # (B, Tq, H)
    rows = batch["answer_question"]  # (A,): the question states repeated per answer
    logits = model.text_decoder(input_ids=batch["answer_ids"], attention_mask=batch["answer_mask"],
                                encoder_hidden_states=question[rows],
                                encoder_attention_mask=batch["attention_mask"][rows]).logits
    targets = batch["labels"][:, 1:]  # (A, Ta - 1): logits[:, t] predicts labels[:, t + 1]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                          ignore_index=IGNORE, reduction="none",
                          label_smoothing=label_smoothing).view(targets.shape)
    per_answer = nll.sum(1) / (targets != IGNORE).sum(1).clamp(min=1)  # (A,)
    # train.forward_loss casts float inputs to the base's dtype: with an fp16/bf16 base the
    # weights arrive rounded to it (0.7 -> 0.6992 in bf16), then are summed in fp32
    return (batch["answer_weight"].float() * per_answer).sum(), weighted_question_count(batch)


def weighted_question_count(batch: dict[str, torch.Tensor]) -> int:
    """Questions of a weighted batch with at least one target token: the loss's denominator
    (known before the forward pass)."""
    learnable = (batch["labels"][:, 1:] != IGNORE).any(1)  # (A,)
    return int(batch["answer_question"][learnable].unique().numel())


def question_states(model: BlipForQuestionAnswering, processor: BlipProcessor,
                    images: Sequence[Image.Image],
                    questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(question states (B, Tq, H), question mask (B, Tq)) of (image, question) pairs."""
    device = next(model.parameters()).device
    enc = processor(images=list(images), text=list(questions), padding="longest",
                    return_tensors="pt").to(device)
    return encode_question(model, enc["pixel_values"].to(model.dtype), enc["input_ids"],
                           enc["attention_mask"]), enc["attention_mask"]


@torch.no_grad()
def vqa_generate(model: BlipForQuestionAnswering, processor: BlipProcessor,
                 images: Sequence[Image.Image], questions: Sequence[str],
                 max_new_tokens: int = 10, num_beams: int = 1, do_sample: bool = False,
                 top_p: float = 1.0, temperature: float = 1.0, **kw) -> list[str]:
    """One answer per (image, question) pair; the decoder's start token (bos) is cut off."""
    question, mask = question_states(model, processor, images, questions)
    cfg = model.config.text_config
    start = torch.full((len(images), 1), cfg.bos_token_id, device=question.device)
    # Sampling settings only when sampling: generate warns about them otherwise.
    sampling = dict(do_sample=True, top_p=top_p, temperature=temperature) if do_sample else {}
    out = model.text_decoder.generate(
        input_ids=start, eos_token_id=cfg.sep_token_id, pad_token_id=cfg.pad_token_id,
        encoder_hidden_states=question, encoder_attention_mask=mask,
        max_new_tokens=max_new_tokens, num_beams=num_beams, **sampling, **kw)
    out = out[:, start.shape[1]:]  # (B, new tokens)
    return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
