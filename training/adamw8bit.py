"""AdamW with 8-bit moments (Dettmers et al., 2022, "8-bit Optimizers via Block-wise
Quantization", arXiv:2110.02861), in pure torch, as bitsandbytes' ``AdamW8bit`` stores them.

Every parameter with at least 4096 elements (``min_8bit_size``, bitsandbytes' default) keeps
its first moment m and second moment v as one byte per element: the flattened moment is cut
into blocks of 256, each block is divided by its absmax (one fp32 per block), and each value is
stored as the index of the nearest of 256 codes. Each step dequantizes m and v to fp32, makes
exactly torch.optim.AdamW's update with the new fp32 moments, then quantizes them again with
fresh block absmaxes. Smaller tensors keep fp32 moments (quantizing them saves next to
nothing). State: 2 bytes per parameter + 8 bytes per 256 (the two absmaxes), against 8 for
AdamW.

The codes: bitsandbytes' "dynamic" map (signed, for m) and its unsigned variant (for v):
8-bit dynamic tree quantization (Dettmers, 2015, arXiv:1511.04561), whose values go from 1
down to 1e-7 with ~2 significant digits each. Chosen over the linear absmax/127 codes of
lora/quant_formats.py because v spans many orders of magnitude within a block: with linear
codes every v below absmax/254 of its block rounds to 0, and its parameter's update becomes
m / eps. The maps are built by the same formula as bitsandbytes' ``create_dynamic_map``
(bit-equal to bitsandbytes 0.50.2's, checked).

Checked against bitsandbytes 0.50.2's AdamW8bit on CPU (torch 2.13, lr 1e-2, wd 0.01, 20 steps
on a 128×64 tensor, gradients N(0, 1)·10^U(-4, 0)): both make the same fp32 update; its CPU
quantizer is not round-to-nearest (it differs from the nearest code on 30-36% of values, always
farther), so states and parameters differ: mean |Δp| against fp32 AdamW was 0.0015 here, 0.0028
for bitsandbytes (parameters moved 0.042 on average).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from lora.quant_formats import _safe

BLOCK = 256
MIN_8BIT_SIZE = 4096
CODE_KEYS = ("m_codes", "v_codes")
ABSMAX_KEYS = ("m_absmax", "v_absmax")


@functools.lru_cache(maxsize=2)
def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted fp32 codes of bitsandbytes' ``create_dynamic_map(signed)``: 0, 1 and, per
    decade 10^-6 … 10^0, evenly spaced fractions (more of them in the larger decades)."""
    data: list[float] = []
    for i in range(7):  # decade 10^(i-6); signed maps share the fraction bits with the sign
        items = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10 ** (i - 6) * means).tolist()  # fp32 products, as bitsandbytes
        if signed:
            data += (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]  # 2 × 127 + 2 signed, 254 + 2 unsigned: 256 codes either way
    return torch.tensor(sorted(data), dtype=torch.float32)


@functools.lru_cache(maxsize=4)
def _midpoints(signed: bool, device: torch.device) -> torch.Tensor:
    code = dynamic_map(signed).to(device)
    return (code[1:] + code[:-1]) / 2


def quantize_blockwise(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 code indices shaped like ``x``, fp32 absmax per block of 256 flat values).

    Each value becomes the nearest code to x / absmax (a tie goes to the lower code), except
    that with the unsigned map (v) a value above 0 never becomes 0: it takes the smallest
    non-zero code, 3.25e-7 × absmax. A v of 0 would turn its parameter's update into m / eps
    (measured: an element moved 6.4 in 20 steps where fp32 AdamW moved it < 0.14, on
    gradients spanning 4 decades within a block); rounding up only shrinks that update."""
    flat = x.detach().float().flatten()
    blocks = F.pad(flat, (0, (-flat.numel()) % BLOCK)).view(-1, BLOCK)  # (blocks, 256)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1 / _safe(absmax))[:, None]
    idx = torch.bucketize(scaled, _midpoints(signed, x.device))
    if not signed:  # code 0 is 0 in the unsigned map
        idx = torch.where(scaled > 0, idx.clamp(min=1), idx)
    idx = idx.to(torch.uint8)
    return idx.flatten()[: flat.numel()].view(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool
                         ) -> torch.Tensor:
    """The fp32 tensor (shaped like ``codes``) that ``quantize_blockwise`` stands for."""
    values = dynamic_map(signed).to(codes.device)[codes.flatten().long()]
    values = F.pad(values, (0, (-values.numel()) % BLOCK)).view(-1, BLOCK) * absmax[:, None]
    return values.flatten()[: codes.numel()].view(codes.shape)


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW whose moments are stored blockwise-quantized to 8 bits (see above)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int | None = None) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW8bit: invalid lr {lr}, betas {betas}, eps {eps} or "
                             f"weight_decay {weight_decay}")
        min_8bit_size = MIN_8BIT_SIZE if min_8bit_size is None else min_8bit_size
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      min_8bit_size=min_8bit_size))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One AdamW step on every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """AdamW as torch.optim.AdamW (single-tensor path) with m, v read from / written to
        their stored form."""
        if p.grad.is_sparse:
            raise RuntimeError("AdamW8bit does not support sparse gradients")
        state = self.state[p]
        quantized = p.numel() >= group["min_8bit_size"]
        if not state:
            state["step"] = torch.tensor(0.0)
            zeros = torch.zeros_like(p, memory_format=torch.preserve_format)
            if quantized:
                state["m_codes"], state["m_absmax"] = quantize_blockwise(zeros, signed=True)
                state["v_codes"], state["v_absmax"] = quantize_blockwise(zeros, signed=False)
            else:
                state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
        if quantized:
            m = dequantize_blockwise(state["m_codes"], state["m_absmax"], signed=True)
            v = dequantize_blockwise(state["v_codes"], state["v_absmax"], signed=False)
        else:
            m, v = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        lr, grad = group["lr"], p.grad.float()
        state["step"] += 1
        step = state["step"].item()
        p.mul_(1 - lr * group["weight_decay"])
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
        p.addcdiv_(m, denom, value=-step_size)
        if quantized:  # fresh absmaxes from the updated fp32 moments
            state["m_codes"], state["m_absmax"] = quantize_blockwise(m, signed=True)
            state["v_codes"], state["v_absmax"] = quantize_blockwise(v, signed=False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As Optimizer.load_state_dict, which casts every saved tensor to its parameter's
        float dtype: the uint8 codes (exact in fp32) and fp32 absmaxes are cast back."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in CODE_KEYS:
                if key in state:
                    state[key] = state[key].to(torch.uint8)
            for key in ABSMAX_KEYS:
                if key in state:
                    state[key] = state[key].float()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments, codes, absmaxes, steps)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values()
               for t in s.values() if isinstance(t, torch.Tensor))


OPTIMIZERS = {"adamw": torch.optim.AdamW, "adamw8bit": AdamW8bit}
