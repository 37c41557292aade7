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

from lora import LoRAInjection

from .adapters import adapter_metadata, load_adapter_path, read_sidecar
from .base_model import locate_adapters_base
from .loading import DEFAULT_MODELS, load_model, pick_device, place_model
from .tasks import make_task


class Pipeline:
    """Base model + adapters (settings from each adapter file's metadata), ready to predict.

    An adapter is a lora-vlm ``.safetensors`` file or a PEFT adapter directory. A model
    directory written by export.py brings the task and prompt it was trained with."""

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
        metas = [adapter_metadata(a) for a in adapters]
        if model:  # a merged model from export.py records the task and prompt it learned
            metas.append(read_sidecar(model))
        # The base and task the adapters were trained for, unless the caller names them.
        model = model or locate_adapters_base(adapters, metas)  # logs which candidate it used
        task = task or next((m["task"] for m in metas if m.get("task")), None)
        model = model or DEFAULT_MODELS[task or "caption"]
        merge = merge and bool(adapters)
        # A merge forms W + scale·BA in full precision on the CPU and quantizes the sum once on
        # the way to the device; otherwise the base is quantized while loading (QLoRA).
        self.model, self.processor, task = load_model(
            model, task, dtype=dtype, device="cpu" if merge else pick_device(device),
            quantize="none" if merge else quantize, double_quant=double_quant)
        if prompt is None:
            prompt = next((m["prompt"] for m in metas if m.get("prompt")), "")
        self.task = make_task(self.model, self.processor, task, prompt=prompt)
        self.injection: LoRAInjection | None = None
        for i, path in enumerate(adapters):  # distinct names: two runs' files share a stem
            self.injection = load_adapter_path(self.injection or self.model, path,
                                               name=f"{i}-{Path(path).stem}")
        if merge:  # W + scale·BA in full precision first, then one quantization of the sum
            self.injection.merge()  # no backup copy of W (exact_unmerge): inference only
            place_model(self.model, pick_device(device), quantize, double_quant)
            self.injection.to(pick_device(device))

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
