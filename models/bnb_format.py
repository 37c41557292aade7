"""A merged model's Linears as bitsandbytes' serialized NF4, which transformers loads itself.

lora/quant_formats.py picks NF4 codes and fp32 block absmaxes bit-equal to bitsandbytes 0.50,
so a checkpoint in bitsandbytes' layout holds exactly the weights infer.py's ``--quantize nf4
--no-double-quant`` computes with, and ``from_pretrained`` loads it (with bitsandbytes and
accelerate installed) without lora-vlm. Per quantized Linear ``P`` the state dict holds (as
``Linear4bit`` saves itself): ``P.weight`` uint8 (ceil(numel / 2), 1) packed codes, first of
each pair in the high nibble; ``P.weight.absmax`` fp32 per block of 64; ``P.weight.quant_map``
the 16 code values; ``P.weight.quant_state.bitsandbytes__nf4`` the UTF-8 bytes of
``{"quant_type", "blocksize", "dtype", "shape"}`` as JSON. Not representable, so refused by
the caller: lora-vlm's double quantization (float8 absmaxes; bitsandbytes' nested 8-bit scheme
differs), and int8 (bitsandbytes' LLM.int8 also quantizes the activations, so it computes
something else than a weight-only int8 base).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from transformers import BitsAndBytesConfig, PreTrainedModel

from lora.quant_formats import NF4_BLOCK, NF4_CODE, quantize_nf4
from lora.quantized_linear import quantizable_linears


def fits_cpu_kernels(linear: torch.nn.Linear) -> bool:
    """bitsandbytes 0.50.2 on CPU dequantizes blocks of 64 within each row, which is the
    format's flat blocks only when a row holds whole blocks: with in_features % 64 != 0 its own
    quantize -> dequantize round trip errs by 3x the NF4 bound (measured on 32x32, 144x48,
    100x96). Its AVX512-BF16 kernel also asserts out_features % 32 == 0. Such Linears (none in
    real BLIP / BLIP-2 checkpoints, whose widths are multiples of 64) stay in full precision."""
    return linear.in_features % 64 == 0 and linear.out_features % 32 == 0


def nf4_paths(model: PreTrainedModel) -> tuple[list[str], list[str]]:
    """(Linears written as NF4, Linears left in full precision).

    NF4: what quantize_model would quantize (not a tied weight, not the LM head), less what
    transformers keeps in full precision whatever the config says (``_keep_in_fp32_modules``:
    BLIP-2's Q-Former), less what bitsandbytes 0.50.2's CPU kernels cannot take (see
    ``fits_cpu_kernels``). The second list becomes ``llm_int8_skip_modules``; the check at the
    end asks transformers' own rule whether it will build a Linear4bit for exactly the first.
    """
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    quantizable = set(quantizable_linears(model))
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    nf4 = [n for n in linears if n in quantizable and should_convert_module(n, keep)
           and fits_cpu_kernels(model.get_submodule(n))]
    kept = [n for n in linears if n not in set(nf4)]
    loads_as_nf4 = [n for n in linears if should_convert_module(n, kept + keep)]
    if loads_as_nf4 != nf4:  # a kept path that is a pattern for another one, say
        raise ValueError(f"cannot describe these NF4 Linears to transformers: it would load "
                         f"{sorted(set(nf4) ^ set(loads_as_nf4))[:3]} otherwise")
    return nf4, kept


def nf4_tensors(weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state-dict entries of one weight, by key suffix after ``<path>.weight``."""
    q = quantize_nf4(weight, double_quant=False)
    numel = weight.numel()
    # ours is padded to whole blocks of 64; bitsandbytes stores ceil(numel / 2) bytes
    packed = q.packed[: (numel + 1) // 2].reshape(-1, 1).clone()
    state = {"quant_type": "nf4", "blocksize": NF4_BLOCK,
             "dtype": str(dtype).removeprefix("torch."), "shape": list(weight.shape)}
    blob = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return {"": packed, ".absmax": q.absmax.float().clone(), ".quant_map": NF4_CODE.clone(),
            ".quant_state.bitsandbytes__nf4": blob}


def nf4_state_dict(model: PreTrainedModel,
                   dtype: torch.dtype) -> tuple[dict[str, Any], list[str], list[str]]:
    """(the state dict to save, the NF4 Linears, the Linears kept in full precision): ``model``
    (fp32, merged) is cast to ``dtype`` and its NF4 Linears' weights replaced by bitsandbytes'
    layout, their codes picked from the fp32 weights as infer.py's --merge --quantize does."""
    nf4, kept = nf4_paths(model)
    linears = {p: model.get_submodule(p).weight for p in nf4}
    packed = {p: nf4_tensors(w, dtype) for p, w in linears.items()}
    model.to(dtype)
    state = model.state_dict()
    for path, tensors in packed.items():
        del state[f"{path}.weight"]
        state.update({f"{path}.weight{suffix}": t for suffix, t in tensors.items()})
    return state, nf4, kept


def bnb_config(kept: list[str], dtype: torch.dtype) -> BitsAndBytesConfig:
    """The quantization_config transformers needs to load the layout above."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=kept)
