"""Adapters as users name them: a lora-vlm ``.safetensors`` file or a PEFT adapter directory.

A PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``) carries rank, alpha
and targets but not what lora-vlm's file metadata also holds: the task and the caption prompt
it was trained with. ``export.py --peft`` writes those beside it in ``lora_vlm.json`` (PEFT
ignores unknown files); a directory written by PEFT itself has only its base model's id.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lora import AdapterFileError, LoRAInjection, load_adapter, load_peft, read_metadata
from lora.peft_format import CONFIG_NAME, read_json_object

SIDECAR_NAME = "lora_vlm.json"  # task / prompt / base of an exported PEFT dir or merged model
SIDECAR_KEYS = ("base_model", "task", "prompt")


def read_sidecar(folder: str | Path) -> dict[str, str]:
    """``lora_vlm.json``'s base_model / task / prompt strings; {} when the file is absent."""
    path = Path(folder) / SIDECAR_NAME
    if not path.is_file():
        return {}
    data = read_json_object(path, SIDECAR_NAME)
    bad = [k for k in SIDECAR_KEYS if k in data and not isinstance(data[k], str)]
    if bad:
        raise AdapterFileError(f"{path}: {bad[0]!r} is {data[bad[0]]!r}, expected a string")
    return {k: data[k] for k in SIDECAR_KEYS if k in data}


def _peft_metadata(folder: Path) -> dict[str, str]:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFileError(f"{folder}: a directory without {CONFIG_NAME}, so not a PEFT "
                               "adapter directory (lora-vlm adapters are .safetensors files)")
    base = read_json_object(config_path, "PEFT config").get("base_model_name_or_path")
    meta = {"base_model": base} if isinstance(base, str) and base else {}
    return {**meta, **read_sidecar(folder)}


def adapter_metadata(path: str | Path) -> dict[str, str]:
    """String metadata of an adapter file or PEFT directory: at least what it knows of
    ``base_model``, ``task`` and ``prompt`` (a file's metadata holds more)."""
    path = Path(path)
    if path.is_dir():  # PEFT's layout is checked when it loads
        return _peft_metadata(path)
    return read_metadata(path)


def load_adapter_path(target: nn.Module | LoRAInjection, path: str | Path,
                      name: str) -> LoRAInjection:
    """Load an adapter file or a PEFT directory as adapter ``name``, validated before the
    model changes (lora.load_adapter / lora.load_peft)."""
    if Path(path).is_dir():
        return load_peft(target, path, name=name)
    return load_adapter(target, path, name=name)
