"""PiSSA / OLoRA initialisation: formulas, base outputs at init, conversion to plain LoRA for
the original base (against a trained model and against PEFT's golden PiSSA files), resume."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_blip
from safetensors.torch import load_file, save_file
from tiny_runs import train_args, write_tiny_run
from transformers import BlipForConditionalGeneration

import train
from lora import (
    AdapterFileError,
    LoRAConfig,
    inject_lora,
    load_adapter,
    load_peft,
    quantize_model,
    read_metadata,
    save_adapter,
    save_peft,
)
from lora.init_methods import olora_factors, pissa_factors, to_plain, to_training_form

GOLDEN = Path(__file__).parent / "fixtures" / "peft_golden"
ATOL = 1e-5


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"]).logits


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def train_one_step(injection, batch, lr: float = 0.05) -> None:
    """One SGD step on every adapter parameter: the adapters move away from their init."""
    injection.model.train()
    loss = injection.model(**batch).loss
    loss.backward()
    with torch.no_grad():
        for p in injection.adapter_parameters():
            p -= lr * p.grad / (p.grad.norm() + 1e-12)
            p.grad = None
    injection.model.eval()


def test_pissa_factors_are_the_top_r_singular_part():
    w = torch.randn(12, 9, generator=torch.Generator().manual_seed(0))
    r, scale = 3, 0.5
    a, b = pissa_factors(w, r, scale)
    u, s, vh = torch.linalg.svd(w)
    top = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]  # written out: U_r S_r V_rᵀ
    torch.testing.assert_close(scale * b @ a, top, rtol=0, atol=1e-5)
    # A's rows and B's columns share the singular values: A Aᵀ = BᵀB = S_r / scale
    torch.testing.assert_close(a @ a.T, torch.diag(s[:r] / scale), rtol=0, atol=1e-5)
    torch.testing.assert_close(b.T @ b, torch.diag(s[:r] / scale), rtol=0, atol=1e-5)


def test_olora_factors_are_q_and_r_truncated():
    w = torch.randn(12, 9, generator=torch.Generator().manual_seed(0))
    a, b = olora_factors(w, 4, scale=7.0)  # OLoRA's factors do not depend on the scale
    torch.testing.assert_close(b.T @ b, torch.eye(4), rtol=0, atol=1e-5)  # orthonormal columns
    assert torch.equal(a, torch.triu(a))  # R's first rows: upper triangular
    # the first r columns of W are exactly Q_r R_r's (R is upper triangular)
    torch.testing.assert_close((b @ a)[:, :4], w[:, :4], rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_keeps_base_outputs_and_remove_restores_weights(batch, init):
    model = tiny_blip()
    before, expected = weights(model), logits(model, batch)
    inj = inject_lora(model, LoRAConfig(r=4, alpha=8, init=init))
    layer = next(iter(inj.adapters["default"].layers.values()))
    assert layer.B.abs().max() > 0.1  # not the default zero-B start
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=ATOL)
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert len(changed) == len(inj.adapters["default"].paths)  # each targeted W is a residual
    inj.remove()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact originals


@pytest.mark.parametrize("init, rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_trained_model_equals_original_base_plus_converted_adapter(tmp_path, batch, init, rslora):
    model = tiny_blip()
    inj = inject_lora(model, LoRAConfig(r=4, alpha=8, rslora=rslora, init=init, dropout=0.1))
    train_one_step(inj, batch)
    trained = logits(model, batch)
    assert (trained - logits(tiny_blip(), batch)).abs().max() > 0.01  # the step changed outputs
    path = save_adapter(inj, tmp_path / "a.safetensors")

    fresh = tiny_blip()  # the ORIGINAL base, never touched by PiSSA/OLoRA
    loaded = load_adapter(fresh, path, name="default")
    torch.testing.assert_close(logits(fresh, batch), trained, rtol=0, atol=ATOL)
    meta = read_metadata(path)
    assert json.loads(meta["converted_from"])["init"] == init
    config = json.loads(meta["config"])
    k = math.sqrt(2) if rslora else 2
    assert (config["r"], config["alpha"], "init" in config) == (8, 8 * k, False)  # plain now
    layer = next(iter(loaded.adapters["default"].layers.values()))
    assert layer.r == 8 and math.isclose(layer.scale, (8 / math.sqrt(4) if rslora else 8 / 4))

    to_plain(inj, "default")  # in place: the same model, now base weights + rank-2r LoRA
    torch.testing.assert_close(logits(model, batch), trained, rtol=0, atol=ATOL)
    again = save_adapter(inj, tmp_path / "b.safetensors")  # the same file, metadata included
    assert read_metadata(again)["converted_from"] == meta["converted_from"]
    assert all(torch.equal(t, load_file(path)[k]) for k, t in load_file(again).items())
    with inj.disabled():  # and the base is the original one again
        torch.testing.assert_close(logits(model, batch), logits(tiny_blip(), batch), rtol=0,
                                   atol=0)


def test_converted_file_resumes_as_the_trained_adapter(tmp_path, batch):
    model = tiny_blip()
    inj = inject_lora(model, LoRAConfig(r=4, alpha=8, init="pissa"))
    train_one_step(inj, batch)
    trained, state = logits(model, batch), weights(model)
    layers = {p: (m.A.clone(), m.B.clone()) for p, m in inj.adapters["default"].items()}
    path = save_adapter(inj, tmp_path / "a.safetensors")

    fresh = tiny_blip()
    again = load_adapter(fresh, path, name="default")
    to_training_form(again, "default", read_metadata(path))
    adapter = again.adapters["default"]
    assert adapter.config.init == "pissa" and adapter.config.r == 4
    for p, m in adapter.items():  # the halves are exact: A, B, A0 and -(-B0)
        assert torch.equal(m.A, layers[p][0]) and torch.equal(m.B, layers[p][1])
        assert torch.equal(adapter.initial[p][0], inj.adapters["default"].initial[p][0])
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())  # residuals
    torch.testing.assert_close(logits(fresh, batch), trained, rtol=0, atol=0)
    train_one_step(again, batch)  # and it trains on
    assert not torch.equal(again.adapter_parameters()[0], inj.adapter_parameters()[0])
    other = load_adapter(tiny_blip(), path, name="default")
    with pytest.raises(ValueError, match="bad 'converted_from' metadata"):
        to_training_form(other, "default", {"converted_from": '{"init": "pissa"}'})


def test_quantized_base_is_refused_unchanged():
    model = tiny_blip()
    quantize_model(model, "int8")
    before = weights(model)
    with pytest.raises(ValueError, match=r"quantized base .* int8.*drop --quantize"):
        inject_lora(model, LoRAConfig(r=4, alpha=8, init="pissa"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rank_above_a_layer_dimension_is_refused():
    with pytest.raises(ValueError, match=r"rank 64 exceeds .*smaller dimension"):
        inject_lora(tiny_blip(), LoRAConfig(r=64, alpha=8, init="olora"))


def test_unconverted_file_is_refused(tmp_path):
    model = tiny_blip()
    inj = inject_lora(model, LoRAConfig(r=2, alpha=4, targets=("query",)))
    path = save_adapter(inj, tmp_path / "a.safetensors")
    tensors, meta = load_file(path), read_metadata(path)
    meta["config"] = json.dumps({**json.loads(meta["config"]), "init": "olora"})
    save_file(tensors, tmp_path / "b.safetensors", metadata=meta)
    with pytest.raises(AdapterFileError, match="init 'olora' saved unconverted"):
        load_adapter(tiny_blip(), tmp_path / "b.safetensors")


def test_file_without_init_field_loads_as_default(tmp_path):
    """Adapter files written before the init setting existed (and plain adapters now, which
    leave the default out) still load."""
    inj = inject_lora(tiny_blip(), LoRAConfig(r=2, alpha=4, targets=("query",)))
    path = save_adapter(inj, tmp_path / "a.safetensors")
    tensors, meta = load_file(path), read_metadata(path)
    assert "init" not in json.loads(meta["config"])
    save_file(tensors, tmp_path / "old.safetensors", metadata=meta)
    loaded = load_adapter(tiny_blip(), tmp_path / "old.safetensors")
    assert loaded.adapters["old"].config.init == "default"


# --- against PEFT's golden PiSSA adapter (tests/fixtures/peft_golden, peft 0.21.2) ------------
def golden_pissa_model() -> tuple[BlipForConditionalGeneration, object]:
    model = BlipForConditionalGeneration.from_pretrained(GOLDEN / "base").eval()
    return model, inject_lora(model, LoRAConfig(r=2, alpha=4, init="pissa",
                                                targets=("query", "value")))


def test_pissa_init_matches_peft():
    """PEFT's converted file holds [A; A0] and [B, -B0]: our init's (A0, B0) are its halves."""
    _, inj = golden_pissa_model()
    peft = load_file(GOLDEN / "pissa_converted" / "adapter_model.safetensors")
    paths = inj.adapters["default"].paths
    assert {f"base_model.model.{p}.lora_A.weight" for p in paths} <= peft.keys()
    assert len(paths) * 2 == len(peft)
    for path, (a0, b0) in inj.adapters["default"].initial.items():
        key = f"base_model.model.{path}"
        torch.testing.assert_close(a0, peft[f"{key}.lora_A.weight"][2:], rtol=0, atol=1e-6)
        torch.testing.assert_close(b0, -peft[f"{key}.lora_B.weight"][:, 2:], rtol=0, atol=1e-6)


def test_peft_trained_pissa_gives_peft_logits_and_peft_conversion(tmp_path):
    """PEFT's trained (unconverted) A, B on our residual base give PEFT's logits; save_peft
    writes what PEFT's own conversion wrote."""
    golden = load_file(GOLDEN / "expected.safetensors")
    model, inj = golden_pissa_model()
    trained = load_file(GOLDEN / "pissa_unconverted" / "adapter_model.safetensors")
    with torch.no_grad():
        for path, layer in inj.adapters["default"].items():
            layer.A.copy_(trained[f"base_model.model.{path}.lora_A.weight"])
            layer.B.copy_(trained[f"base_model.model.{path}.lora_B.weight"])
    torch.testing.assert_close(logits(model, golden), golden["pissa_logits"], rtol=0, atol=ATOL)
    out = save_peft(inj, tmp_path / "peft")
    ours, theirs = (load_file(d / "adapter_model.safetensors")
                    for d in (out, GOLDEN / "pissa_converted"))
    assert ours.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (4, 8.0, True)
    fresh = BlipForConditionalGeneration.from_pretrained(GOLDEN / "base").eval()
    load_peft(fresh, out)  # accepted: a converted adapter is plain LoRA
    torch.testing.assert_close(logits(fresh, golden), golden["pissa_logits"], rtol=0, atol=ATOL)


# --- train.py --init ------------------------------------------------------------------------
def test_train_pissa_resumes_bit_identically_and_saves_a_converted_adapter(tmp_path):
    setup = write_tiny_run(tmp_path / "setup")
    flags = ("--init", "pissa", "--epochs", "2", "--r", "4", "--alpha", "8")
    full = train.main(train_args(setup, tmp_path / "a", *flags, "--eval-file", str(setup[1])))
    train.main(train_args(setup, tmp_path / "b", *flags, "--stop-after-steps", "3"))
    resumed = train.main(train_args(setup, tmp_path / "b", *flags, "--resume", "auto"))
    a, b = load_file(full), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = read_metadata(full)
    assert json.loads(meta["converted_from"])["init"] == "pissa"
    assert json.loads(meta["config"])["r"] == 8  # rank 2r: loads as plain LoRA
    report = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert set(report) >= {"adapter", "base"}
    with pytest.raises(SystemExit, match="settings differ"):  # --init is a resume setting
        train.main(train_args(setup, tmp_path / "b", "--epochs", "3", "--r", "4", "--alpha",
                              "8", "--resume", str(tmp_path / "b/checkpoints/step-000003")))
