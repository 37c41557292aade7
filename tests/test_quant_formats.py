"""int8 and NF4 formats: the code table, packing, reconstruction errors within derived bounds."""

import itertools

import pytest
import torch

from lora.quant_formats import (
    ABSMAX_BLOCK,
    NF4_BLOCK,
    NF4_CODE,
    dequantize_int8,
    dequantize_nf4,
    nf4_absmax,
    pack_nibbles,
    quantize_int8,
    quantize_nf4,
    unpack_nibbles,
)

# QLoRA (arXiv:2305.14314), Appendix E, "NF4 data type": the 16 values as printed there.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def weights(out=96, inp=70, seed=0) -> torch.Tensor:
    """Gaussian weights with a few outliers, one all-zero row; numel not a multiple of 64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[3, 5], w[40, 0] = 0.9, -0.7
    w[7] = 0.0
    return w


def test_nf4_code_is_the_papers_table():
    assert NF4_CODE.tolist() == PAPER_NF4


def test_nf4_code_follows_the_papers_construction():
    # 8 positive and 7 negative normal quantiles at evenly spaced probabilities from
    # offset = 0.9677083 down to 0.5, plus an exact zero, scaled so the largest is 1.
    offset = 0.9677083
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    neg = -ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close(values / values.max(), NF4_CODE.double(), rtol=0, atol=1e-6)


def test_pack_puts_the_first_index_in_the_high_nibble_and_round_trips():
    assert pack_nibbles(torch.tensor([1, 2, 15, 0])).tolist() == [0x12, 0xF0]
    idx = torch.randint(0, 16, (2 * 1001,), generator=torch.Generator().manual_seed(0))
    packed = pack_nibbles(idx)
    assert packed.dtype == torch.uint8 and packed.numel() == idx.numel() // 2
    assert torch.equal(unpack_nibbles(packed), idx)


def test_int8_error_is_at_most_absmax_over_254_per_row():
    w = weights()
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    absmax = w.abs().amax(dim=1, keepdim=True)
    err = (dequantize_int8(q, scale, torch.float32) - w).abs()
    assert (err <= absmax / 254 + 1e-7).all()
    assert torch.equal(dequantize_int8(q, scale, torch.float32)[7], torch.zeros(70))
    assert err.max() > 0  # it does round


def _blocks(w: torch.Tensor) -> torch.Tensor:
    flat = torch.nn.functional.pad(w.flatten(), (0, (-w.numel()) % NF4_BLOCK))
    return flat.view(-1, NF4_BLOCK)


def test_nf4_picks_the_nearest_code_and_stays_within_half_the_largest_gap():
    w = weights()
    nf4 = quantize_nf4(w, double_quant=False)
    assert nf4.packed.numel() * 2 == _blocks(w).numel()
    deq = dequantize_nf4(nf4, torch.float32)
    assert deq.shape == w.shape
    blocks, absmax = _blocks(w), _blocks(w).abs().amax(dim=1, keepdim=True)
    # nearest code by brute force over all 16 values
    code = torch.tensor(PAPER_NF4)
    scaled = blocks / torch.where(absmax == 0, 1.0, absmax)
    nearest = code[(scaled[..., None] - code).abs().argmin(-1)] * absmax
    torch.testing.assert_close(_blocks(deq), nearest, rtol=0, atol=1e-7)
    # bound: per block, half the largest gap between adjacent codes × the block's absmax
    half_gap = max(b - a for a, b in itertools.pairwise(PAPER_NF4)) / 2
    assert abs(half_gap - 0.1519) < 1e-4  # between -1 and -0.696
    assert ((_blocks(deq) - blocks).abs() <= half_gap * absmax + 1e-7).all()


def test_nf4_double_quant_error_bound():
    # |w - c·m̂| ≤ |w - c·m| + |c|·|m - m̂| ≤ (g/2)·m + |m - m̂|, and the int8 step on the
    # centred absmaxes gives |m - m̂| ≤ s₂/2 with s₂ = max|m - mean| / 127 per 256 blocks.
    w = weights(out=512, inp=64)  # 512 blocks: two absmax groups
    plain, dq = quantize_nf4(w, double_quant=False), quantize_nf4(w, double_quant=True)
    assert dq.absmax.dtype == torch.int8 and dq.absmax_scale.numel() == 2
    m, m_hat = plain.absmax, nf4_absmax(dq)
    centred = (m - m.mean()).view(-1, ABSMAX_BLOCK)
    s2 = centred.abs().amax(dim=1) / 127
    assert ((m - m_hat).view(-1, ABSMAX_BLOCK).abs() <= s2[:, None] / 2 + 1e-7).all()
    half_gap = 0.15193
    bound = half_gap * m + (m - m_hat).abs()
    err = (_blocks(dequantize_nf4(dq, torch.float32)) - _blocks(w)).abs()
    assert (err <= bound[:, None] + 1e-6).all()


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_storage_is_under_0_3_of_fp16(double_quant):
    w = torch.randn(256, 512)
    stored = sum(t.numel() * t.element_size()
                 for t in quantize_nf4(w, double_quant).tensors().values())
    # 4 bits + fp32 absmax per 64 (0.5 bit) = 4.5 bits; with double quant 4 + 8/64 + 32/(64·256)
    expected_bits = 4 + (8 / 64 + 32 / (64 * 256) if double_quant else 32 / 64)
    assert stored == pytest.approx(w.numel() * expected_bits / 8, abs=4)
    assert stored / (w.numel() * 2) <= 0.30
