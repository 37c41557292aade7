"""PiSSA and OLoRA: adapters that start from the base weight, trained on its residual.

PiSSA (Meng et al. 2024, arXiv:2404.02948): s·B0A0 is the top-r SVD part of W,
B0 = U_r (S_r/s)^½, A0 = (S_r/s)^½ V_rᵀ. OLoRA (Büyükakyüz 2024, arXiv:2406.01775; PEFT's
olora_init): W = QR, B0 = Q[:, :r], A0 = R[:r]. While training, the Linear's weight holds
W_res = W − s·B0A0, so the model starts exactly at the base (up to W's rounding), and
``LoRAInjection`` restores the original W when the adapter is deleted or the injection removed.

Saving converts (PEFT's ``path_initial_model_for_weight_conversion``): the trained delta on the
ORIGINAL base is s(BA − B0A0) = s·[B, −B0]·[A; A0], a plain LoRA of rank 2r whose alpha is
doubled (×√2 under rsLoRA) so the scale stays s. The file's ``converted_from`` metadata keeps the
original settings, and ``to_training_form`` splits such a file back (for --resume): the halves
are A, B and A0, −B0 exactly. Quantized bases are refused: the residual would be quantized
again, so the converted adapter on the original quantized base would not give the trained
model's outputs (the identity this variant rests on).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING

import torch

from .config import LoRAConfig
from .quantized_linear import QuantizedLinear

if TYPE_CHECKING:
    from .injection import AdapterSet, LoRAInjection

# path -> (A, B, alpha) as a file stores them
Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def pissa_factors(weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, in), B0 (out, r)) with scale·B0A0 = the top-r singular part of ``weight``."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = (s[:r] / scale).sqrt()
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root).contiguous()


def olora_factors(weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) = (R[:r], Q[:, :r]) of the reduced QR of ``weight`` (scale does not enter)."""
    q, rr = torch.linalg.qr(weight.float())  # (out, k), (k, in), k = min(out, in)
    return rr[:r].contiguous(), q[:, :r].contiguous()


FACTORS = {"pissa": pissa_factors, "olora": olora_factors}


def residual(weight: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor,
             scale: float) -> torch.Tensor:
    """W − scale·B0A0 in fp32, rounded once to W's dtype (the same ops on init and resume)."""
    return (weight.float() - scale * (b0 @ a0)).to(weight.dtype)


def _check(injection: LoRAInjection, adapter: AdapterSet) -> None:
    """Refuse, before anything changes, what the residual cannot be formed on."""
    method = adapter.config.init
    if injection.merged:
        raise ValueError(f"init {method}: unmerge adapters {injection.merged} first (the base "
                         "weight would hold their delta)")
    for path, layer in adapter.items():
        linear = injection._linears[path]
        if isinstance(linear, QuantizedLinear):
            raise ValueError(
                f"init {method} replaces the base weight by its residual, which a quantized base "
                f"({path} is {linear.mode}) would round again: train {method} on an unquantized "
                "base (drop --quantize), or use the default init with --quantize (QLoRA)")
        if path in injection._originals:
            raise ValueError(f"init {method}: {path} already holds another adapter's residual "
                             "(one PiSSA/OLoRA adapter per Linear)")
        if layer.r > min(layer.in_features, layer.out_features):
            raise ValueError(f"init {method}: rank {layer.r} exceeds {path}'s smaller dimension "
                             f"({layer.out_features} × {layer.in_features})")


@torch.no_grad()
def initialise_from_weights(injection: LoRAInjection, name: str) -> None:
    """Set adapter ``name``'s A, B by its config's init (pissa/olora), keep them as (A0, B0),
    and replace each targeted weight by its residual: outputs stay the base's."""
    adapter = injection._get(name)
    _check(injection, adapter)
    factors = FACTORS[adapter.config.init]
    for path, layer in adapter.items():
        weight = injection._linears[path].weight
        a0, b0 = factors(weight, layer.r, layer.base_scale)
        layer.A.copy_(a0)
        layer.B.copy_(b0)
        adapter.initial[path] = (layer.A.detach().clone(), layer.B.detach().clone())
        injection.replace_base_weight(path, residual(weight, layer.A, layer.B, layer.base_scale))


def alpha_factor(rslora: bool) -> float:
    """How alpha grows when the rank doubles and the scale must not change (PEFT's rule)."""
    return math.sqrt(2) if rslora else 2.0


def saved_form(adapter: AdapterSet) -> tuple[LoRAConfig, Factors, dict[str, str]]:
    """What a file holds for ``adapter``: config, per-path (A, B, alpha) and metadata extras.

    A plain adapter as it is; a PiSSA/OLoRA one converted to plain LoRA for the original base.
    """
    cfg = adapter.config
    if not adapter.initial:  # to_plain's result still records what it was converted from
        converted = getattr(adapter, "converted_from", None)
        extra = {"converted_from": converted} if converted else {}
        return cfg, {p: (m.A, m.B, m.alpha) for p, m in adapter.items()}, extra
    k = alpha_factor(cfg.rslora)
    factors = {}
    for path, layer in adapter.items():
        a0, b0 = adapter.initial[path]
        factors[path] = (torch.cat([layer.A.detach(), a0.to(layer.A.device)], dim=0),
                         torch.cat([layer.B.detach(), -b0.to(layer.B.device)], dim=1),
                         layer.alpha * k)
    config = dataclasses.replace(
        cfg, r=2 * cfg.r, alpha=cfg.alpha * k, init="default",
        rank_pattern={p: 2 * v for p, v in cfg.rank_pattern.items()},
        alpha_pattern={p: v * k for p, v in cfg.alpha_pattern.items()})
    original = {"init": cfg.init, "config": cfg.to_dict(),
                "modules": {p: [m.r, m.alpha] for p, m in adapter.items()}}
    return config, factors, {"converted_from": json.dumps(original)}


@torch.no_grad()
def to_plain(injection: LoRAInjection, name: str) -> None:
    """Convert adapter ``name`` in place: original base weights back, the rank-2r plain LoRA
    of ``saved_form`` attached under the same name (outputs unchanged, up to rounding)."""
    adapter = injection._get(name)
    if not adapter.initial:
        return
    config, factors, extra = saved_form(adapter)
    active = name in injection.active
    injection.delete_adapter(name)  # restores the original weights
    spec = {p: (a.shape[0], alpha) for p, (a, _, alpha) in factors.items()}
    state = {f"{p}.lora_{ab}.weight": t for p, (a, b, _) in factors.items()
             for ab, t in (("A", a), ("B", b))}
    plain = injection.attach(name, config, spec, state, activate=active)
    plain.converted_from = extra["converted_from"]


@torch.no_grad()
def to_training_form(injection: LoRAInjection, name: str, metadata: dict[str, str]) -> None:
    """Undo ``to_plain`` for adapter ``name`` loaded from a file whose metadata says
    ``converted_from``: rank r again, (A0, B0) kept, the base weights back to their residuals.
    A file without it is left as loaded."""
    if "converted_from" not in metadata:
        return
    adapter = injection._get(name)
    try:
        original = json.loads(metadata["converted_from"])
        config = LoRAConfig.from_dict(original["config"])
        spec = {p: (int(r), float(alpha)) for p, (r, alpha) in original["modules"].items()}
        if set(spec) != set(adapter.paths) or any(
                2 * spec[p][0] != m.r for p, m in adapter.items()):
            raise ValueError("its modules do not match the adapter's")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"adapter {name!r}: bad 'converted_from' metadata ({e})") from e
    state, initial = {}, {}
    for path, layer in adapter.items():
        r = spec[path][0]
        state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"] = layer.A[:r], layer.B[:, :r]
        initial[path] = (layer.A[r:].detach().clone(), -layer.B[:, r:].detach())
    active = name in injection.active
    injection.delete_adapter(name)
    trained = injection.attach(name, config, spec, state, activate=active)
    _check(injection, trained)
    for path, layer in trained.items():
        a0, b0 = initial[path]
        trained.initial[path] = (a0, b0)
        weight = injection._linears[path].weight
        injection.replace_base_weight(path, residual(weight, a0, b0, layer.base_scale))
