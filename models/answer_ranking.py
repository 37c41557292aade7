"""Rank-based VQA decoding over a candidate answer list: BLIP's ``rank_answer``.

salesforce/BLIP ``models/blip_vqa.py``: one decoder step from bos gives the probability of
each candidate's first token; the top-k candidates by it are then scored by their whole
log-likelihood (bos -> answer tokens -> [SEP], teacher-forced), and the best is the answer. So
every answer is one of the list. With k = the list's length this is the exact argmax of the
log-likelihood over the list; a smaller k decodes only k sequences per question. BLIP scores
with its training loss (label smoothing 0.1 included); the plain log-likelihood is used here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import BlipForQuestionAnswering, BlipProcessor

from .blip_vqa import VQACollator, question_states
from .loss import IGNORE

log = logging.getLogger(__name__)
DEFAULT_TOP_K = 128  # BLIP's k_test for VQA v2 (configs/vqa.yaml)
ROWS_PER_PASS = 128  # candidate sequences per decoder pass: bounds the (N, T, vocab) logits


@dataclass(frozen=True)
class AnswerCandidates:
    """An answer list tokenized for the answer decoder, as training tokenizes answers."""

    texts: tuple[str, ...]
    ids: torch.Tensor  # (C, T): bos, the answer's tokens, [SEP], padding
    mask: torch.Tensor  # (C, T)
    labels: torch.Tensor  # (C, T): ids, IGNORE at padding (and at a cut answer's end)


def tokenize_candidates(collator: VQACollator, answers: Sequence[str]) -> AnswerCandidates:
    """``answers`` as decoder inputs, cut to the collator's max_length (with a warning)."""
    tensors, cut = collator.answer_tensors(answers)
    if any(cut):
        log.warning("answer list: %d answers have more than %d tokens: scored on their first "
                    "tokens only", sum(cut), collator.max_length)
    return AnswerCandidates(tuple(answers), tensors["answer_ids"], tensors["answer_mask"],
                            tensors["labels"])


def sequence_log_likelihood(model: BlipForQuestionAnswering, question: torch.Tensor,
                            question_mask: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                            labels: torch.Tensor) -> torch.Tensor:
    """log p(answer | question) (N,) of N answer rows, each against its question's states
    (N, Tq, H): the sum of its target tokens' log-probabilities."""
    logits = model.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=question,
                                encoder_attention_mask=question_mask, use_cache=False).logits
    targets = labels[:, 1:]  # logits[:, t] predicts labels[:, t + 1]
    logp = logits[:, :-1].float().log_softmax(-1)  # (N, T - 1, V)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE)).sum(1)


def rank_answers(model: BlipForQuestionAnswering, question: torch.Tensor,
                 question_mask: torch.Tensor, candidates: AnswerCandidates,
                 top_k: int = DEFAULT_TOP_K) -> torch.Tensor:
    """The index of each question's best candidate (B,): the top ``top_k`` by first-token
    probability (ties in list order), the best of those by sequence log-likelihood."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    n_questions, device = question.shape[0], question.device
    ids, mask, labels = (t.to(device) for t in (candidates.ids, candidates.mask, candidates.labels))
    k = min(top_k, len(candidates.texts))
    start = ids[:1, :1].expand(n_questions, 1)  # bos
    first = model.text_decoder(input_ids=start, encoder_hidden_states=question,
                               encoder_attention_mask=question_mask, use_cache=False).logits
    first = first[:, 0].float().log_softmax(-1)[:, ids[:, 1]]  # (B, C)
    # A stable sort keeps list order among equal first tokens: the kept set is deterministic.
    top = first.sort(dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
    rows, owner = top.flatten(), torch.arange(n_questions, device=device).repeat_interleave(k)
    scores = []
    for i in range(0, rows.numel(), ROWS_PER_PASS):
        r, q = rows[i : i + ROWS_PER_PASS], owner[i : i + ROWS_PER_PASS]
        width = int(mask[r].sum(1).max())  # this pass's longest candidate
        scores.append(sequence_log_likelihood(model, question[q], question_mask[q],
                                              ids[r, :width], mask[r, :width],
                                              labels[r, :width]))
    best = torch.cat(scores).view(n_questions, k).argmax(1)
    return top.gather(1, best[:, None]).squeeze(1)


@torch.no_grad()
def rank_vqa(model: BlipForQuestionAnswering, processor: BlipProcessor,
             images: Sequence[Image.Image], questions: Sequence[str],
             candidates: AnswerCandidates, top_k: int = DEFAULT_TOP_K) -> list[str]:
    """One answer from ``candidates`` per (image, question) pair (rank_answers)."""
    question, mask = question_states(model, processor, images, questions)
    best = rank_answers(model, question, mask, candidates, top_k)
    return [candidates.texts[i] for i in best.tolist()]
