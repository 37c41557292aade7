"""DoRA against its formula written out with plain tensors:
y = m ⊙ (W + sBA) x / ‖W + sBA‖_row + b, the norm a constant in the gradient (paper §4.3)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_blip
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_runs import train_args, write_tiny_run
from torch import nn

import eval as evaluate
import infer
import train
from lora import (
    AdapterConflictError,
    AdapterFileError,
    LoRAConfig,
    LoRAInjection,
    inject_lora,
    load_adapter,
    load_peft,
    quantize_model,
    read_metadata,
    save_adapter,
    save_peft,
)

GOLDEN = Path(__file__).parent / "fixtures" / "peft_golden"
MAG = "lora_magnitude_vector"


class Net(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(12, 10, bias=bias)


def dora_net(bias=True, r=4, alpha=8.0, rslora=False, dropout=0.0, seed=1):
    """A Linear with a DoRA adapter whose A, B and m all hold random values."""
    net = Net(bias)
    injection = inject_lora(net, LoRAConfig(r=r, alpha=alpha, rslora=rslora, dropout=dropout,
                                            dora=True, targets=("proj",)))
    layer = injection.adapters["default"].layers["proj"]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.5)
        layer.magnitude.mul_(1 + 0.3 * torch.randn(10, generator=g))
    return net, injection, layer


def formula(x, w, b, a_mat, b_mat, m, s, detach=True):
    """DoRA's output written out: m ⊙ V x / ‖V‖_row + b with V = W + s·B A."""
    v = w + s * b_mat @ a_mat
    norm = torch.sqrt((v * v).sum(dim=1))
    if detach:
        norm = norm.detach()
    y = x @ (m[:, None] * v / norm[:, None]).T
    return y if b is None else y + b


@pytest.mark.parametrize("bias, rslora", [(True, False), (False, False), (True, True)])
def test_forward_matches_formula(bias, rslora):
    net, _, layer = dora_net(bias=bias, rslora=rslora)
    x = torch.randn(3, 5, 12)
    s = 8.0 / (math.sqrt(4) if rslora else 4)
    expected = formula(x, net.proj.weight, net.proj.bias, layer.A, layer.B, layer.magnitude, s)
    torch.testing.assert_close(net.proj(x), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = F.linear(x, net.proj.weight + s * layer.B @ layer.A, net.proj.bias)
    assert (net.proj(x) - plain).abs().max() > 0.1  # the magnitude really acts


def test_fresh_adapter_changes_nothing_and_m_is_the_row_norm():
    net = Net()
    x = torch.randn(4, 12)
    with torch.no_grad():
        before = net.proj(x)
    injection = inject_lora(net, LoRAConfig(r=4, alpha=8, dora=True, targets=("proj",)))
    layer = injection.adapters["default"].layers["proj"]
    w = net.proj.weight
    torch.testing.assert_close(layer.magnitude, torch.sqrt((w * w).sum(dim=1)))
    assert layer.magnitude.requires_grad and layer.magnitude.dtype == torch.float32
    torch.testing.assert_close(net.proj(x), before, rtol=1e-6, atol=1e-6)


def test_gradients_equal_autograd_of_formula_with_detached_norm():
    net, _injection, layer = dora_net()
    x = torch.randn(6, 12, requires_grad=True)
    weights = torch.randn(6, 10)
    (net.proj(x) * weights).sum().backward()
    ours = [x.grad, layer.A.grad, layer.B.grad, layer.magnitude.grad]
    assert net.proj.weight.grad is None  # the base stays frozen

    def reference(detach):
        leaves = [t.detach().clone().requires_grad_() for t in (x, layer.A, layer.B,
                                                              layer.magnitude)]
        y = formula(leaves[0], net.proj.weight.detach(), net.proj.bias.detach(), leaves[1],
                    leaves[2], leaves[3], 2.0, detach=detach)
        (y * weights).sum().backward()
        return [t.grad for t in leaves]

    for got, want in zip(ours, reference(detach=True), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Not detaching the norm gives other A/B gradients: the test tells the two apart.
    undetached = reference(detach=False)
    assert (ours[1] - undetached[1]).abs().max() > 1e-3


def test_dropout_acts_on_the_low_rank_branch_only():
    net, _, layer = dora_net(dropout=0.5)
    net.train()
    x = torch.randn(4, 12)
    torch.manual_seed(3)
    got = net.proj(x)
    torch.manual_seed(3)
    xd = F.dropout(x, 0.5)
    w, b, s = net.proj.weight, net.proj.bias, 2.0
    v = w + s * layer.B @ layer.A
    g = layer.magnitude / torch.sqrt((v * v).sum(dim=1))
    expected = g * (x @ w.T + s * xd @ layer.A.T @ layer.B.T) + b
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    net.eval()
    torch.testing.assert_close(net.proj(x), formula(x, w, b, layer.A, layer.B,
                                                    layer.magnitude, s), rtol=1e-5, atol=1e-5)


def test_merge_matches_formula_unmerge_restores_and_merge_is_idempotent():
    net, injection, layer = dora_net()
    x = torch.randn(4, 12)
    w0 = net.proj.weight.detach().clone()
    with torch.no_grad():
        hooked = net.proj(x)
    injection.merge()
    v = w0 + 2.0 * layer.B @ layer.A
    expected_w = layer.magnitude[:, None] * v / torch.sqrt((v * v).sum(dim=1))[:, None]
    torch.testing.assert_close(net.proj.weight, expected_w)
    injection.merge()  # merging twice = merging once
    torch.testing.assert_close(net.proj.weight, expected_w)
    with torch.no_grad():
        torch.testing.assert_close(net.proj(x), hooked, rtol=1e-5, atol=1e-5)
    injection.unmerge()
    torch.testing.assert_close(net.proj.weight, w0, rtol=1e-5, atol=1e-6)
    assert (net.proj.weight - expected_w).abs().max() > 0.1


def test_exact_unmerge_is_bit_exact_and_zero_magnitude_keeps_a_copy():
    net, injection, layer = dora_net()
    w0 = net.proj.weight.detach().clone()
    injection.merge(exact_unmerge=True)
    injection.unmerge()
    assert torch.equal(net.proj.weight, w0)
    with torch.no_grad():
        layer.magnitude[3] = 0.0  # unmerge cannot divide by it: merge keeps W instead
    injection.merge()
    assert torch.count_nonzero(net.proj.weight[3]) == 0
    injection.unmerge()
    assert torch.equal(net.proj.weight, w0)


def test_half_precision_base():
    net, injection, layer = dora_net()
    net.to(torch.bfloat16)
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    got = net.proj(x)
    assert got.dtype == torch.bfloat16
    w, b = net.proj.weight.float(), net.proj.bias.float()
    expected = formula(x.float(), w, b, layer.A, layer.B, layer.magnitude, 2.0)
    torch.testing.assert_close(got.float(), expected, rtol=0.02, atol=0.05)
    with torch.no_grad():
        injection.merge()
        torch.testing.assert_close(net.proj(x).float(), expected, rtol=0.02, atol=0.05)


def test_quantized_base_uses_the_dequantized_weight():
    net = Net()
    quantize_model(net, "int8")
    w = net.proj.dequantize(torch.float32)
    injection = inject_lora(net, LoRAConfig(r=4, alpha=8, dora=True, targets=("proj",)))
    layer = injection.adapters["default"].layers["proj"]
    torch.testing.assert_close(layer.magnitude, torch.sqrt((w * w).sum(dim=1)))
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(4, 12)
    expected = formula(x, w, net.proj.bias, layer.A, layer.B, layer.magnitude, 2.0)
    torch.testing.assert_close(net.proj(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="quantized base"):
        injection.merge()


def test_dora_with_another_adapter_on_one_linear_is_refused_when_used():
    net, injection, _ = dora_net()
    injection.add_adapter("plain", LoRAConfig(r=2, targets=("proj",)))  # both active: allowed
    x = torch.randn(2, 12)
    w0 = net.proj.weight.detach().clone()
    why = "DoRA adapter 'default' and adapter 'plain' are both active on proj"
    with pytest.raises(AdapterConflictError, match=why):
        net.proj(x)
    with pytest.raises(AdapterConflictError, match=why):
        injection.merge()
    assert injection.merged == [] and torch.equal(net.proj.weight, w0)
    injection.set_active(["plain"])  # one at a time is fine, as eval.py does
    net.proj(x)
    injection.set_active(["default"])
    layer = injection.adapters["default"].layers["proj"]
    torch.testing.assert_close(net.proj(x), formula(x, w0, net.proj.bias, layer.A, layer.B,
                                                    layer.magnitude, 2.0))
    injection.merge()
    injection.set_active(["default", "plain"])  # DoRA merged, plain hooked: refused too
    with pytest.raises(AdapterConflictError):
        net.proj(x)


def _blip_with_dora(seed=0):
    model = tiny_blip()
    injection = inject_lora(model, LoRAConfig(r=4, alpha=8, dora=True, targets=("text", "vision"),
                                              rank_pattern={"qkv": 2}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in injection.adapters["default"].items():
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.2)
            layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))
    return model.eval(), injection


def test_save_load_round_trip_and_saved_keys(batch, tmp_path):
    model, injection = _blip_with_dora()
    with torch.no_grad():
        expected = model(**batch).logits
    path = save_adapter(injection, tmp_path / "a.safetensors")
    paths = injection.adapters["default"].paths
    keys = {f"{p}.lora_{ab}.weight" for p in paths for ab in "AB"} | {f"{p}.{MAG}" for p in paths}
    assert set(load_file(path)) == keys
    assert json.loads(read_metadata(path)["config"])["dora"] is True
    fresh = tiny_blip().eval()
    loaded = load_adapter(fresh, path, name="default")
    assert all(type(m).__name__ == "DoRALinear" for _, m in loaded.adapters["default"].items())
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, expected)


def test_old_files_without_the_dora_field_load_as_plain_lora(batch, tmp_path):
    model = tiny_blip().eval()
    injection = inject_lora(model, LoRAConfig(r=4, targets=("text",)))
    path = save_adapter(injection, tmp_path / "old.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    config = json.loads(meta["config"])
    assert "dora" not in config  # left out at its default, as files before DoRA were written
    save_file(tensors, path, metadata={**meta, "config": json.dumps(config)})
    loaded = load_adapter(tiny_blip(), path)
    assert loaded.adapters["old"].config.dora is False


def test_dora_file_without_magnitudes_is_refused(tmp_path):
    _model, injection = _blip_with_dora()
    path = save_adapter(injection, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if MAG not in k}  # noqa: SIM118
    save_file(tensors, path, metadata=meta)
    with pytest.raises(AdapterFileError, match=f"missing key .*{MAG}"):
        load_adapter(tiny_blip(), path)


def test_golden_peft_dora_import_forward_and_merge():
    expected = load_file(GOLDEN / "expected.safetensors")
    dora = load_file(GOLDEN / "dora_expected.safetensors")
    inputs = {"pixel_values": expected["pixel_values"], "input_ids": expected["input_ids"]}
    from transformers import BlipForConditionalGeneration
    model = BlipForConditionalGeneration.from_pretrained(GOLDEN / "base").eval()
    injection = load_peft(model, GOLDEN / "dora")
    assert injection.adapters["default"].config.dora
    with torch.no_grad():
        got = model(**inputs).logits
    assert (dora["dora_logits"] - expected["base_logits"]).abs().max() > 1
    torch.testing.assert_close(got, dora["dora_logits"], rtol=0, atol=1e-5)
    injection.merge()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, dora["dora_merged_logits"], rtol=0,
                                   atol=1e-5)


def test_peft_export_round_trip(batch, tmp_path):
    model, injection = _blip_with_dora()
    with torch.no_grad():
        expected = model(**batch).logits
    out = save_peft(injection, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    keys = set(load_file(out / "adapter_model.safetensors"))
    paths = injection.adapters["default"].paths
    assert {k for k in keys if k.endswith(MAG)} == {f"base_model.model.{p}.{MAG}" for p in paths}
    fresh = tiny_blip().eval()
    load_peft(fresh, out)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, expected)
    config["use_dora"] = False  # magnitudes then are keys that nothing reads: refused
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=f"unexpected key .*{MAG}"):
        load_peft(tiny_blip(), out)


def test_peft_use_dora_without_magnitudes_is_refused(tmp_path):
    model = tiny_blip()
    out = save_peft(inject_lora(model, LoRAConfig(r=4, targets=("text",))), tmp_path / "p")
    config = json.loads((out / "adapter_config.json").read_text())
    config["use_dora"] = True
    (out / "adapter_config.json").write_text(json.dumps(config))
    fresh = tiny_blip()
    with pytest.raises(AdapterFileError, match=f"missing key .*{MAG}"):
        load_peft(fresh, out)
    assert not isinstance(fresh, LoRAInjection) and all(
        p.requires_grad for p in fresh.parameters())  # the model was left alone


def test_train_dora_flag_end_to_end(tmp_path, capsys):
    setup = write_tiny_run(tmp_path)
    adapter = train.main(train_args(setup, tmp_path / "run", "--epochs", "1", "--dora"))
    assert json.loads(read_metadata(adapter)["config"])["dora"] is True
    assert any(k.endswith(MAG) for k in load_file(adapter))
    images = sorted(str(p) for p in setup[1].parent.glob("*.png"))[:2]
    hooked = infer.main([*images, "--adapter", str(adapter)])
    merged = infer.main([*images, "--adapter", str(adapter), "--merge"])
    assert [r["caption"] for r in hooked] == [r["caption"] for r in merged]
    plain = train.main(train_args(setup, tmp_path / "plain", "--epochs", "1"))
    scores = evaluate.main(["--adapter", str(adapter), "--adapter", str(plain), "--eval-file",
                            str(setup[1]), "--out-dir", str(tmp_path / "eval"), "--no-report"])
    assert set(scores) == {"base", "run", "plain"}  # one adapter at a time: no conflict
    with pytest.raises(SystemExit):  # both at once on the same Linears: one line, no traceback
        infer.main([*images, "--adapter", str(adapter), "--adapter", str(plain)])
    assert "are both active on" in capsys.readouterr().err


def test_dora_run_resumes_bit_identically(tmp_path):
    setup = write_tiny_run(tmp_path)
    full = load_file(train.main(train_args(setup, tmp_path / "a", "--dora", "--epochs", "2")))
    train.main(train_args(setup, tmp_path / "b", "--dora", "--epochs", "2",
                          "--stop-after-steps", "3"))
    resumed = load_file(train.main(train_args(setup, tmp_path / "b", "--dora", "--epochs", "2",
                                              "--resume", "auto")))
    assert full.keys() == resumed.keys() and any(k.endswith(MAG) for k in full)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
