"""PEFT's adapter directory layout, written and read without importing peft.

Layout (PEFT's documented format): ``adapter_config.json`` + ``adapter_model.safetensors`` with
keys ``base_model.model.<module path>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r) and
metadata ``{"format": "pt"}``. Per-module ranks/alphas that differ from ``r`` / ``lora_alpha``
go to ``rank_pattern`` / ``alpha_pattern``, whose keys PEFT matches as
``re.match(rf"(.*\\.)?({key})$", module_path)``; we write escaped full paths.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import nn

from .adapter_file import (
    AdapterFileError,
    adapter_state,
    atomic_save_tensors,
    read_adapter_file,
    validate_state,
)
from .config import LoRAConfig
from .injection import LoRAInjection
from .targets import linear_modules

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


def save_peft(injection: LoRAInjection, out_dir: str | Path, name: str = "default",
              base_model: str = "") -> Path:
    """Export adapter ``name`` as a PEFT LoRA directory that ``PeftModel.from_pretrained`` reads."""
    adapter = injection._get(name)
    layers = dict(adapter.items())
    cfg = adapter.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model or None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "target_modules": list(layers),
        "rank_pattern": {re.escape(p): m.r for p, m in layers.items() if m.r != cfg.r},
        "alpha_pattern": {re.escape(p): m.alpha for p, m in layers.items() if m.alpha != cfg.alpha},
        "modules_to_save": None,
        "layers_to_transform": None,
        "inference_mode": True,
    }
    state = {PREFIX + k: v for k, v in adapter_state(injection, name).items()}
    atomic_save_tensors(state, out_dir / WEIGHTS_NAME, {"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _pattern_value(path: str, patterns: dict, default: float) -> float:
    # PEFT's get_pattern_key: first key (in order) with re.match(rf"(.*\.)?({key})$", path).
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", path)), default)


def _check_supported(config: dict, source: str) -> None:
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{source}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    unsupported = {"use_dora": False, "bias": "none", "fan_in_fan_out": False,
                   "modules_to_save": None}
    for key, ok in unsupported.items():
        if config.get(key, ok) not in (ok, []):
            raise AdapterFileError(f"{source}: {key}={config[key]!r} is not supported")


def load_peft(target: nn.Module | LoRAInjection, in_dir: str | Path, name: str = "default",
              activate: bool = True) -> LoRAInjection:
    """Import a PEFT LoRA directory into a model or injection, validated like load_adapter."""
    in_dir = Path(in_dir)
    config_path, weights_path = in_dir / CONFIG_NAME, in_dir / WEIGHTS_NAME
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterFileError(f"{config_path}: cannot read PEFT config ({e})") from e
    _check_supported(config, str(config_path))
    tensors, _ = read_adapter_file(weights_path)
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise AdapterFileError(f"{weights_path}: unexpected key {bad[0]!r} (no {PREFIX!r} prefix)")
    tensors = {k[len(PREFIX):]: v for k, v in tensors.items()}
    model = target.model if isinstance(target, LoRAInjection) else target
    linears = linear_modules(model)
    order = {n: i for i, n in enumerate(linears)}  # model order, not the file's sorted order
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in tensors}, key=lambda p: order.get(p, -1))
    r0, alpha0 = int(config["r"]), float(config["lora_alpha"])
    spec = {}
    for p in paths:
        a = tensors.get(f"{p}.lora_A.weight")
        r = a.shape[0] if a is not None else r0
        alpha = float(_pattern_value(p, config.get("alpha_pattern") or {}, alpha0))
        spec[p] = (int(r), alpha)
    validate_state(linears, spec, tensors, str(weights_path))
    lora_config = LoRAConfig(r=r0, alpha=alpha0, dropout=float(config.get("lora_dropout", 0.0)),
                             rslora=bool(config.get("use_rslora", False)), targets=tuple(paths))
    injection = target if isinstance(target, LoRAInjection) else LoRAInjection(model)
    injection.attach(name, lora_config, spec, tensors, activate=activate)
    return injection
