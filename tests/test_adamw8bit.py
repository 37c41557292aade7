"""8-bit AdamW: the codes, one step against AdamW written out on the dequantized moments, the
fp32 path against torch's AdamW, state bytes, and checkpoint round trips (also via train.py)."""

import io
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import train_args, write_tiny_run

import train
from training import adamw8bit
from training.adamw8bit import (
    AdamW8bit,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
    state_bytes,
)

LR, WD, B1, B2, EPS = 1e-2, 0.05, 0.9, 0.999, 1e-8


def test_dynamic_maps_hold_the_documented_values():
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    for code in (signed, unsigned):
        assert code.shape == (256,) and torch.equal(code, code.sort().values)
        assert len(code.unique()) == 256 and 0.0 in code and code.max() == 1.0
    # largest below 1: the mean of the last two of linspace(0.1, 1, 65) (signed) / 129 points
    assert signed[-2].item() == pytest.approx(1 - 0.9 / 64 / 2, rel=1e-6)
    assert unsigned[-2].item() == pytest.approx(1 - 0.9 / 128 / 2, rel=1e-6)
    # smallest non-zero: 1e-6 × the first mean of linspace(0.1, 1, 2) / linspace(0.1, 1, 3)
    assert signed[signed > 0].min().item() == pytest.approx(1e-6 * 0.55, rel=1e-6)
    assert unsigned[1].item() == pytest.approx(1e-6 * (0.1 + 0.55) / 2, rel=1e-6)
    assert torch.equal(-signed[signed < 0].flip(0), signed[(signed > 0) & (signed < 1)])


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_picks_the_nearest_code_per_block_of_256(signed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * 10 ** torch.empty(1000).uniform_(-5, 0, generator=g)
    x = x if signed else x.abs()
    codes, absmax = quantize_blockwise(x.view(40, 25), signed)
    assert codes.dtype == torch.uint8 and codes.shape == (40, 25) and absmax.shape == (4,)
    blocks = [x[i : i + 256] for i in range(0, 1000, 256)]  # the last block is short
    assert torch.equal(absmax, torch.stack([b.abs().max() for b in blocks]))
    scaled = torch.cat([b / b.abs().max() for b in blocks])
    code = dynamic_map(signed)
    nearest = (scaled[:, None] - code[None]).abs().argmin(dim=1)  # brute force
    if not signed:  # a positive v never becomes 0
        nearest = torch.where(scaled > 0, nearest.clamp(min=1), nearest)
    got = codes.flatten().long()
    differ = got != nearest  # only where two codes are equally near, to rounding
    gap = ((scaled - code[got]).abs() - (scaled - code[nearest]).abs()).abs()
    assert differ.sum() <= 2 and (gap[differ] < 1e-7).all()
    back = dequantize_blockwise(codes, absmax, signed)
    assert torch.equal(back.flatten(), code[got] * absmax.repeat_interleave(256)[:1000])


def test_small_tensors_step_exactly_as_torch_adamw():
    torch.manual_seed(0)
    p0 = torch.randn(40, 50)  # 2000 < 4096 elements: fp32 moments
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    ours = AdamW8bit([a], lr=LR, weight_decay=WD)
    ref = torch.optim.AdamW([b], lr=LR, weight_decay=WD, foreach=False)
    for _ in range(5):
        g = torch.randn(40, 50)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(a, b)
    assert torch.equal(ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"])


def test_one_step_is_adamw_on_the_dequantized_moments():
    g = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(64, 128, generator=g))  # 8192 elements: 32 blocks
    opt = AdamW8bit([p], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    for _ in range(3):
        p.grad = torch.randn(64, 128, generator=g)
        opt.step()
    state = opt.state[p]
    m = dequantize_blockwise(state["m_codes"], state["m_absmax"], signed=True)
    v = dequantize_blockwise(state["v_codes"], state["v_absmax"], signed=False)
    w, grad = p.detach().clone(), torch.randn(64, 128, generator=g)
    # AdamW (Loshchilov & Hutter), step t = 4, written out:
    t = 4
    m_new = B1 * m + (1 - B1) * grad
    v_new = B2 * v + (1 - B2) * grad * grad
    m_hat, v_hat = m_new / (1 - B1**t), v_new / (1 - B2**t)
    expected = w - LR * WD * w - LR * m_hat / (v_hat.sqrt() + EPS)
    p.grad = grad
    opt.step()
    assert state["step"].item() == t
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)
    # the stored moments are the new fp32 ones, quantized with fresh block absmaxes
    for key, new, signed in (("m", m_new, True), ("v", v_new, False)):
        codes, absmax = quantize_blockwise(new, signed)
        torch.testing.assert_close(state[f"{key}_absmax"], absmax, rtol=1e-6, atol=0)
        differ = state[f"{key}_codes"].int() - codes.int()
        assert differ.abs().max() <= 1 and (differ != 0).sum() <= 8  # ties within an ulp


def test_state_is_two_bytes_per_parameter_plus_block_scales():
    big = torch.nn.Parameter(torch.zeros(64, 128))  # 8192 elements, quantized
    small = torch.nn.Parameter(torch.zeros(16, 16))  # 256 elements, fp32 moments
    opt = AdamW8bit([big, small])
    big.grad, small.grad = torch.ones_like(big), torch.ones_like(small)
    opt.step()
    step_bytes = 4  # one fp32 step counter per parameter
    assert state_bytes(opt) == (8192 * 2 + 2 * (8192 // 256) * 4 + step_bytes) + (
        256 * 4 * 2 + step_bytes)
    fp32 = torch.optim.AdamW([big, small])
    fp32.step()
    assert state_bytes(fp32) == (8192 + 256) * 8 + 2 * step_bytes
    assert state_bytes(opt) - (256 * 8 + 2 * step_bytes) == pytest.approx(8192 * 2.03125)


def _steps(opt: torch.optim.Optimizer, p: torch.nn.Parameter, seed: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_state_dict_round_trips_through_a_weights_only_load():
    p = torch.nn.Parameter(torch.randn(80, 64))
    opt = AdamW8bit([p], lr=LR)
    _steps(opt, p, 0, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    q = torch.nn.Parameter(p.detach().clone())
    resumed = AdamW8bit([q], lr=LR)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in opt.state[p].items():
        assert resumed.state[q][key].dtype == value.dtype and torch.equal(
            resumed.state[q][key], value), key
    _steps(opt, p, 1, 2)
    _steps(resumed, q, 1, 2)
    assert torch.equal(p, q)


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="invalid lr"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(2))], lr=-1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("train8"))


def test_train_py_resume_with_adamw8bit_is_bit_identical(setup, tmp_path, monkeypatch):
    # The tiny test model's adapter tensors are all under 4096 elements: quantize every one.
    monkeypatch.setattr(adamw8bit, "MIN_8BIT_SIZE", 0)
    flags = ("--optimizer", "adamw8bit", "--save-every", "2")
    train.main(train_args(setup, tmp_path / "a", *flags))
    train.main(train_args(setup, tmp_path / "b", *flags, "--stop-after-steps", "3"))
    state = torch.load(tmp_path / "b/checkpoints/step-000003/train_state.pt", weights_only=True)
    moments = state["optimizer"]["state"]
    assert moments and all(s["m_codes"].dtype == torch.uint8 for s in moments.values())
    train.main(train_args(setup, tmp_path / "b", *flags, "--resume", "auto"))
    x, y = (load_file(tmp_path / f"{run}/adapter.safetensors") for run in "ab")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    config = json.loads((tmp_path / "a/run_config.json").read_text())
    assert config["optimizer"] == "adamw8bit"
    # and it trained: the adapters moved, and differ from an AdamW run's (the states do)
    train.main(train_args(setup, tmp_path / "c", "--save-every", "2"))
    z = load_file(tmp_path / "c/adapter.safetensors")
    b_keys = [k for k in x if "lora_B" in k]
    assert all(x[k].abs().max() > 0 for k in b_keys)
    assert any(not torch.equal(x[k], z[k]) for k in b_keys)
    assert math.isfinite(sum(float(v.abs().sum()) for v in x.values()))


def test_resuming_with_another_optimizer_is_refused(setup, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(setup, out, "--stop-after-steps", "1"))
    with pytest.raises(SystemExit, match="optimizer: 'adamw' then, 'adamw8bit' now") as stop:
        train.main(train_args(setup, out, "--resume", "auto", "--optimizer", "adamw8bit"))
    assert stop.value.code == 2
