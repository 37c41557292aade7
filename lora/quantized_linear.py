"""QuantizedLinear: a frozen nn.Linear stored as int8 or NF4 and dequantized on the fly (QLoRA).

``quantize_model`` swaps the base model's Linears for QuantizedLinear before any adapter is
attached; LoRA hooks then work on top unchanged (the hook sees the same input and output).
The weight is rebuilt per forward and again in backward instead of being saved for it, so a
training step keeps no full-precision copy of any quantized weight alive. Base weights are
frozen: only the input (and, if asked, the bias) gets a gradient.

On CPU that rebuilt weight is written into a buffer reused per (size, dtype, thread) rather
than allocated anew. Why: after the first multi-MB tensor is freed, glibc raises its mmap
threshold and serves such tensors from its heap, where the freed chunks of two dequantizations
per Linear per step fragment it. Measured on a ``BlipConfig()`` captioning model (batch 2, one
thread, glibc defaults): NF4 training peak RSS 2781 → 2594 MiB, int8 2686 MiB, against
3136–3278 MiB unquantized (see bench/bench_memory.py).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from .quant_formats import (
    Allocator,
    NF4Weight,
    dequantize_int8,
    dequantize_nf4,
    quantize_int8,
    quantize_nf4,
)

QUANT_MODES = ("none", "int8", "nf4")


class _ReusedBuffers(threading.local):
    """An Allocator that hands out the same tensor for the same (numel, dtype, device), per
    thread. Safe for a weight used once and dropped before the next dequantization (forward and
    backward of _FrozenQuantizedMatmul); never for a tensor that escapes to a caller."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def __call__(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (numel, dtype, device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return self.buffers[key]


_CPU_BUFFERS = _ReusedBuffers()


def _matmul_weight(layer: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
    """The weight for one matmul: in a reused buffer on CPU (CUDA's caching allocator already
    reuses its blocks)."""
    if layer.device.type == "cpu":
        return layer.dequantize(dtype, _CPU_BUFFERS)
    return layer.dequantize(dtype)


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """y = x Wᵀ + b with W rebuilt from its quantized form in forward and in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None,
                layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, _matmul_weight(layer, x.dtype),
                        None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _matmul_weight(ctx.layer, grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class QuantizedLinear(nn.Module):
    """A frozen Linear of shape (out, in) whose weight is int8 (per row) or NF4 (per block).

    ``weight`` is None on purpose: code that checks ``isinstance(m.weight, Tensor)`` before
    casting to the weight's dtype (T5's feed-forward) then leaves activations alone. The bias
    stays a full-precision, frozen Parameter under its usual state_dict key.
    """

    def __init__(self, linear: nn.Linear, mode: str, double_quant: bool = True) -> None:
        super().__init__()
        if mode not in ("int8", "nf4"):
            raise ValueError(f"quantization mode must be int8 or nf4, got {mode!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode, self.double_quant = mode, double_quant and mode == "nf4"
        self.weight = None
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)
        if mode == "int8":
            q, scale = quantize_int8(linear.weight)
            self.register_buffer("weight_int8", q)
            self.register_buffer("weight_scale", scale)
        else:
            for name, t in quantize_nf4(linear.weight, self.double_quant).tensors().items():
                self.register_buffer(f"weight_{name}", t)

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def _nf4(self) -> NF4Weight:
        return NF4Weight(self.weight_packed, self.weight_absmax,
                         self.weight_absmax_scale if self.double_quant else None,
                         (self.out_features, self.in_features))

    def dequantize(self, dtype: torch.dtype = torch.float32,
                   alloc: Allocator | None = None) -> torch.Tensor:
        """The (out, in) weight this layer computes with, in ``dtype`` (a new tensor unless an
        ``alloc`` that reuses buffers is given)."""
        kw = {} if alloc is None else {"alloc": alloc}
        if self.mode == "int8":
            return dequantize_int8(self.weight_int8, self.weight_scale, dtype, **kw)
        return dequantize_nf4(self._nf4(), dtype, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):  # compute where nn.Linear would
            dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return _FrozenQuantizedMatmul.apply(x.to(dtype), self.bias, self)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return f"in={self.in_features}, out={self.out_features}, {self.mode}{dq}"


def tied_linears(model: nn.Module) -> set[str]:
    """Linears whose weight is shared with another module (e.g. an LM head tied to embeddings)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return {name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and len(set(owners[id(m.weight)])) > 1}


def quantizable_linears(model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Paths of the Linears quantize_model replaces, in module order.

    Left out: Linears tied to another weight (quantizing one side would untie them), the output
    embedding (LM head, kept in full precision as in QLoRA), and paths ending in a ``skip`` entry.
    """
    tied = tied_linears(model)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head else None
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and name not in tied
            and not any(name == s or name.endswith("." + s) for s in skip)]


def quantize_model(model: nn.Module, mode: str, double_quant: bool = True,
                   skip: tuple[str, ...] = (), device: str | torch.device | None = None
                   ) -> list[str]:
    """Replace the quantizable Linears by QuantizedLinear in place; returns their paths.

    Each full-precision weight is dropped as soon as its layer is quantized. With ``device``,
    each Linear moves there alone and is quantized there, so a model still on the CPU reaches
    a GPU one layer at a time rather than as a whole full-precision base (the rest of the
    model is left where it is). Call it before attaching adapters: LoRAInjection records the
    Linears it hooks.
    """
    if mode == "none":
        return []
    paths = quantizable_linears(model, skip)
    for name in paths:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        linear = getattr(owner, child)
        if device is not None:
            linear.to(device)
        setattr(owner, child, QuantizedLinear(linear, mode, double_quant))
    return paths


def weight_bytes(module: nn.Module) -> int:
    """Bytes a Linear's weight occupies as stored: the matrix, or its quantized form + scales."""
    if isinstance(module, QuantizedLinear):
        return sum(b.numel() * b.element_size() for b in module.buffers())
    return module.weight.numel() * module.weight.element_size()


def frozen_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model``, shared tensors counted once."""
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in unique.values())
