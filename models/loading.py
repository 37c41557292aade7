"""Loading a BLIP checkpoint (hub id or local directory) with its processor, offline-friendly.

The default model is the embedded tiny pretrained BLIP in models/tiny_blip: a same-architecture
stand-in that runs anywhere (see its README). Real checkpoints load through the same
``from_pretrained`` path: ``--model Salesforce/blip-image-captioning-large``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, BlipForConditionalGeneration, BlipProcessor, PreTrainedModel

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "models/tiny_blip"  # relative to the checkout, so adapter metadata stays portable


def resolve_model_id(model_id: str) -> str:
    """A local directory (as given, or relative to the checkout), else the hub id unchanged."""
    if Path(model_id).expanduser().is_dir():
        return str(Path(model_id).expanduser())
    if (ROOT / model_id).is_dir():
        return str(ROOT / model_id)
    return model_id

# config.architectures[0] -> task; the explicit table keeps supported families visible.
TASKS = {"BlipForConditionalGeneration": "caption"}
MODEL_CLASSES = {"caption": BlipForConditionalGeneration}


def infer_task(model_id: str) -> str:
    """The task a checkpoint was built for, from its config's ``architectures``."""
    config = AutoConfig.from_pretrained(resolve_model_id(model_id))
    for arch in config.architectures or []:
        if arch in TASKS:
            return TASKS[arch]
    raise ValueError(f"{model_id}: architectures {config.architectures} not supported; "
                     f"supported: {sorted(TASKS)}")


def load_model(model_id: str, task: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[PreTrainedModel, BlipProcessor, str]:
    """(model in eval mode, processor, task) for a hub id or a local checkpoint directory."""
    model_id = resolve_model_id(model_id)
    task = task or infer_task(model_id)
    if task not in MODEL_CLASSES:
        raise ValueError(f"task {task!r} not supported; choose from {sorted(MODEL_CLASSES)}")
    model = MODEL_CLASSES[task].from_pretrained(model_id, dtype=dtype).to(device).eval()
    processor = BlipProcessor.from_pretrained(model_id)
    return model, processor, task


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else cpu."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
