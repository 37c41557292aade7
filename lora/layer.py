"""LoRALinear: the low-rank delta of one frozen nn.Linear (Hu et al., 2021, arXiv:2106.09685)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_alpha, check_dropout, check_rank


class LoRALinear(nn.Module):
    """Computes only the delta ``scale · dropout(x) Aᵀ Bᵀ`` for a Linear of shape (out, in).

    A is (r, in) and B is (out, r); ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA,
    Kalajdzievski 2023, arXiv:2312.03732). Parameters stay in fp32 so optimizers and GradScaler
    see fp32 grads; the computation runs in the input's dtype (or autocast's).
    The module never touches the base weight: a forward hook adds this delta to the base output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_rank(r, "LoRA rank r")
        check_dropout(dropout, "LoRA dropout")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.alpha, self.rslora = check_alpha(alpha, "LoRA alpha"), rslora
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=torch.float32))
        self.dropout = dropout
        self.base_scale = self.alpha / (math.sqrt(r) if rslora else r)
        self.scale = self.base_scale  # base_scale × the run-time multiplier (set_scale)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A kaiming-uniform, B zeros: a fresh adapter changes nothing, yet B gets gradients."""
        # a=sqrt(5) is nn.Linear's own init (torch.nn.Linear.reset_parameters; litgpt/lora.py).
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def forward(self, x: torch.Tensor, training: bool | None = None,
                base: torch.Tensor | None = None) -> torch.Tensor:
        """(..., in) -> the delta (..., out), or ``base + delta`` when ``base`` is given.

        Dropout runs when ``training`` (default: self.training); the hook passes the hooked
        Linear's mode, so ``model.eval()`` alone turns it off. With ``base`` the scale and the
        sum ride in one addmm (no separate elementwise passes over the (..., out) output).
        """
        if self.dropout and (self.training if training is None else training):
            x = F.dropout(x, self.dropout)
        h = F.linear(x, self.A.to(x.dtype))  # (..., r)
        b = self.B.to(h.dtype)
        if base is None:
            return F.linear(h, b) * self.scale
        out = torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, self.r), b.t(),
                          alpha=self.scale)
        return out.view(base.shape)

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) matrix ``scale · B A`` in fp32, as merged into the base weight."""
        return (self.B @ self.A) * self.scale

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 base ``weight`` with this adapter folded in: W + scale·B A."""
        return weight + self.delta_weight()

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of merged_weight, up to rounding: W' - scale·B A."""
        return weight - self.delta_weight()

    def extra_repr(self) -> str:
        rs = ", rslora" if self.rslora else ""
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"dropout={self.dropout}{rs}")
