"""Tiny random BLIP-2 models (OPT and Flan-T5) on the real tokenizer types, built offline.

The real-shaped builders of real_tokenizers.py with a shorter window for fast tests: 4 query
tokens instead of 32, and 64 OPT positions (so truncation is reached with short texts).
"""

from __future__ import annotations

from real_tokenizers import HIDDEN, real_model
from transformers import Blip2ForConditionalGeneration, Blip2Processor

__all__ = ["HIDDEN", "OPT_POSITIONS", "QUERY_TOKENS", "tiny_blip2"]

QUERY_TOKENS = 4
OPT_POSITIONS = 64


def tiny_blip2(family: str, seed: int = 0) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """A seeded tiny BLIP-2 ("opt" or "t5") in eval mode, and its processor."""
    return real_model(f"blip2-{family}", seed, query_tokens=QUERY_TOKENS,
                      text_positions=OPT_POSITIONS)
