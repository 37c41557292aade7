"""Prompts: how a prompt and a target become one text, which of its tokens are the prompt's,
and how generation drops them again; one rule for BLIP and BLIP-2.

Joining: exactly one space between prompt and target, whether or not the prompt ends in one
("a picture of" and "a picture of " both give "a picture of red cube"); a prompt glued to its
target would change both (WordPiece: "ofa" -> "of ##a"; byte-level BPE: "red" vs "Ġred").
Training and generation both see the stripped prompt, so its tokens are the same in both.

Token count: the joined text must start with the prompt's own tokens (after the tokenizer's
opening special token: BLIP's [CLS], OPT's </s>); ``Prompt.check`` says which token differs
otherwise (an added token spanning the boundary, a tokenizer that merges across spaces).
Those ``len(prompt)`` tokens are masked out of the labels, and generation cuts exactly that
many from what it returns: never by comparing decoded strings, which do not give the prompt
back ("a photo:" decodes as "a photo :" with BERT).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from data.formats import DataFormatError

BLIP2_VQA_PROMPT = "Question: {} Answer:"  # BLIP-2's VQA prompt (Li et al. 2023, sec. 4.2)


class PromptError(DataFormatError):
    """A sample whose text changes the prompt's tokens once joined to it; the message names
    the prompt, the sample and the first differing token. A DataFormatError, so the entry
    points report it as one line."""


def join_prompt(prompt: str, target: str) -> str:
    """``prompt`` and ``target`` with exactly one space between them (none if either is empty)."""
    return " ".join(s for s in (prompt.strip(), target.strip()) if s)


def _opening_and_closing(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before a text and after it: BERT (1, 1),
    OPT (1, 0), T5 (0, 1). Read off one encoding, since only the tokenizer knows its template."""
    mask = tokenizer("a", return_special_tokens_mask=True)["special_tokens_mask"]
    opening = next(i for i, special in enumerate(mask) if not special)
    return opening, tokenizer.num_special_tokens_to_add() - opening


@dataclass
class Prompt:
    """A prompt as the model sees it: ``ids`` = the opening special token(s) + the stripped
    prompt's tokens, the prefix of every joined text and of every generation."""

    tokenizer: PreTrainedTokenizerBase
    text: str = ""
    ids: list[int] = field(init=False)
    _closing: int = field(init=False, repr=False)  # special tokens after a text: [SEP], T5's </s>

    def __post_init__(self) -> None:
        self.text = self.text.strip()
        opening, self._closing = _opening_and_closing(self.tokenizer)
        with_specials = self.tokenizer(self.text).input_ids
        self.ids = (with_specials[:opening]
                    + self.tokenizer(self.text, add_special_tokens=False).input_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def join(self, target: str) -> str:
        """The training text: this prompt, one space, ``target``."""
        return join_prompt(self.text, target)

    def check(self, row: Sequence[int], source: str | None = None, target: str = "") -> None:
        """Raise PromptError unless ``row`` (a joined text's ids, without padding) starts with
        ``ids``. A row cut to the window compares the prompt tokens it kept (its closing token,
        [SEP], is not the prompt's)."""
        kept = min(len(self.ids), len(row) - self._closing)
        for i in range(kept):
            if row[i] != self.ids[i]:
                got, want = self.tokenizer.convert_ids_to_tokens([row[i], self.ids[i]])
                where = f"{source}: " if source else ""
                raise PromptError(
                    f"{where}prompt {self.text!r} tokenizes differently once the text "
                    f"{target!r} is joined to it: token {i} is {got!r} there but {want!r} in the "
                    "prompt alone, so the prompt's tokens cannot be masked out of the labels; "
                    "change the prompt (or the tokenizer's added tokens)")

    def cut(self, sequences: torch.Tensor) -> torch.Tensor:
        """Generated ``sequences`` (B, T) that start with this prompt, without it: (B, T - len)."""
        return sequences[:, len(self.ids):]
