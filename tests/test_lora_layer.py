"""LoRALinear against the formula written out: delta = (alpha/r) · x Aᵀ Bᵀ."""

import math

import pytest
import torch
import torch.nn.functional as F

from lora import LoRALinear


def _layer(r=4, alpha=8.0, rslora=False, dropout=0.0):
    torch.manual_seed(0)
    layer = LoRALinear(12, 10, r=r, alpha=alpha, rslora=rslora, dropout=dropout)
    with torch.no_grad():
        layer.B.normal_()
    return layer


@pytest.mark.parametrize("rslora", [False, True])
def test_delta_matches_formula(rslora):
    layer = _layer(rslora=rslora)
    x = torch.randn(3, 5, 12)
    scale = 8.0 / (math.sqrt(4) if rslora else 4)
    expected = scale * (x @ layer.A.T @ layer.B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), scale * layer.B @ layer.A)


def test_init_kaiming_a_zero_b():
    layer = LoRALinear(50, 7, r=8, alpha=16)
    assert torch.count_nonzero(layer.B) == 0
    # kaiming_uniform with a=sqrt(5): bound = sqrt(6 / ((1 + 5) · fan_in)) = 1/sqrt(fan_in)
    assert layer.A.abs().max() <= 1 / math.sqrt(50)
    assert layer.A.std() > 0.5 / math.sqrt(50) / math.sqrt(3)
    assert layer.A.dtype == layer.B.dtype == torch.float32
    assert torch.count_nonzero(layer(torch.randn(4, 50))) == 0


def test_gradcheck_float64():
    layer = _layer().double()
    x = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    a = layer.A.detach().clone().requires_grad_()
    b = layer.B.detach().clone().requires_grad_()
    fn = lambda x, a, b: torch.func.functional_call(layer, {"A": a, "B": b}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b))


def test_dropout_applies_to_input_only_in_training():
    layer = _layer(dropout=0.5)
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x, training=False), 2.0 * x @ layer.A.T @ layer.B.T)
    torch.manual_seed(3)
    got = layer(x, training=True)
    torch.manual_seed(3)
    expected = 2.0 * F.dropout(x, 0.5) @ layer.A.T @ layer.B.T
    torch.testing.assert_close(got, expected)


U_BF16 = torch.finfo(torch.bfloat16).eps / 2  # unit roundoff: rounding moves v by ≤ u·|v|


def _magnitude(layer, x):
    """M = scale·|x| |A|ᵀ |B|ᵀ: bounds every intermediate of the delta, elementwise."""
    return layer.scale * x.abs() @ layer.A.abs().T @ layer.B.abs().T


def test_computes_in_input_dtype_params_stay_fp32():
    layer = _layer()
    x = torch.randn(3, 12)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16 and layer.A.dtype == torch.float32
    # five bf16 roundings (x, A, h = x Aᵀ, B, the output), each ≤ u·M
    bound = 5 * U_BF16 * _magnitude(layer, x)
    assert ((out.float() - layer(x)).abs() <= bound).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("kw", [{"r": 0}, {"r": 2.5}, {"dropout": 1.0}, {"dropout": -0.1},
                                {"alpha": float("nan")}, {"alpha": float("inf")}])
def test_bad_hyperparameters_raise(kw):
    with pytest.raises(ValueError):
        LoRALinear(4, 4, **{"r": 2, "alpha": 4, **kw})


def test_fused_base_plus_delta_matches_formula():
    layer = _layer()
    x, base = torch.randn(2, 3, 12), torch.randn(2, 3, 10)
    expected = base + 2.0 * (x @ layer.A.T @ layer.B.T)
    torch.testing.assert_close(layer(x, base=base), expected, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = layer(x, base=base.bfloat16())
    assert fused.dtype == torch.bfloat16
    # six bf16 roundings (base, x, A, h, B, the output), each ≤ u·(M + |base|)
    bound = 6 * U_BF16 * (_magnitude(layer, x) + base.abs())
    assert ((fused.float() - expected).abs() <= bound).all()
