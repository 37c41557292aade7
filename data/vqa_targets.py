"""What a VQA question trains on: its majority answer, or every answer weighted by its share.

BLIP (Li et al. 2022, salesforce/BLIP ``data/vqa_dataset.py``) trains on each unique answer of
a VQA v2 question with weight count / len(answers): the share of the annotators who gave it.
That weight is used here, not the VQA-accuracy score min(1, count / 3): the shares of one
question sum to 1, so the loss is the cross-entropy against the annotators' answer distribution
and every question weighs the same as one majority-answer question (with min(1, count/3) a
question whose 10 annotators disagree would weigh up to 3.3x one they agree on).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Protocol

HUMAN_ANSWERS = 10  # answers per VQA v2 question: where "auto" trains on all of them
TARGET_MODES = ("auto", "weighted", "majority")


class HasAnswers(Protocol):
    answers: tuple[str, ...]


def majority_answer(answers: Sequence[str]) -> str:
    """The most frequent answer (first seen wins ties): the "majority" training target."""
    return Counter(answers).most_common(1)[0][0]


def answer_weights(answers: Sequence[str]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(unique answers in first-seen order, their weights count / len(answers)): the
    "weighted" training targets of one question. Answers are compared as written."""
    if not answers:
        raise ValueError("a question needs at least one answer")
    counts = Counter(answers)  # keeps first-seen order
    return tuple(counts), tuple(n / len(answers) for n in counts.values())


def resolve_targets(mode: str, samples: Sequence[HasAnswers]) -> str:
    """``mode`` ("auto", "weighted" or "majority") as used: "auto" is "weighted" when some
    question has the HUMAN_ANSWERS answers of VQA v2, else "majority"."""
    if mode not in TARGET_MODES:
        raise ValueError(f"VQA targets must be one of {', '.join(TARGET_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    return "weighted" if any(len(s.answers) == HUMAN_ANSWERS for s in samples) else "majority"
