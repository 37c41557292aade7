"""Map-style datasets over loaded samples, and a seeded train/validation split."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from .formats import CaptionSample, load_image


class CaptionDataset(Dataset):
    """(RGB image, caption) pairs, images decoded on access (cheap for small images)."""

    def __init__(self, samples: Sequence[CaptionSample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        s = self.samples[i]
        return load_image(s.image), s.text


def split_by_image(samples: Sequence[CaptionSample], fraction: float,
                   seed: int) -> tuple[list[CaptionSample], list[CaptionSample]]:
    """(train, validation): a seeded ``fraction`` of the *images* (all their captions) held out."""
    images = list(dict.fromkeys(s.image for s in samples))
    n_val = round(len(images) * fraction)
    if fraction > 0 and not 0 < n_val < len(images):
        raise ValueError(f"validation fraction {fraction} of {len(images)} images leaves an "
                         "empty split")
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {images[i] for i in perm[:n_val]}
    return [s for s in samples if s.image not in held], [s for s in samples if s.image in held]
