"""Loading a BLIP / BLIP-2 checkpoint (hub id or local directory) with its processor.

The default model is the embedded tiny pretrained BLIP in models/tiny_blip: a same-architecture
stand-in that runs anywhere (see its README). Real checkpoints load through the same
``from_pretrained`` path: ``--model Salesforce/blip-image-captioning-large``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoProcessor,
    Blip2ForConditionalGeneration,
    BlipForConditionalGeneration,
    BlipForQuestionAnswering,
    PreTrainedModel,
)

from .blip_vqa import restore_cross_attention_masks

ROOT = Path(__file__).resolve().parents[1]
# The embedded stand-ins per task, relative to the checkout so adapter metadata stays portable.
DEFAULT_MODELS = {"caption": "models/tiny_blip", "vqa": "models/tiny_blip_vqa"}
DEFAULT_MODEL = DEFAULT_MODELS["caption"]

# config.architectures[0] -> (model class, tasks it can train; the first is the default).
ARCHITECTURES: dict[str, tuple[type[PreTrainedModel], tuple[str, ...]]] = {
    "BlipForConditionalGeneration": (BlipForConditionalGeneration, ("caption",)),
    "BlipForQuestionAnswering": (BlipForQuestionAnswering, ("vqa",)),
    "Blip2ForConditionalGeneration": (Blip2ForConditionalGeneration, ("caption", "vqa")),
}


def resolve_model_id(model_id: str) -> str:
    """A local directory (as given, or relative to the checkout), else the hub id unchanged."""
    if Path(model_id).expanduser().is_dir():
        return str(Path(model_id).expanduser())
    if (ROOT / model_id).is_dir():
        return str(ROOT / model_id)
    return model_id


def architecture(model_id: str) -> str:
    """The supported architecture named in a checkpoint's config."""
    config = AutoConfig.from_pretrained(resolve_model_id(model_id))
    for arch in config.architectures or []:
        if arch in ARCHITECTURES:
            return arch
    raise ValueError(f"{model_id}: architectures {config.architectures} not supported; "
                     f"supported: {sorted(ARCHITECTURES)}")


def load_model(model_id: str, task: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[PreTrainedModel, Any, str]:
    """(model in eval mode, processor, task) for a hub id or a local checkpoint directory."""
    model_id = resolve_model_id(model_id)
    cls, tasks = ARCHITECTURES[architecture(model_id)]
    task = task or tasks[0]
    if task not in tasks:
        raise ValueError(f"{model_id} is a {cls.__name__}: it trains {tasks}, not {task!r}")
    model = cls.from_pretrained(model_id, dtype=dtype).to(device).eval()
    if cls is BlipForQuestionAnswering:
        restore_cross_attention_masks(model)  # transformers 5.23 drops the question mask
    return model, AutoProcessor.from_pretrained(model_id), task


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing: recompute each layer in backward.

    transformers also hooks the input embeddings to require grad (for reentrant checkpointing
    under PEFT); that hook crashes BLIP's text embeddings (in-place add on a leaf) and is not
    needed without reentrancy, so it is removed again. Adapter grads are unchanged (tested).
    """
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.disable_input_require_grads()


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else cpu."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
