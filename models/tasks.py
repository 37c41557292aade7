"""Tasks: what each (model family, task) pair trains on and predicts, in one explicit table.

A Task turns loaded samples into training items, items into batches, batches into a summed
token loss, and images (+ questions) into predicted text. train.py and infer.py only talk to
this interface, so captioning, VQA and BLIP-2 share one loop.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm
from transformers import PreTrainedModel

from data.formats import CaptionSample, DataFormatError, load_caption_samples, load_image
from data.vqa_formats import VQASample, load_vqa_samples
from data.vqa_targets import answer_weights, majority_answer, resolve_targets

from .answer_ranking import DEFAULT_TOP_K, rank_vqa, tokenize_candidates
from .blip2 import (
    Blip2Collator,
    Blip2Item,
    blip2_generate,
    blip2_loss_sum,
    is_encoder_decoder,
    max_sequence_length,
)
from .blip_vqa import (
    VQACollator,
    VQAItem,
    WeightedVQAItem,
    vqa_generate,
    vqa_loss_sum,
    weighted_question_count,
)
from .captioning import CaptionCollator, CaptionItem, fit_new_tokens, generate_captions
from .loss import count_targets, token_loss_sum
from .prompts import BLIP2_VQA_PROMPT
from .truncation import TruncationLog

log = logging.getLogger(__name__)
Sample = CaptionSample | VQASample
DEFAULT_MAX_LENGTH = 64  # tokens per training text when the caller names no limit


def model_max_length(model: PreTrainedModel) -> int | None:
    """The most tokens one training text may have in ``model``, or None where nothing bounds it.

    BLIP: the text model's position table (captions; VQA questions and answers, each on its
    own). BLIP-2: see blip2.max_sequence_length (counts the image tokens, as max_length does).
    """
    if type(model).__name__.startswith("Blip2"):
        return max_sequence_length(model)
    return model.config.text_config.max_position_embeddings


@dataclass
class Task:
    """One family's way of doing one task; build it with make_task."""

    name: str  # "caption" or "vqa"
    family: str  # "blip" or "blip2"
    collate: Callable[[list], dict[str, torch.Tensor]]
    loss_sum: Callable[[PreTrainedModel, dict, float], tuple[torch.Tensor, int]]
    _predict: Callable[..., list[str]]
    prompt: str = ""
    shifted_labels: bool = True  # logits[:, t] predicts labels[:, t + 1] (all but BLIP-2 T5)
    max_length: int = DEFAULT_MAX_LENGTH  # tokens per text the collator keeps (see make_task)
    truncations: TruncationLog | None = None  # the collator's: samples it cut, counted
    vqa_targets: str = "majority"  # "weighted": every answer, by its share (choose_vqa_targets)

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """Target tokens in a batch (questions in a weighted VQA batch, whose loss is a mean
        per question), the denominator of exact accumulation."""
        if "answer_weight" in batch:
            return weighted_question_count(batch)
        return count_targets(batch["labels"], self.shifted_labels)

    def choose_vqa_targets(self, mode: str, samples: Sequence[Sample]) -> str:
        """Train VQA on each question's majority answer or on all its answers weighted by
        their share (data/vqa_targets.py); ``mode`` "auto" picks weighted where ``samples``
        have VQA v2's 10 answers. Returns the mode used; only BLIP VQA trains weighted."""
        if self.name != "vqa":
            if mode != "auto":
                raise DataFormatError(f"--vqa-targets {mode} applies to VQA (--task vqa), not "
                                      "captions")
            return "none"
        used = resolve_targets(mode, samples)
        if used == "weighted" and self.family != "blip":
            if mode == "weighted":
                raise DataFormatError("--vqa-targets weighted: BLIP-2 trains on the majority "
                                      "answer only (weighted targets are BLIP VQA's protocol)")
            used = "majority"
        log.info("VQA targets: %s%s", "auto -> " if mode == "auto" else "", used)
        self.vqa_targets = used
        return used

    def load_samples(self, path: str | Path, skip_bad_samples: bool = False,
                     image_root: str | Path | None = None,
                     annotations: str | Path | None = None):
        """(samples, skip report) from any supported file format of this task.

        ``annotations`` names a VQA v2 annotations file (VQA only)."""
        if self.name == "caption":
            if annotations is not None:
                raise DataFormatError(f"{path}: --annotations applies to VQA v2 data "
                                      "(--task vqa), not captions")
            return load_caption_samples(path, skip_bad_samples=skip_bad_samples,
                                        image_root=image_root)
        return load_vqa_samples(path, skip_bad_samples=skip_bad_samples, image_root=image_root,
                                annotations=annotations)

    def item(self, sample: Sample,
             image: Image.Image) -> CaptionItem | VQAItem | WeightedVQAItem:
        """The training item of one sample: (image, caption, source), (image, question,
        answer, source), or with weighted VQA targets (image, question, answers, weights,
        source); the source names the sample if the collator has to cut its text."""
        if self.name == "caption":
            return CaptionItem(image, sample.text, sample.source)
        if self.vqa_targets == "weighted":
            return WeightedVQAItem(image, sample.question, *answer_weights(sample.answers),
                                   sample.source)
        return VQAItem(image, sample.question, majority_answer(sample.answers), sample.source)

    def predict(self, images: Sequence[Image.Image], questions: Sequence[str] | None = None,
                **generate_kwargs: Any) -> list[str]:
        """Captions for ``images``, or answers to one question per image."""
        if (self.name == "vqa") != (questions is not None):
            raise ValueError(f"task {self.name!r}: questions must be given exactly for VQA")
        if generate_kwargs.get("answer_list") is not None and (self.family, self.name) != (
                "blip", "vqa"):
            raise ValueError("an answer list ranks BLIP VQA answers: it does not apply to "
                             f"{self.family} {self.name}")
        return self._predict(images, questions, **generate_kwargs)

    def predict_units(self, units: Sequence[tuple[Sample, set[str]]], batch_size: int,
                      desc: str = "predict", show_progress: bool = True,
                      **generate_kwargs: Any) -> list[str]:
        """One prediction per evaluation unit, ``batch_size`` images per generate call."""
        preds: list[str] = []
        for i in tqdm(range(0, len(units), batch_size), desc=desc, leave=False,
                      disable=not show_progress):
            chunk = [s for s, _ in units[i : i + batch_size]]
            questions = [s.question for s in chunk] if self.name == "vqa" else None
            preds += self.predict([load_image(s.image) for s in chunk], questions,
                                  **generate_kwargs)
        return preds

    def eval_units(self, samples: Sequence[Sample]) -> list[tuple[Sample, list[str]]]:
        """(sample to predict for, its references): per image for captions (every caption of
        the image), per question for VQA (every answer). Whether a prediction is right is
        evaluation.is_correct's to say, not the task's."""
        if self.name == "vqa":
            return [(s, list(s.answers)) for s in samples]
        refs: dict[Path, tuple[Sample, list[str]]] = {}
        for s in samples:
            refs.setdefault(s.image, (s, []))[1].append(s.text)
        return list(refs.values())


class TaskDataset(Dataset):
    """Samples -> task items, images decoded on access."""

    def __init__(self, samples: Sequence[Sample], task: Task) -> None:
        self.samples, self.task = list(samples), task

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple:
        return self.task.item(self.samples[i], load_image(self.samples[i].image))


def _without_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def effective_max_length(model: PreTrainedModel, max_length: int | None) -> int:
    """``max_length`` (default DEFAULT_MAX_LENGTH) lowered to what ``model`` takes; says so
    once when an explicit request is lowered."""
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
    limit = model_max_length(model)
    wanted = DEFAULT_MAX_LENGTH if max_length is None else max_length
    if limit is None or wanted <= limit:
        return wanted
    if max_length is not None:
        # info, not a warning: the shipped tiny models (40 positions) lower the default 64.
        log.info("--max-length %d lowered to %d: %s's text model has %d positions", max_length,
                 limit, type(model).__name__, limit)
    return limit


def fit_questions(tokenizer: Any, questions: Sequence[str], positions: int) -> list[str]:
    """``questions`` cut to what a text model of ``positions`` positions takes with its special
    tokens (a longer one overflows the position table); a warning for each one cut."""
    room = positions - tokenizer.num_special_tokens_to_add()
    fitted = []
    for q in questions:
        ids = tokenizer(q, add_special_tokens=False).input_ids
        if len(ids) > room:
            log.warning("question %r has %d tokens: cut to its first %d (the model's text side "
                        "has %d positions)", q if len(q) <= 60 else q[:57] + "...", len(ids),
                        room, positions)
            q = tokenizer.decode(ids[:room])
        fitted.append(q)
    return fitted


def make_task(model: PreTrainedModel, processor: Any, task: str, prompt: str = "",
              max_length: int | None = None) -> Task:
    """The Task for ``model``'s family; ``prompt`` prefixes captions (BLIP, BLIP-2), joined
    by one space (models/prompts.py); VQA takes none (BLIP-2 asks BLIP2_VQA_PROMPT).

    ``max_length`` caps each training text in tokens (None: DEFAULT_MAX_LENGTH); it is lowered
    to what the model's text side takes (``Task.max_length`` holds the value used), and the
    collators cut longer texts with one warning per sample.
    """
    family = "blip2" if type(model).__name__.startswith("Blip2") else "blip"
    bos = model.config.text_config.bos_token_id if family == "blip" else None
    max_length = effective_max_length(model, max_length)
    if task == "vqa" and prompt.strip():
        asked = (f"BLIP-2 asks each question as {BLIP2_VQA_PROMPT!r}" if family == "blip2"
                 else "BLIP VQA reads the question alone")
        raise ValueError(f"a prompt ({prompt!r}) applies to captioning only: {asked}")
    if (family, task) == ("blip", "caption"):
        collator = CaptionCollator(processor, prompt, max_length, bos_token_id=bos)
        return Task(
            task, family, collator,
            lambda m, b, ls: token_loss_sum(m(**_without_labels(b)).logits, b["labels"], ls),
            lambda images, _, **kw: generate_captions(model, processor, images, prompt, **kw),
            prompt, max_length=max_length, truncations=collator.truncations)
    if (family, task) == ("blip", "vqa"):
        collator = VQACollator(processor, bos, max_length)
        positions = model.config.text_config.max_position_embeddings

        candidates = functools.lru_cache(maxsize=1)(functools.partial(
            tokenize_candidates, VQACollator(processor, bos, positions)))

        def answer(images, qs, max_new_tokens: int = 10, answer_list: Sequence[str] | None = None,
                   answer_top_k: int = DEFAULT_TOP_K, **kw) -> list[str]:
            # Questions and answers each get the text model's positions (bos starts an answer).
            qs = fit_questions(processor.tokenizer, qs, positions)
            if answer_list is not None:  # rank the list's answers instead of generating
                return rank_vqa(model, processor, images, qs, candidates(tuple(answer_list)),
                                answer_top_k)
            new = fit_new_tokens(model, 1, max_new_tokens, "the answer's start token")
            return vqa_generate(model, processor, images, qs, max_new_tokens=new, **kw)

        return Task(task, family, collator, vqa_loss_sum, answer, max_length=max_length,
                    truncations=collator.truncations)
    if family == "blip2" and task in ("caption", "vqa"):
        blip2_collator = Blip2Collator.for_model(model, processor, max_length)
        fmt = BLIP2_VQA_PROMPT.format

        def to_blip2(item: tuple) -> Blip2Item:
            # (image, caption, source) -> (image, prompt, caption, source);
            # (image, q, a, source) -> (image, "Question: q Answer:", a, source)
            if task == "caption":
                it = CaptionItem(*item)
                return Blip2Item(it.image, prompt, it.text, it.source)
            it = VQAItem(*item)
            return Blip2Item(it.image, fmt(it.question), it.answer, it.source)

        def collate(items: list) -> dict[str, torch.Tensor]:
            return blip2_collator([to_blip2(it) for it in items])

        def predict(images, qs, **kw) -> list[str]:
            prompts = prompt if qs is None else [fmt(q) for q in qs]
            return blip2_generate(model, processor, images, prompts, **kw)

        return Task(task, family, collate, blip2_loss_sum, predict, prompt,
                    shifted_labels=not is_encoder_decoder(model), max_length=max_length,
                    truncations=blip2_collator.truncations)
    raise ValueError(f"task {task!r} is not supported for {type(model).__name__}")
