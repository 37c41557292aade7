"""AdamW over an adapter's parameters, optionally with LoRA+ learning rates.

LoRA+ (Hayou et al., 2024, arXiv:2402.12354) trains B with a larger learning rate than A:
``ratio × lr`` for every ``B``, ``lr`` for A and everything else (DoRA's magnitudes too).
Weight decay is the same for all. PEFT's ``create_loraplus_optimizer`` (peft 0.21) differs in
one point: it gives every 1-D parameter, DoRA's magnitudes included, the B rate too.
"""

from __future__ import annotations

import math

import torch

from lora import LoRAInjection

from .adamw8bit import OPTIMIZERS


def check_lr_ratio(ratio: float) -> float:
    """``ratio`` if it is a finite number > 0, else ValueError."""
    if not (isinstance(ratio, int | float) and math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"--loraplus-lr-ratio must be a finite number > 0, got {ratio!r}")
    return float(ratio)


def param_groups(injection: LoRAInjection, name: str, lr: float,
                 loraplus_lr_ratio: float = 1.0) -> list[dict]:
    """AdamW param groups of adapter ``name``: one group at ``lr``, or with a LoRA+ ratio ≠ 1,
    the A's and the rest at ``lr`` then the B's at ``ratio × lr``."""
    ratio = check_lr_ratio(loraplus_lr_ratio)
    params = injection.adapter_parameters(name)
    if ratio == 1.0:  # one group, as before LoRA+: optimizer states of older runs still load
        return [{"params": params, "lr": lr}]
    b_ids = {id(layer.B) for _, layer in injection._get(name).items()}
    return [{"params": [p for p in params if id(p) not in b_ids], "lr": lr},
            {"params": [p for p in params if id(p) in b_ids], "lr": lr * ratio}]


def make_optimizer(injection: LoRAInjection, name: str, lr: float, weight_decay: float,
                   loraplus_lr_ratio: float = 1.0, optimizer: str = "adamw"
                   ) -> torch.optim.Optimizer:
    """``optimizer`` (a key of OPTIMIZERS: adamw, adamw8bit) over adapter ``name`` (see
    param_groups), the same weight decay for every group."""
    groups = param_groups(injection, name, lr, loraplus_lr_ratio)
    return OPTIMIZERS[optimizer](groups, lr=lr, weight_decay=weight_decay)

