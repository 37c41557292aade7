"""The Python API: a BLIP / BLIP-2 model with zero or more adapter files, for PIL images.

    from models.api import Pipeline
    pipe = Pipeline(adapters=["runs/caption-lora/adapter.safetensors"], merge=True)
    pipe.caption([Image.open("image_test/00000.png")])
    Pipeline("models/tiny_blip_vqa").predict_answers(image, ["how many cubes are there?"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lora import LoRAInjection, load_adapter, quantize_model, read_metadata

from .loading import DEFAULT_MODELS, load_model, pick_device
from .tasks import make_task


class Pipeline:
    """Base model + adapters (settings from each adapter file's metadata), ready to predict."""

    def __init__(
        self,
        model: str | None = None,
        adapters: Sequence[str | Path] = (),
        merge: bool = False,
        task: str | None = None,
        device: str = "auto",
        dtype: torch.dtype = torch.float32,
        prompt: str | None = None,
        quantize: str = "none",
        double_quant: bool = True,
    ) -> None:
        metas = [read_metadata(a) for a in adapters]
        # The base and task the adapters were trained for, unless the caller names them.
        model = model or next((m["base_model"] for m in metas if m.get("base_model")), None)
        task = task or next((m["task"] for m in metas if m.get("task")), None)
        model = model or DEFAULT_MODELS[task or "caption"]
        self.model, self.processor, task = load_model(model, task, dtype=dtype,
                                                      device=pick_device(device))
        if prompt is None:
            prompt = next((m["prompt"] for m in metas if m.get("prompt")), "")
        self.task = make_task(self.model, self.processor, task, prompt=prompt)
        self.injection: LoRAInjection | None = None
        merge = merge and bool(adapters)
        if not merge:  # adapters hook on top of the quantized Linears (QLoRA)
            quantize_model(self.model, quantize, double_quant)
        for i, path in enumerate(adapters):  # distinct names: two runs' files share a stem
            self.injection = load_adapter(self.injection or self.model, path,
                                          name=f"{i}-{Path(path).stem}")
        if merge:  # W + scale·BA in full precision first, then one quantization of the sum
            self.injection.merge()  # no backup copy of W (exact_unmerge): inference only
            quantize_model(self.model, quantize, double_quant)

    def caption(self, images: Sequence[Image.Image], **generate_kwargs: Any) -> list[str]:
        """One caption per PIL image (one generate call: batch large lists yourself)."""
        return self.task.predict(images, None, **generate_kwargs)

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str],
               **generate_kwargs: Any) -> list[str]:
        """One answer per (image, question) pair."""
        return self.task.predict(images, questions, **generate_kwargs)

    def predict_answers(self, image: Image.Image, questions: Sequence[str],
                        **generate_kwargs: Any) -> list[str]:
        """Answers to several questions about one image."""
        return self.answer([image] * len(questions), questions, **generate_kwargs)
