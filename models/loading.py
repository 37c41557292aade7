"""Loading a BLIP / BLIP-2 checkpoint (hub id or local directory) with its processor.

The default model is the embedded tiny pretrained BLIP in models/tiny_blip: a same-architecture
stand-in that runs anywhere (see its README). Real checkpoints load through the same
``from_pretrained`` path: ``--model Salesforce/blip-image-captioning-large``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
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

from lora.quantized_linear import QuantizedLinear, frozen_bytes, quantize_model

from .blip_vqa import restore_cross_attention_masks

log = logging.getLogger(__name__)

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


def local_model_dirs(model_id: str) -> list[tuple[Path, str]]:
    """Where a model id could be a local directory, in the order looked at: (path, how)."""
    given = os.path.expanduser(model_id)  # abspath: '..' folded, symlinks kept as named
    return [(Path(os.path.abspath(given)), "from the working directory"),
            (Path(os.path.abspath(ROOT / given)), "in the checkout")]


def resolve_model_id(model_id: str) -> str:
    """A local directory (as given, or relative to the checkout), else the hub id unchanged."""
    return next((str(path) for path, _ in local_model_dirs(model_id) if path.is_dir()), model_id)


def architecture(model_id: str) -> str:
    """The supported architecture named in a checkpoint's config."""
    config = AutoConfig.from_pretrained(resolve_model_id(model_id))
    for arch in config.architectures or []:
        if arch in ARCHITECTURES:
            return arch
    raise ValueError(f"{model_id}: architectures {config.architectures} not supported; "
                     f"supported: {sorted(ARCHITECTURES)}")


def load_model(model_id: str, task: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", quantize: str = "none",
               double_quant: bool = True) -> tuple[PreTrainedModel, Any, str]:
    """(model in eval mode, processor, task) for a hub id or a local checkpoint directory.

    ``quantize`` (int8 / nf4) replaces the base's Linears by QuantizedLinear on the way to
    ``device`` (see place_model): only the quantized base is ever resident there.
    """
    model_id = resolve_model_id(model_id)
    cls, tasks = ARCHITECTURES[architecture(model_id)]
    task = task or tasks[0]
    if task not in tasks:
        raise ValueError(f"{model_id} is a {cls.__name__}: it trains {tasks}, not {task!r}")
    model = cls.from_pretrained(model_id, dtype=dtype).eval()  # on the CPU, weights mmapped
    if quantized := place_model(model, device, quantize, double_quant):
        log.info("%s: %d Linear layers quantized to %s, frozen base now %.1f MB", model_id,
                 len(quantized), quantize, frozen_bytes(model) / 1e6)
    if cls is BlipForQuestionAnswering:
        restore_cross_attention_masks(model)  # hooks only if this transformers drops the mask
    return model, AutoProcessor.from_pretrained(model_id), task


def place_model(model: torch.nn.Module, device: str | torch.device, quantize: str = "none",
                double_quant: bool = True) -> list[str]:
    """Move a model on the CPU to ``device``, quantizing its Linears on the way; their paths.

    Each Linear moves alone and is quantized on ``device``, its full-precision weight dropped
    right after, so the full-precision base never sits on a GPU; then the rest moves. On the
    CPU the rest is copied out of the checkpoint's memory map: while any tensor reads from the
    map, every page of it that quantization read stays resident beside the quantized copies.
    """
    device = torch.device(device)
    paths = quantize_model(model, quantize, double_quant, device=device)
    model.to(device)
    if paths:
        if device.type == "cpu":
            _copy_out_of_checkpoint(model)
        release_freed_memory()
    return paths


@torch.no_grad()
def _copy_out_of_checkpoint(model: torch.nn.Module) -> None:
    """Give every parameter and buffer outside the QuantizedLinears memory of its own.

    Parameters keep their identity (only ``.data`` changes), so tied weights stay tied.
    """
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, QuantizedLinear):  # built from fresh tensors already
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in copies:
                copies[id(p)] = p
                p.data = p.data.clone()
        for name, b in module.named_buffers(recurse=False):
            if id(b) not in copies:
                copies[id(b)] = b.clone()
            module._buffers[name] = copies[id(b)]


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so RSS shows what is live (glibc only).

    glibc keeps freed chunks below its mmap threshold (up to 32 MB, e.g. a BLIP layer's
    weight) in the heap; without this, RSS stays at its loading peak after quantization.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
