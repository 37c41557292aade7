"""Exact gradient accumulation: micro-batches grouped into optimizer-step windows.

Each micro-batch's summed token loss is divided by the number of target tokens in its whole
window, so a window's gradient equals that of one big batch with a token-mean loss, also for
the last, shorter window of an epoch.
"""

from __future__ import annotations

import math


def windows(n_micro: int, accum: int) -> list[range]:
    """Micro-batch indices of each optimizer step in one epoch; the last may be shorter."""
    return [range(s, min(s + accum, n_micro)) for s in range(0, n_micro, accum)]


def steps_per_epoch(n_micro: int, accum: int) -> int:
    """Optimizer steps in one epoch of ``n_micro`` micro-batches."""
    return math.ceil(n_micro / accum)
