"""LoRAConfig: the hyper-parameters of one adapter, as saved in its file's metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LoRAConfig:
    """Rank, alpha, dropout, rsLoRA and which Linears get an adapter (see lora.targets).

    ``rank_pattern`` / ``alpha_pattern`` override r / alpha for the Linears a pattern matches
    (same syntax as ``targets``; the first matching pattern wins).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: tuple[str, ...] = ("vision", "text")
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if self.r <= 0 or any(r <= 0 for r in self.rank_pattern.values()):
            raise ValueError(f"LoRA ranks must be positive: r={self.r}, {self.rank_pattern}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("targets is empty: name a preset, a module suffix or a 're:' regex")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (targets as a list)."""
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        """Inverse of to_dict; unknown keys are an error, not silently dropped."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LoRAConfig keys: {sorted(unknown)}")
        return cls(**d)
