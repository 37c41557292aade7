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
from lora.arithmetic import split_weight

from .adapters import adapter_metadata, load_adapter_path, read_sidecar
from .base_model import locate_adapters_base
from .loading import DEFAULT_MODELS, load_model, pick_device, place_model
from .tasks import Task, make_task


def adapters_task(adapters: Sequence[str | Path], metas: Sequence[dict[str, str]]) -> str | None:
    """The task the adapters were trained for (None if none records one); adapters of
    different tasks cannot share one pipeline's task: a ValueError naming each."""
    tasks = {str(a): m["task"] for a, m in zip(adapters, metas, strict=True) if m.get("task")}
    if len(set(tasks.values())) > 1:
        listing = ", ".join(f"{a} ({t})" for a, t in tasks.items())
        raise ValueError(f"adapters of different tasks: {listing}; use each task's adapters "
                         "in a run of their own")
    return next(iter(tasks.values()), None)


class Pipeline:
    """Base model + adapters (settings from each adapter file's metadata), ready to predict.

    An adapter is a lora-vlm ``.safetensors`` file or a PEFT adapter directory, optionally
    ``PATH:WEIGHT`` (its delta × WEIGHT, via set_scale). A model directory written by export.py
    brings the task and prompt it was trained with.

    ``task`` predicts with every adapter on (its prompt: ``prompt``, else the first adapter's);
    ``activate`` turns one adapter (or none) on and returns the task with that one's prompt."""

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
        weights = [split_weight(a) for a in adapters]  # "a.safetensors:0.7" -> (path, 0.7)
        self.adapter_paths = adapters = [path for path, _ in weights]
        metas = [adapter_metadata(a) for a in adapters]
        recorded = adapters_task(adapters, metas)  # a mix of tasks is an error either way
        task = task or recorded
        # Each adapter's own caption prompt (``activate``); the base alone gets ``prompt``,
        # else its own (an export.py model's sidecar), else none.
        names = [f"{i}-{Path(a).stem}" for i, a in enumerate(adapters)]
        self.adapter_prompts = {n: m.get("prompt", "") for n, m in zip(names, metas, strict=True)}
        self.adapter_tasks = {n: m.get("task") for n, m in zip(names, metas, strict=True)}
        sidecar = read_sidecar(model) if model else {}
        # a merged model from export.py records the task and prompt it learned
        metas.append(sidecar)
        self.base_prompt = prompt if prompt is not None else sidecar.get("prompt", "")
        # The base and task the adapters were trained for, unless the caller names them.
        model = model or locate_adapters_base(adapters, metas)  # logs which candidate it used
        task = task or next((m["task"] for m in metas if m.get("task")), None)
        model = model or DEFAULT_MODELS[task or "caption"]
        self.model_id = str(model)  # the base actually loaded
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
        for name, path in zip(self.adapter_prompts, adapters, strict=True):
            # distinct names: two runs' files share a stem
            self.injection = load_adapter_path(self.injection or self.model, path, name=name)
        for name, (_, weight) in zip(self.adapter_prompts, weights, strict=True):
            if weight != 1.0:
                self.injection.set_scale(name, weight)
        if merge:  # W + scale·BA in full precision first, then one quantization of the sum
            self.injection.merge()  # no backup copy of W (exact_unmerge): inference only
            place_model(self.model, pick_device(device), quantize, double_quant)
            self.injection.to(pick_device(device))

    @property
    def adapter_names(self) -> list[str]:
        """The adapters' names in the injection, in the order given."""
        return list(self.adapter_prompts)

    def activate(self, name: str | None) -> Task:
        """Adapter ``name`` alone on (None: the base alone); returns the task predicting with
        its caption prompt: the adapter's training prompt, for the base ``prompt`` or none."""
        if self.injection is not None:
            self.injection.set_active([] if name is None else [name])
        prompt = self.base_prompt if name is None else self.adapter_prompts[name]
        return make_task(self.model, self.processor, self.task.name, prompt=prompt)

    def predict_each(self, images: Sequence[Image.Image], adapters: Sequence[str | None],
                     questions: Sequence[str] | None = None, **generate_kwargs: Any) -> list[str]:
        """One caption (or answer) per image, image i with adapter ``adapters[i]`` (a name of
        ``adapter_names``; None: the base), all in one batched generate
        (``LoRAInjection.per_sample``): the outputs of ``activate`` one adapter at a time. The
        adapters of one call share a caption prompt, since the prompt is part of the input."""
        if len(adapters) != len(images):
            raise ValueError(f"{len(images)} images but {len(adapters)} adapter names: give one "
                             "name (or None) per image")
        unknown = [a for a in adapters if a is not None and a not in self.adapter_prompts]
        if unknown or self.injection is None:
            raise ValueError(f"unknown adapter {unknown[0] if unknown else adapters[0]!r}; "
                             f"this pipeline has {self.adapter_names}")
        prompts = {self.base_prompt if a is None else self.adapter_prompts[a] for a in adapters}
        if len(prompts) > 1:
            raise ValueError(f"these adapters were trained with different prompts {prompts}: "
                             "predict each prompt's adapters in a call of their own")
        task = make_task(self.model, self.processor, self.task.name, prompt=prompts.pop())
        with self.injection.per_sample(adapters):
            return task.predict(images, questions, **generate_kwargs)

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
