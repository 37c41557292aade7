"""Merging into fp32/fp16/bf16 base weights: one rounding to W's dtype, bounds derived from it.

u = eps/2 is the dtype's unit roundoff: rounding a real v to the dtype changes it by at most
u·|v| (normal range; the tiny absolute slack covers subnormals).
"""

import pytest
import torch
from conftest import randomize_adapters, tiny_blip

from lora import LoRAConfig, inject_lora

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PATH = "text_decoder.bert.encoder.layer.1.intermediate.dense"


def _setup(dtype):
    model = tiny_blip().to(dtype)
    inj = inject_lora(model, LoRAConfig(r=4, alpha=8, targets=("vision", "text")))
    randomize_adapters(inj, std=0.1)
    weights = {p: model.get_submodule(p).weight.detach().clone()
               for p in inj.adapters["default"].paths}
    return model, inj, weights


def _u(dtype):
    return torch.finfo(dtype).eps / 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_merged_weight_is_w_plus_scaled_ba_rounded_once(dtype):
    model, inj, w0 = _setup(dtype)
    inj.merge()
    for path, layer in inj.adapters["default"].items():
        merged = model.get_submodule(path).weight
        assert merged.dtype == dtype
        # W' = round_dtype(W + (alpha/r)·B·A), the sum formed in fp32
        expected = (w0[path].float() + (8 / 4) * (layer.B @ layer.A)).to(dtype)
        assert torch.equal(merged, expected), path
        # ...rounded once at the dtype's precision: within u·|exact| of the fp64 sum, plus the
        # fp32 intermediate's error (r products and two roundings, ≤ (r+2)·u32 of magnitudes)
        w, b, a = w0[path].double(), layer.B.double(), layer.A.double()
        exact = w + 2.0 * b @ a
        fp32 = (layer.r + 2) * _u(torch.float32) * (w.abs() + 2.0 * b.abs() @ a.abs())
        bound = _u(dtype) * exact.abs() + fp32 + 1e-30
        assert ((merged.double() - exact).abs() <= bound).all(), path


@pytest.mark.parametrize("dtype", DTYPES)
def test_merged_and_hooked_outputs_agree_to_the_dtype_rounding(dtype):
    model, inj, w0 = _setup(dtype)
    linear = model.get_submodule(PATH)
    layer = dict(inj.adapters["default"].items())[PATH]
    x = torch.randn(4, linear.in_features, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        hooked = linear(x).double()
        inj.merge()
        merged = linear(x).double()
    # Each side rounds to the dtype a few times: W' (u·(|W|+|ΔW|) per weight), the base output,
    # the (.., r) intermediate, the fused add and the merged output (≤ u·M each), where
    # M = |x|·(|W| + s|B||A|)ᵀ + |b| bounds every one of those magnitudes: 5u·M in all. The
    # matmuls accumulate in fp32 (or wider): ≤ (n+r)·u32·M more for each of the four.
    xd = x.double().abs()
    m = xd @ (w0[PATH].double().abs() + 2.0 * layer.B.double().abs() @ layer.A.double().abs()).T
    m = m + linear.bias.double().abs()
    bound = (5 * _u(dtype) + 4 * (linear.in_features + layer.r) * _u(torch.float32)) * m
    assert ((merged - hooked).abs() <= bound).all()
    assert (merged - hooked).abs().max() > 0 or dtype == torch.float32  # rounding is visible


@pytest.mark.parametrize("dtype", DTYPES)
def test_unmerge_without_backup_returns_w_within_two_roundings(dtype):
    model, inj, w0 = _setup(dtype)
    deltas = {p: layer.delta_weight() for p, layer in inj.adapters["default"].items()}
    inj.merge()
    assert inj._backups == {}
    inj.unmerge()
    for path, w in w0.items():
        # merge: |W' - (W+Δ)| ≤ u(|W|+|Δ|); unmerge: |W'' - (W'-Δ)| ≤ u|W'-Δ| ≤ u|W|(1+u) + u²|Δ|
        bound = 2.01 * _u(dtype) * (w.float().abs() + deltas[path].abs()) + 1e-30
        diff = (model.get_submodule(path).weight.float() - w.float()).abs()
        assert (diff <= bound).all(), (path, (diff / bound).max())
