"""The token loss every task trains on, as (sum, count) so accumulation can be exact."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label value of positions that are not learned (prompt, padding, image tokens)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                   shift: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies in fp32, number of target tokens); logits (B, T, V).

    ``shift``: logits[:, t] predicts labels[:, t + 1] (decoder-only and BLIP text decoders);
    without it logits[:, t] predicts labels[:, t] (encoder-decoder decoders fed shifted input).
    """
    if shift:
        logits = logits[:, :-1]
    targets = labels[:, 1:] if shift else labels
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum", label_smoothing=label_smoothing)
    return loss, count_targets(labels, shift)


def count_targets(labels: torch.Tensor, shift: bool = True) -> int:
    """Number of target tokens token_loss_sum averages over (known before the forward pass)."""
    return int(((labels[:, 1:] if shift else labels) != IGNORE).sum())
