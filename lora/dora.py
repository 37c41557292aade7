"""DoRALinear: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

The adapted Linear computes ``m ⊙ (W + sBA) x / ‖W + sBA‖_row + b``: the direction of each
output feature's weight row comes from W + sBA (plain LoRA), its length from a trained
magnitude ``m`` (out,). The row norm (over the input dim) is detached from the graph, as the
paper's §4.3 suggests and PEFT does, so m and A/B get gradients and the norm none.
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import LoRALinear
from .quantized_linear import QuantizedLinear

# PEFT's state-dict name for m, which adapter files and PEFT exports share.
MAGNITUDE_KEY = "lora_magnitude_vector"


class AdapterConflictError(ValueError):
    """A DoRA adapter used together with another adapter on the same Linear."""


def frozen_weight(linear: nn.Module) -> torch.Tensor:
    """The (out, in) weight a base Linear computes with, in fp32 (a quantized one dequantized)."""
    if isinstance(linear, QuantizedLinear):
        return linear.dequantize(torch.float32)
    return linear.weight.float()


class DoRALinear(LoRALinear):
    """LoRALinear plus the magnitude ``m`` (out,), fp32; the hook passes the base Linear.

    ``m`` starts at ‖W‖_row (``init_magnitude``), so a fresh adapter (B = 0) changes nothing.
    Dropout applies to the low-rank branch only (as in this project's LoRA): with dropout off,
    or in eval mode, the output equals PEFT's; in training PEFT also recomputes x Wᵀ on the
    dropped-out input, one more full matmul per layer.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, r, alpha, dropout, rslora, device)
        self.magnitude = nn.Parameter(torch.ones(out_features, device=device,
                                                 dtype=torch.float32))
        self.merged_norm: torch.Tensor | None = None  # ‖W + sBA‖_row at merge, for unmerge

    @torch.no_grad()
    def init_magnitude(self, weight: torch.Tensor) -> None:
        """m = ‖W‖_row of the base ``weight`` (out, in)."""
        self.magnitude.copy_(torch.linalg.vector_norm(weight.float(), dim=1))

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """‖W + sBA‖_row (out,) in fp32, detached (no gradient reaches A or B through it)."""
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            return torch.linalg.vector_norm(weight.float() + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor, training: bool | None = None,  # type: ignore[override]
                base: torch.Tensor | None = None, linear: nn.Module | None = None
                ) -> torch.Tensor:
        """The adapted output (..., out) from the base output ``base = x Wᵀ + b`` of ``linear``:
        ``g ⊙ (base - b + s·dropout(x) Aᵀ Bᵀ) + b`` with ``g = m / ‖W + sBA‖_row``."""
        if base is None or linear is None:
            raise ValueError("DoRALinear needs the base output and the base Linear (it rescales "
                             "the whole output, not only the low-rank delta)")
        g = self.magnitude / self.weight_norm(frozen_weight(linear))  # (out,)
        delta = super().forward(x, training)  # (..., out), s·dropout(x) Aᵀ Bᵀ
        bias = linear.bias
        out = g * (base + delta if bias is None else base - bias + delta)
        return (out if bias is None else out + bias).to(base.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """m ⊙ (W + sBA) / ‖W + sBA‖_row for the fp32 base ``weight``; keeps the norm."""
        combined = weight + self.delta_weight()
        self.merged_norm = torch.linalg.vector_norm(combined, dim=1)
        return (self.magnitude / self.merged_norm)[:, None] * combined

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W from the merged W' with the norm kept at merge: W' ‖W + sBA‖ / m - sBA."""
        if self.merged_norm is None:
            raise RuntimeError("this DoRA layer was never merged")
        norm, self.merged_norm = self.merged_norm, None
        return weight * (norm / self.magnitude)[:, None] - self.delta_weight()

    def invertible(self) -> bool:
        """Whether unmerged_weight can recover W (it divides by m)."""
        return bool((self.magnitude != 0).all())

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"
