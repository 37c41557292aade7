"""Tasks: what each (model family, task) pair trains on and predicts, in one explicit table.

A Task turns loaded samples into training items, items into batches, batches into a summed
token loss, and images (+ questions) into predicted text. train.py and infer.py only talk to
this interface, so captioning, VQA and BLIP-2 share one loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm
from transformers import PreTrainedModel

from data.formats import CaptionSample, load_caption_samples, load_image
from data.vqa_formats import VQASample, load_vqa_samples

from .blip2 import Blip2Collator, blip2_generate, blip2_loss_sum, is_encoder_decoder
from .blip_vqa import VQACollator, vqa_generate, vqa_loss_sum
from .captioning import CaptionCollator, generate_captions
from .loss import count_targets, token_loss_sum

Sample = CaptionSample | VQASample
BLIP2_VQA_PROMPT = "Question: {} Answer:"


def majority_answer(answers: Sequence[str]) -> str:
    """The most frequent answer (first seen wins ties): the VQA training target."""
    return Counter(answers).most_common(1)[0][0]


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

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """Target tokens in a batch, the denominator of exact accumulation."""
        return count_targets(batch["labels"], self.shifted_labels)

    def load_samples(self, path: str | Path, skip_bad_samples: bool = False,
                     image_root: str | Path | None = None,
                     annotations: str | Path | None = None):
        """(samples, skip report) from any supported file format of this task.

        ``annotations`` names a VQA v2 annotations file (VQA only)."""
        if self.name == "caption":
            if annotations is not None:
                raise ValueError("annotations= applies to VQA v2 data, not captions")
            return load_caption_samples(path, skip_bad_samples=skip_bad_samples,
                                        image_root=image_root)
        return load_vqa_samples(path, skip_bad_samples=skip_bad_samples, image_root=image_root,
                                annotations=annotations)

    def item(self, sample: Sample, image: Image.Image) -> tuple:
        """The training item of one sample: (image, caption) or (image, question, answer)."""
        if self.name == "caption":
            return image, sample.text
        return image, sample.question, majority_answer(sample.answers)

    def predict(self, images: Sequence[Image.Image], questions: Sequence[str] | None = None,
                **generate_kwargs: Any) -> list[str]:
        """Captions for ``images``, or answers to one question per image."""
        if (self.name == "vqa") != (questions is not None):
            raise ValueError(f"task {self.name!r}: questions must be given exactly for VQA")
        return self._predict(images, questions, **generate_kwargs)

    def predict_units(self, units: Sequence[tuple[Sample, set[str]]], batch_size: int,
                      desc: str = "predict", **generate_kwargs: Any) -> list[str]:
        """One prediction per evaluation unit, ``batch_size`` images per generate call."""
        preds: list[str] = []
        for i in tqdm(range(0, len(units), batch_size), desc=desc, leave=False):
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


def make_task(model: PreTrainedModel, processor: Any, task: str, prompt: str = "",
              max_length: int = 64) -> Task:
    """The Task for ``model``'s family; ``prompt`` prefixes captions (BLIP, BLIP-2)."""
    family = "blip2" if type(model).__name__.startswith("Blip2") else "blip"
    bos = model.config.text_config.bos_token_id if family == "blip" else None
    if (family, task) == ("blip", "caption"):
        return Task(
            task, family, CaptionCollator(processor, prompt, max_length, bos_token_id=bos),
            lambda m, b, ls: token_loss_sum(m(**_without_labels(b)).logits, b["labels"], ls),
            lambda images, _, **kw: generate_captions(model, processor, images, prompt, **kw),
            prompt)
    if (family, task) == ("blip", "vqa"):
        return Task(task, family, VQACollator(processor, bos, max_length), vqa_loss_sum,
                    lambda images, qs, **kw: vqa_generate(model, processor, images, qs, **kw))
    if family == "blip2" and task in ("caption", "vqa"):
        collator = Blip2Collator.for_model(model, processor, max_length)
        fmt = BLIP2_VQA_PROMPT.format

        def collate(items: list) -> dict[str, torch.Tensor]:
            # (image, caption) -> (image, prompt, caption); (image, q, a) -> (image, Q/A prompt, a)
            return collator([(it[0], prompt, it[1]) if len(it) == 2 else (it[0], fmt(it[1]), it[2])
                             for it in items])

        def predict(images, qs, **kw) -> list[str]:
            prompts = prompt if qs is None else [fmt(q) for q in qs]
            return blip2_generate(model, processor, images, prompts, **kw)

        return Task(task, family, collate, blip2_loss_sum, predict, prompt,
                    shifted_labels=not is_encoder_decoder(model))
    raise ValueError(f"task {task!r} is not supported for {type(model).__name__}")
