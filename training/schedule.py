"""Learning-rate schedule: linear warm-up, then cosine decay, counted in optimizer steps."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based, the step about to run).

    Rises linearly over ``warmup_steps`` (from 1/warmup to 1), then follows half a cosine from 1
    down to ``min_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                   min_ratio: float = 0.0) -> LambdaLR:
    """A LambdaLR over warmup_cosine; call ``.step()`` once per optimizer step."""
    return LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup_steps, total_steps, min_ratio))
