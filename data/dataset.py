"""A seeded train/validation split that keeps all samples of one image on the same side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def split_by_image(samples: Sequence[Any], fraction: float,
                   seed: int) -> tuple[list[Any], list[Any]]:
    """(train, validation): a seeded ``fraction`` of the *images* (all their samples) held out."""
    images = list(dict.fromkeys(s.image for s in samples))
    n_val = round(len(images) * fraction)
    if fraction > 0 and not 0 < n_val < len(images):
        raise ValueError(f"validation fraction {fraction} of {len(images)} images leaves an "
                         "empty split")
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {images[i] for i in perm[:n_val]}
    return [s for s in samples if s.image not in held], [s for s in samples if s.image in held]
