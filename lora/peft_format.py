"""PEFT's adapter directory layout, written and read without importing peft.

Layout (PEFT's documented format): ``adapter_config.json`` + ``adapter_model.safetensors`` with
keys ``base_model.model.<module path>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r) and
metadata ``{"format": "pt"}``; DoRA (``use_dora``) adds ``.lora_magnitude_vector`` (out,).
Trainable token rows: ``trainable_token_indices`` {embedding path: ids} and
``base_model.model.<embedding path>.token_adapter.trainable_tokens_delta`` (k, dim) holding the
new rows W[ids] + delta, not the delta (peft 0.21 TrainableTokensLayer).
Per-module ranks/alphas that differ from ``r`` / ``lora_alpha`` go to ``rank_pattern`` /
``alpha_pattern``. peft >= 0.15 matches their keys as regexes,
``re.match(rf"(.*\\.)?({key})$", module_path)``, first key wins; older peft looks a module's
full path up literally. We write plain full paths, which both read the same way, and check
that no key also selects another Linear. Reading follows peft >= 0.15.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter_file import (
    AdapterFileError,
    atomic_save_tensors,
    factors_state,
    magnitude_state,
    read_adapter_file,
    token_rows_state,
    validate_state,
)
from .config import LoRAConfig
from .init_methods import saved_form
from .injection import LoRAInjection
from .targets import linear_modules
from .token_rows import KEY as TOKEN_ROWS_KEY
from .token_rows import token_embedding

PREFIX = "base_model.model."
TOKEN_VALUES = "token_adapter.trainable_tokens_delta"  # PEFT's name; it holds W[ids] + delta
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"

# LoraConfig fields (peft 0.21) that do not change what a saved A/B pair computes on an
# unmodified base: bookkeeping, and the module selection that the weights file spells out.
# The *_config of an init method only matters through init_lora_weights, checked below.
_INERT = frozenset({
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "runtime_config", "megatron_core", "qalora_group_size",
    "ensure_weight_tying", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
})
_READ = frozenset({"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern",
                   "alpha_pattern", "init_lora_weights", "trainable_token_indices",
                   "use_dora"})
# Fields that change the maths or add tensors, accepted only when off; why, for the message.
_REFUSED = {
    "bias": "PEFT trained the base model's biases too and saved them beside the adapter",
    "fan_in_fan_out": "the weights are stored (in, out), for GPT-2-style Conv1D layers",
    "modules_to_save": "whole modules were trained and saved beside the adapter",
    "layer_replication": "the adapter belongs to a model with replicated layers",
    "lora_bias": "lora_B carries a bias",
    "megatron_config": "the adapter is for Megatron's parallel layers",
    "use_qalora": "QALoRA pools the input in groups before A",
    "alora_invocation_tokens": "aLoRA acts only on tokens after its invocation tokens",
    "target_parameters": "the adapter targets bare nn.Parameters, not Linears",
    "use_bdlora": "BD-LoRA makes A or B block-diagonal",
    "arrow_config": "Arrow routes between several adapters per token",
    "kasa_config": "KaSA truncates the base weight and adds a learned diagonal",
    "velora_config": "VeLoRA adds its own buffers to the adapter",
    "monteclora_config": "MonteCLoRA samples perturbations of A",
}
# init_lora_weights values that leave the base weight alone (MiCA only freezes B in training).
_PLAIN_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica"})
# Inits that subtract s·B0·A0 from W; PEFT converts such adapters to plain LoRA on request.
_CONVERTIBLE_INITS = ("pissa", "olora", "corda", "lora_ga")


def _pattern_key(path: str, patterns: Iterable[str]) -> str | None:
    # peft >= 0.15 get_pattern_key: the first key (in order) with re.match(rf"(.*\.)?({key})$").
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", path)), None)


def _pattern_value(path: str, patterns: Mapping[str, Any], default: Any) -> Any:
    key = _pattern_key(path, patterns)
    return default if key is None else patterns[key]


def _check_unambiguous(linear_names: Iterable[str], paths: list[str],
                       pattern_keys: Iterable[str]) -> None:
    """PEFT reads our keys as we mean them: each target_modules entry (exact or dotted suffix)
    selects no Linear outside the adapter, and each pattern key (a regex, '.' matching any
    character) selects no adapted Linear but its own. Then old peft's literal lookup and new
    peft's regex give every Linear its own r and alpha."""
    adapted = set(paths)
    for name in linear_names:
        if name not in adapted and any(name.endswith("." + p) for p in paths):
            raise ValueError(f"cannot export to PEFT: a target_modules entry would also select "
                             f"{name!r}, which has no adapter (PEFT matches dotted suffixes)")
    for key in pattern_keys:
        last = key.rsplit(".", 1)[-1]  # literal in the regex too: a cheap filter
        for name in paths:
            if name != key and name.endswith(last) and re.match(rf"(.*\.)?({key})$", name):
                raise ValueError(f"cannot export to PEFT: pattern key {key!r} would also set "
                                 f"r/alpha of {name!r} (PEFT matches keys as regexes)")


def save_peft(injection: LoRAInjection, out_dir: str | Path, name: str = "default",
              base_model: str = "") -> Path:
    """Export adapter ``name`` as a PEFT LoRA directory that ``PeftModel.from_pretrained`` reads.

    ``target_modules`` lists the adapted Linears' full paths; ``rank_pattern`` /
    ``alpha_pattern`` hold the full paths whose r / alpha differ from ``r`` / ``lora_alpha``,
    unescaped, so peft before and after its 2025 regex change resolve them alike.
    """
    adapter = injection._get(name)
    cfg, factors, _ = saved_form(adapter)  # PiSSA/OLoRA: converted, as PEFT does
    layers = {p: (a.shape[0], alpha) for p, (a, _, alpha) in factors.items()}
    rank_pattern = {p: r for p, (r, _) in layers.items() if r != cfg.r}
    alpha_pattern = {p: alpha for p, (_, alpha) in layers.items() if alpha != cfg.alpha}
    _check_unambiguous(linear_modules(injection.model), list(layers),
                       [*rank_pattern, *alpha_pattern])
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model or None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "target_modules": list(layers),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": None,
        "layers_to_transform": None,
        "inference_mode": True,
    }
    state = {PREFIX + k: v for k, v in {**factors_state(factors, name),
                                        **magnitude_state(adapter, name)}.items()}
    if (rows := adapter.token_rows) is not None:
        delta = token_rows_state(adapter, name)[rows.key]  # fp32, checked finite
        config["trainable_token_indices"] = {rows.embedding: rows.ids.tolist()}
        values = rows.base_rows(injection.model).cpu() + delta
        state[f"{PREFIX}{rows.embedding}.{TOKEN_VALUES}"] = values.contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(state, out_dir / WEIGHTS_NAME, {"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _token_indices(config: dict, model: nn.Module, source: str) -> list[int]:
    """``trainable_token_indices`` checked: it names this model's token embedding (a list:
    PEFT's get_input_embeddings(); an object: modules matched by name ending, each the
    embedding or tied to it, with one id list); ids distinct ints. [] when absent."""
    value = config.get("trainable_token_indices")
    if _is_off(value):
        return []
    path = token_embedding(model)
    weight = model.get_submodule(path).weight
    if isinstance(value, list):
        get_input = getattr(model, "get_input_embeddings", None)
        if get_input is None or get_input() is not model.get_submodule(path):
            raise AdapterFileError(f"{source}: trainable_token_indices is a list, which PEFT "
                                   f"applies to the input embedding; lora-vlm trains {path}")
        lists = [value]
    elif isinstance(value, dict):
        lists = []
        for name, ids in value.items():
            found = [m for n, m in model.named_modules(remove_duplicate=False)
                     if isinstance(name, str) and n.endswith(name)]
            if not found or any(getattr(m, "weight", None) is not weight for m in found):
                raise AdapterFileError(f"{source}: trainable_token_indices key {name!r} is not "
                                       f"{path} or a module tied to it (lora-vlm trains those)")
            lists.append(ids)
    else:
        raise AdapterFileError(f"{source}: trainable_token_indices={value!r}, expected a list "
                               "of ids or an object of module name -> ids")
    ids = lists[0]
    if any(other != ids for other in lists) or not isinstance(ids, list) or not all(
            _is_index(i) for i in ids) or len(set(ids)) != len(ids):
        raise AdapterFileError(f"{source}: trainable_token_indices={value!r}: expected one list "
                               "of distinct token ids for the embedding and its tied modules")
    return ids


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {}


def _check_init(init: Any, source: str) -> None:
    if isinstance(init, bool) or (isinstance(init, str) and init in _PLAIN_INITS):
        return
    head = (f"{source}: init_lora_weights={init!r}: lora-vlm adds adapters to the base weights "
            "as they are, ")
    if isinstance(init, str) and init.lower().startswith(_CONVERTIBLE_INITS):
        raise AdapterFileError(
            head + "but this adapter was trained on a base from which PEFT subtracted its "
            "initial low-rank part (PEFT redoes that subtraction when it loads the adapter). "
            "Convert it with PEFT: save_pretrained(..., path_initial_model_for_weight_conversion="
            "<the adapter saved right after initialisation>) writes a plain LoRA adapter "
            "(init_lora_weights true, rank 2r); or merge_and_unload() and use the merged model.")
    if init == "loftq":
        raise AdapterFileError(
            head + "but this adapter was trained on LoftQ's quantized approximation of the base. "
            "Load it with PEFT on that base and merge_and_unload(), then use the merged model.")
    raise AdapterFileError(head + "and this value is unknown to it: it cannot tell whether that "
                           "initialisation changed the base weights")


def _check_supported(config: dict, source: str) -> None:
    """Refuse what would make this adapter compute something else here than in PEFT."""
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{source}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    for key, value in config.items():
        if key in _READ or key in _INERT or (key == "bias" and value == "none"):
            continue
        if key in _REFUSED and not _is_off(value):
            raise AdapterFileError(f"{source}: {key}={value!r} is not supported "
                                   f"({_REFUSED[key]}; lora-vlm computes LoRA and DoRA only)")
        if key not in _REFUSED and not _is_off(value):
            raise AdapterFileError(
                f"{source}: {key}={value!r} is a setting lora-vlm does not know (written by "
                f"peft {config.get('peft_version', '?')}); it cannot tell whether it changes "
                "what the adapter computes")
    _check_init(config.get("init_lora_weights", True), source)


def _is_rank(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_real(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _setting(config: dict, key: str, source: str, ok: Callable[[Any], bool], want: str,
             default: Any = ...) -> Any:
    if key not in config:
        if default is ...:
            raise AdapterFileError(f"{source}: no {key!r} (PEFT always writes it)")
        return default
    if not ok(config[key]):
        raise AdapterFileError(f"{source}: {key}={config[key]!r}, expected {want}")
    return config[key]


def _patterns(config: dict, key: str, source: str, ok: Callable[[Any], bool],
              want: str) -> dict[str, Any]:
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        raise AdapterFileError(f"{source}: {key} is a {type(patterns).__name__}, expected an "
                               "object of module pattern -> value")
    for k, v in patterns.items():
        try:
            re.compile(rf"(.*\.)?({k})$")
        except re.error as e:
            raise AdapterFileError(f"{source}: {key} key {k!r} is not a regex ({e})") from e
        if not ok(v):
            raise AdapterFileError(f"{source}: {key}[{k!r}]={v!r}, expected {want}")
    return patterns


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``, or an AdapterFileError naming it (``what``: "PEFT config")."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterFileError(f"{path}: cannot read {what} ({e})") from e
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: not a JSON object")
    return data


def _read_config(config_path: Path) -> tuple[dict, LoRAConfig]:
    """The validated config: its rank_pattern / alpha_pattern by name, and a LoRAConfig."""
    source = str(config_path)
    config = read_json_object(config_path, "PEFT config")
    _check_supported(config, source)
    r = _setting(config, "r", source, _is_rank, "a positive integer")
    alpha = _setting(config, "lora_alpha", source, _is_real, "a finite number")
    dropout = _setting(config, "lora_dropout", source, lambda v: _is_real(v) and 0 <= v < 1,
                       "a number in [0, 1)", 0.0)
    rslora = _setting(config, "use_rslora", source, lambda v: isinstance(v, bool), "true/false",
                      False)
    dora = _setting(config, "use_dora", source, lambda v: isinstance(v, bool), "true/false", False)
    patterns = {"rank_pattern": _patterns(config, "rank_pattern", source, _is_rank,
                                          "a positive integer"),
                "alpha_pattern": _patterns(config, "alpha_pattern", source, _is_real,
                                           "a finite number")}
    return patterns, LoRAConfig(r=r, alpha=float(alpha), dropout=float(dropout), rslora=rslora,
                                dora=dora)


def _token_rows_state(model: nn.Module, ids: list[int], tensors: dict[str, torch.Tensor],
                     source: str) -> dict[str, torch.Tensor]:
    """Pop PEFT's new rows from ``tensors`` and return them as our delta (rows minus W[ids],
    ids sorted) under the token-rows key; {} without trainable tokens."""
    if not ids:
        return {}
    path = token_embedding(model)
    weight = model.get_submodule(path).weight
    key = f"{path}.{TOKEN_VALUES}"
    values = tensors.pop(key, None)
    if values is None:
        raise AdapterFileError(f"{source}: trainable_token_indices is set but there is no key "
                               f"{PREFIX + key!r}")
    if tuple(values.shape) != (len(ids), weight.shape[1]) or not values.is_floating_point():
        raise AdapterFileError(f"{source}: key {PREFIX + key!r} is {values.dtype} "
                               f"{tuple(values.shape)}, expected ({len(ids)}, {weight.shape[1]})")
    if max(ids) >= weight.shape[0]:
        raise AdapterFileError(f"{source}: token id {max(ids)} is outside this model's "
                               f"vocabulary of {weight.shape[0]}")
    if bad := int((~torch.isfinite(values)).sum()):
        raise AdapterFileError(f"{source}: key {PREFIX + key!r} holds {bad} NaN/inf values")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    index = torch.tensor([ids[i] for i in order])
    delta = values[order].float() - weight.detach()[index.to(weight.device)].float().cpu()
    return {f"{path}.{TOKEN_ROWS_KEY}": delta}


def load_peft(target: nn.Module | LoRAInjection, in_dir: str | Path, name: str = "default",
              activate: bool = True) -> LoRAInjection:
    """Import a PEFT LoRA directory into a model or injection, validated like load_adapter.

    Refuses, before the model changes, configs that are incomplete or malformed, that use
    settings changing the maths (trained biases, fan_in_fan_out...), or whose adapter fits
    only a base PEFT modified at initialisation (PiSSA, OLoRA, CorDA, LoRA-GA unless
    converted; LoftQ).
    """
    in_dir = Path(in_dir)
    config_path, weights_path = in_dir / CONFIG_NAME, in_dir / WEIGHTS_NAME
    patterns, cfg = _read_config(config_path)
    tensors, _ = read_adapter_file(weights_path)
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise AdapterFileError(f"{weights_path}: unexpected key {bad[0]!r} (no {PREFIX!r} prefix)")
    tensors = {k[len(PREFIX):]: v for k, v in tensors.items()}
    model = target.model if isinstance(target, LoRAInjection) else target
    token_ids = _token_indices(read_json_object(config_path, "PEFT config"), model,
                               str(config_path))
    rows_state = _token_rows_state(model, token_ids, tensors, str(weights_path))
    linears = linear_modules(model)
    order = {n: i for i, n in enumerate(linears)}  # model order, not the file's sorted order
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in tensors}, key=lambda p: order.get(p, -1))
    spec = {}
    for p in paths:
        ranks = patterns["rank_pattern"]
        r = _pattern_value(p, ranks, cfg.r)
        a = tensors.get(f"{p}.lora_A.weight")
        if a is not None and a.ndim == 2 and a.shape[0] != r:
            key = _pattern_key(p, ranks)
            said = f"r={r}" if key is None else f"rank_pattern key {key!r} gives r={r}"
            raise AdapterFileError(f"{config_path}: {said} for {p!r}, but its lora_A in "
                                   f"{weights_path} has rank {a.shape[0]}")
        spec[p] = (r, float(_pattern_value(p, patterns["alpha_pattern"], cfg.alpha)))
    validate_state(linears, spec, tensors, str(weights_path), cfg.dora)
    cfg.targets, cfg.trainable_tokens = tuple(paths), tuple(sorted(token_ids))
    injection = target if isinstance(target, LoRAInjection) else LoRAInjection(model)
    injection.attach(name, cfg, spec, {**tensors, **rows_state}, activate=activate)
    return injection
