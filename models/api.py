"""The Python API: a BLIP model with zero or more adapter files, captioning PIL images.

    from models.api import Captioner
    cap = Captioner(adapters=["runs/caption-lora/adapter.safetensors"], merge=True)
    cap.caption([Image.open("image_test/00000.png")])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from lora import LoRAInjection, load_adapter, read_metadata

from .captioning import generate_captions
from .loading import DEFAULT_MODEL, load_model, pick_device


class Captioner:
    """Base model + adapters (settings from each adapter file's metadata), ready to caption."""

    def __init__(
        self,
        model: str | None = None,
        adapters: Sequence[str | Path] = (),
        merge: bool = False,
        device: str = "auto",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        metas = [read_metadata(a) for a in adapters]
        # The base the adapters were trained on, unless the caller names one.
        model = model or next((m["base_model"] for m in metas if m.get("base_model")),
                              DEFAULT_MODEL)
        self.model, self.processor, self.task = load_model(model, device=pick_device(device),
                                                           dtype=dtype)
        self.prompt = next((m["prompt"] for m in metas if m.get("prompt")), "")
        self.injection: LoRAInjection | None = None
        for i, path in enumerate(adapters):  # distinct names: two runs' files share a stem
            self.injection = load_adapter(self.injection or self.model, path,
                                          name=f"{i}-{Path(path).stem}")
        if merge and self.injection is not None:
            self.injection.merge(exact_unmerge=False)  # inference only: no backup copy needed

    def caption(self, images: Sequence[Image.Image], prompt: str | None = None,
                **generate_kwargs) -> list[str]:
        """Captions for PIL images (one generate call; batch them yourself if many)."""
        prompt = self.prompt if prompt is None else prompt
        return generate_captions(self.model, self.processor, images, prompt=prompt,
                                 **generate_kwargs)
