"""Texts longer than the model takes: which ones a collator cut, and one warning per sample.

Collators tokenize with ``truncation=True`` (one tokenizer pass on the common path). A row can
only have been cut if it came out exactly at the limit, so only those rows are tokenized again
to tell "cut" from "fits exactly": a dataset without over-long texts pays nothing extra.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def cut_rows(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], lengths: torch.Tensor,
             limit: int) -> list[bool]:
    """Which ``texts`` the tokenizer cut to ``limit`` tokens; ``lengths`` (B,) are the token
    counts the truncating call produced (special tokens included, padding not)."""
    # verbose=False: the whole text is longer than model_max_length, which is the point here.
    return [int(n) >= limit and len(tokenizer(t, verbose=False).input_ids) > limit
            for t, n in zip(texts, lengths.tolist(), strict=True)]


def mask_cut_ends(labels: torch.Tensor, mask: torch.Tensor, cut: Sequence[bool],
                  ignore: int) -> torch.Tensor:
    """``labels`` with the last real token of each cut row set to ``ignore``, in place.

    Truncation keeps the tokenizer's closing token ([SEP], </s>); a cut text does not end there,
    so learning that token would teach the model to stop mid-sentence.
    """
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # (B,) index of each row's last real token
    for row in (i for i, c in enumerate(cut) if c):
        labels[row, last[row]] = ignore
    return labels


@dataclass
class TruncationLog:
    """One warning per sample source whose text was cut (the first ``max_listed`` of them), and
    a count of all; each collator has one (``Task.truncations``). ``source`` None (items built
    by hand) is reported by the start of its text instead."""

    max_listed: int = 20
    sources: set[str] = field(default_factory=set)

    @property
    def count(self) -> int:
        """Distinct samples cut so far (in this process: DataLoader workers keep their own)."""
        return len(self.sources)

    def report(self, source: str | None, parts: Sequence[str], fallback: str = "") -> None:
        """Warn that one sample's ``parts`` (e.g. "answer to 32 tokens") were cut, unless this
        sample was reported before; ``fallback`` (its text) names a sample without a source."""
        key = source or f"an item without a source ({fallback[:40]!r}...)"
        if not parts or key in self.sources:
            return
        self.sources.add(key)
        if self.count <= self.max_listed:
            log.warning("%s: longer than the model takes, truncated: %s", key, ", ".join(parts))
        if self.count == self.max_listed:
            log.warning("further truncated samples are counted, not listed")
