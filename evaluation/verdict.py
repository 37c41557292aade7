"""Exact match, defined once per task; train.py's report, eval.py's table and its HTML rows
all call ``is_correct``.

* caption: the normalised prediction equals the normalised text of ANY reference caption of the
  image (lower case, single spaces, no trailing full stop: ``normalize_caption``);
* vqa: the prediction equals ANY reference answer after the official VQA normalisation
  (``vqa_metrics.normalize_answer``: punctuation, number words to digits, articles dropped,
  contractions), references normalised the same way: ``vqa_metrics.answer_correct``, which
  ``vqa_scores`` averages into its ``exact_match``. So "2" = "two", "Yes." = "yes", "the red" =
  "red". Any reference, not only the majority answer (the training target): with VQA v2's 10
  human answers, an answer some annotators gave counts, as it does (partly) in VQA accuracy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .vqa_metrics import answer_correct

TASKS = ("caption", "vqa")


def normalize_caption(text: str) -> str:
    """Lower-case, single spaces, no trailing full stop: the caption exact-match form."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(" .")


def caption_correct(prediction: str, references: Sequence[str]) -> bool:
    """Whether a caption equals any reference caption of its image, normalised."""
    return normalize_caption(prediction) in {normalize_caption(r) for r in references}


def is_correct(task: str, prediction: str, references: Sequence[str]) -> bool:
    """The exact-match verdict of ``task`` ("caption" or "vqa") for one prediction."""
    if isinstance(references, str) or not references:
        raise ValueError(f"need a non-empty list of references, got {references!r}")
    if task == "caption":
        return caption_correct(prediction, references)
    if task == "vqa":
        return answer_correct(prediction, references)
    raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")
