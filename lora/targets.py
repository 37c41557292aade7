"""Which nn.Linear layers get an adapter: presets per model part, suffixes and regexes.

A target is one of
  * a preset name from PRESETS (``vision``, ``text``, ``qformer``, ``language``);
  * ``re:<regex>``: the regex must match the whole module path;
  * anything else: a module-path suffix on dot boundaries (``query`` matches
    ``...attention.self.query``; ``attention.output.dense`` does not match ``output.dense``).
Only nn.Linear modules (and their QuantizedLinear stand-ins) are candidates. A target that
matches nothing is an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import nn

from .quantized_linear import QuantizedLinear

_LAYER = r"\.\d+\."
# Full-match regexes, spelled out per model family (names checked on transformers 5.23).
PRESETS: dict[str, str] = {
    # BLIP and BLIP-2 ViT: fused qkv, attention output, MLP.
    "vision": rf"vision_model\.encoder\.layers{_LAYER}(self_attn\.(qkv|projection)|mlp\.fc[12])",
    # BLIP text decoder (captioning) and text encoder (VQA); the LM head is left out on purpose:
    # its weight is tied to the word embeddings.
    "text": (
        rf"text_(decoder\.bert|encoder)\.encoder\.layer{_LAYER}"
        r"((attention|crossattention)\.(self\.(query|key|value)|output\.dense)"
        r"|intermediate\.dense|output\.dense)"
    ),
    # BLIP-2 Q-Former: self- and cross-attention and the query-token feed-forward.
    "qformer": (
        rf"qformer\.encoder\.layer{_LAYER}"
        r"((attention|crossattention)\.(attention\.(query|key|value)|output\.dense)"
        r"|intermediate_query\.dense|output_query\.dense)"
    ),
    # BLIP-2 language model: OPT decoder layers or T5 blocks (lm_head excluded).
    "language": (
        r"language_model\.("
        rf"model\.decoder\.layers{_LAYER}(self_attn\.(q|k|v|out)_proj|fc[12])"
        rf"|(encoder|decoder)\.block{_LAYER}layer{_LAYER}"
        r"((SelfAttention|EncDecAttention)\.[qkvo]|DenseReluDense\.(wi|wo|wi_0|wi_1))"
        r")"
    ),
}


def matches(name: str, pattern: str) -> bool:
    """Whether module path ``name`` is selected by one target ``pattern``."""
    if pattern in PRESETS:
        return re.fullmatch(PRESETS[pattern], name) is not None
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


# What an adapter can hook: a plain Linear, or one whose frozen weight is quantized.
LINEAR_TYPES = (nn.Linear, QuantizedLinear)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear (quantized or not) of ``model`` by path, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)}


def linear_names(model: nn.Module) -> list[str]:
    """Paths of every nn.Linear (quantized or not) in ``model``, in module order."""
    return list(linear_modules(model))


def candidate_summary(names: Iterable[str]) -> str:
    """Linear paths with layer indices folded to N, to show what a target could have named."""
    folded = dict.fromkeys(re.sub(r"\.\d+\.", ".N.", n) for n in names)
    return "\n  ".join(folded)


def select_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Module paths of the Linears selected by any of ``targets``; each must match something."""
    names = linear_names(model)
    targets = list(targets)
    for t in targets:
        if not any(matches(n, t) for n in names):
            raise ValueError(
                f"LoRA target {t!r} matches no nn.Linear in {type(model).__name__}. "
                f"Presets: {sorted(PRESETS)}. Linear layers:\n  {candidate_summary(names)}"
            )
    return [n for n in names if any(matches(n, t) for t in targets)]


def first_match(name: str, patterns: Mapping[str, float]) -> float | None:
    """The value of the first pattern (in order) that selects ``name``, else None."""
    return next((v for p, v in patterns.items() if matches(name, p)), None)
