"""LoRAConfig: the hyper-parameters of one adapter, as saved in its file's metadata."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from numbers import Real
from typing import Any


def check_rank(r: Any, what: str = "r") -> int:
    """``r`` if it is a positive int (bools and 2.0 are not), else ValueError naming ``what``."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{what} must be a positive integer, got {r!r}")
    return r


def check_alpha(alpha: Any, what: str = "alpha") -> float:
    """``alpha`` as a float if it is a finite number, else ValueError naming ``what``."""
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha):
        raise ValueError(f"{what} must be a finite number, got {alpha!r}")
    return float(alpha)


def check_dropout(p: Any, what: str = "dropout") -> float:
    """``p`` as a float if it is a number in [0, 1), else ValueError naming ``what``."""
    if isinstance(p, bool) or not isinstance(p, Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {p!r}")
    return float(p)


# How an adapter starts: "default" (A kaiming, B zeros) or from the base weight (lora.init_methods).
INIT_METHODS = ("default", "pissa", "olora")
# Fields added by LoRA variants; saved only when not at their default (see to_dict).
VARIANT_FIELDS = ("trainable_tokens", "init", "dora")


@dataclass
class LoRAConfig:
    """Rank, alpha, dropout, rsLoRA, DoRA and which Linears get an adapter (see lora.targets).

    ``targets`` defaults to ``auto`` (the model family's presets); an adapter created from this
    config stores the resolved names instead. ``rank_pattern`` / ``alpha_pattern`` override r /
    alpha for the Linears a pattern matches (same syntax as ``targets``; the first matching
    pattern wins). ``trainable_tokens`` also trains those rows of the token embedding (and of
    the LM head tied to it), see lora.token_rows. ``init`` "pissa" / "olora" starts the adapter
    from the base weight, which holds the residual while training (lora.init_methods).
    ``dora`` adds a trained magnitude per output feature (lora.dora).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: tuple[str, ...] = ("auto",)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    trainable_tokens: tuple[int, ...] = ()  # token ids whose embedding rows train (token_rows)
    init: str = "default"
    dora: bool = False

    def __post_init__(self) -> None:
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        self.trainable_tokens = tuple(self.trainable_tokens)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                   for i in self.trainable_tokens):
            raise ValueError(f"trainable_tokens must be token ids (integers >= 0), got "
                             f"{list(self.trainable_tokens)}")
        check_rank(self.r)
        check_alpha(self.alpha)
        check_dropout(self.dropout)
        for flag in ("rslora", "dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"init must be one of {', '.join(INIT_METHODS)}, got {self.init!r}")
        if self.dora and self.init != "default":
            raise ValueError(f"DoRA with init {self.init!r} is not supported: the conversion "
                             "for the original base is defined for plain LoRA only")
        if not self.targets or not all(isinstance(t, str) for t in self.targets):
            raise ValueError(f"targets must be non-empty strings (a preset, a module suffix or "
                             f"a 're:' regex), got {list(self.targets)}")
        for name, check in (("rank_pattern", check_rank), ("alpha_pattern", check_alpha)):
            patterns = getattr(self, name)
            if not isinstance(patterns, dict):
                raise ValueError(f"{name} must map patterns to values, got {patterns!r}")
            for pattern, value in patterns.items():
                check(value, f"{name}[{pattern!r}]")

    def tensors_beyond_ab(self) -> str | None:
        """What this adapter trains besides its (A, B) pairs, for messages of code that only
        handles plain LoRA (arithmetic, per-sample mixing); None for plain LoRA."""
        if self.dora:
            return "a DoRA adapter"
        return "an adapter with trainable token rows" if self.trainable_tokens else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (targets as a list). Variant fields at their defaults are left
        out, so a plain LoRA adapter's file reads in versions that predate those variants."""
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["trainable_tokens"] = list(self.trainable_tokens)
        for name in VARIANT_FIELDS:
            if getattr(self, name) == self.__dataclass_fields__[name].default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        """Inverse of to_dict; unknown keys are an error, not silently dropped."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LoRAConfig keys: {sorted(unknown)}")
        return cls(**d)
