"""Which nn.Linear layers get an adapter: presets per model part, suffixes and regexes.

A target is one of
  * ``auto``: the preset set of the model's family (AUTO_TARGETS), resolved per model;
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
# Full-match regexes, spelled out per model family (names checked on transformers 5.23 and 5.24).
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


# --targets auto, per model family. What an adapter file stores is the resolved preset names,
# so a saved adapter never depends on what ``auto`` means in a later version.
AUTO_TARGETS: dict[str, tuple[str, ...]] = {
    # Every Linear but the LM head (tied to the word embeddings). VQA's ``text`` covers both the
    # question encoder and the answer decoder. Reached 98% exact match here (FIELD_NOTES.md).
    "BLIP caption": ("vision", "text"),
    "BLIP VQA": ("vision", "text"),
    # The Q-Former (the part BLIP-2 trains between its frozen ViT and LLM) and the language
    # model's attention + MLP (q/k/v/o + fc1/fc2 or wi/wo, as PEFT recipes for OPT/T5 do). The
    # ViT is left out: with no adapter there, backward stops at the Q-Former's cross-attention.
    # ViT-g runs 1B parameters over 257 tokens per image, about what OPT-2.7B costs over 100
    # tokens, so its backward would cost as much as the language model's or more on short
    # texts. Add it with --targets auto,vision (the BLIP-2 paper tunes the ViT too when fully
    # fine-tuning for captioning).
    "BLIP-2 OPT": ("qformer", "language"),
    "BLIP-2 T5": ("qformer", "language"),
}


def model_family(model: nn.Module) -> str | None:
    """The AUTO_TARGETS family of ``model`` (BLIP-2 by its language model type), else None."""
    kind = type(model).__name__
    if kind == "Blip2ForConditionalGeneration":
        language = getattr(getattr(model.config, "text_config", None), "model_type", None)
        kind = {"opt": "BLIP-2 OPT", "t5": "BLIP-2 T5"}.get(language, kind)
    kind = {"BlipForConditionalGeneration": "BLIP caption",
            "BlipForQuestionAnswering": "BLIP VQA"}.get(kind, kind)
    return kind if kind in AUTO_TARGETS else None


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


def _presets_here(model: nn.Module, names: list[str]) -> str:
    """Which presets select something in ``model``, and what ``auto`` means for it."""
    here = [p for p in PRESETS if any(matches(n, p) for n in names)]
    family = model_family(model)
    auto = f" (auto = {', '.join(AUTO_TARGETS[family])})" if family else ""
    return f"presets that match here: {', '.join(here) or 'none'}{auto}"


def resolve_targets(model: nn.Module, targets: Iterable[str]) -> tuple[str, ...]:
    """``targets`` with ``auto`` replaced by the model family's presets, duplicates dropped;
    each must select at least one Linear of ``model`` (ValueError naming what would)."""
    names = linear_names(model)
    resolved: list[str] = []
    for t in targets:
        if t != "auto":
            resolved.append(t)
        elif (family := model_family(model)) is not None:
            resolved += AUTO_TARGETS[family]
        else:
            raise ValueError(f"--targets auto: no preset set for {type(model).__name__} (known: "
                             f"{', '.join(AUTO_TARGETS)}); name the targets; "
                             f"{_presets_here(model, names)}")
    for t in resolved:
        if not any(matches(n, t) for n in names):
            raise ValueError(
                f"LoRA target {t!r} matches no nn.Linear in {type(model).__name__}; "
                f"{_presets_here(model, names)}. Linear layers:\n  {candidate_summary(names)}")
    return tuple(dict.fromkeys(resolved))


def select_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Module paths of the Linears selected by any of ``targets`` (``auto`` resolved); each
    target must match something."""
    targets = resolve_targets(model, targets)
    return [n for n in linear_modules(model) if any(matches(n, t) for t in targets)]


def first_match(name: str, patterns: Mapping[str, float]) -> float | None:
    """The value of the first pattern (in order) that selects ``name``, else None."""
    return next((v for p, v in patterns.items() if matches(name, p)), None)


def unmatched_patterns(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The ``patterns`` (rank/alpha override keys) that select none of ``names``."""
    names = list(names)
    return [p for p in patterns if not any(matches(n, p) for n in names)]
