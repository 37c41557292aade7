"""PEFT directory layout, written and read without peft: exact round trip, documented keys."""

import json

import pytest
import torch
from conftest import randomize_adapters, tiny_blip
from safetensors import safe_open

from lora import AdapterFileError, LoRAConfig, inject_lora, load_peft, save_peft


def test_peft_export_import_round_trip(tmp_path, batch):
    model = tiny_blip()
    cfg = LoRAConfig(r=4, alpha=8, targets=("text",), rank_pattern={"intermediate.dense": 2},
                     alpha_pattern={"query": 2.0}, rslora=True)
    inj = inject_lora(model, cfg)
    randomize_adapters(inj)
    with torch.no_grad():
        expected = model(**batch).logits
    out = save_peft(inj, tmp_path / "peft", base_model="tiny-test")

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_rslora"] is True and config["base_model_name_or_path"] == "tiny-test"
    assert config["target_modules"] == inj.adapters["default"].paths
    assert set(config["rank_pattern"].values()) == {2} and len(config["rank_pattern"]) == 2
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    paths = inj.adapters["default"].paths
    assert keys == {f"base_model.model.{p}.lora_{ab}.weight" for p in paths for ab in "AB"}

    fresh = tiny_blip()
    loaded = load_peft(fresh, out)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, expected)
    for (p1, a), (p2, b) in zip(inj.adapters["default"].items(),
                                loaded.adapters["default"].items(), strict=True):
        assert p1 == p2 and (a.r, a.alpha, a.base_scale) == (b.r, b.alpha, b.base_scale)
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


def test_peft_import_rejects_unsupported(tmp_path):
    model = tiny_blip()
    out = save_peft(inject_lora(model, LoRAConfig(targets=("vision",))), tmp_path / "p")
    config = json.loads((out / "adapter_config.json").read_text())
    config["use_dora"] = True
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="use_dora"):
        load_peft(tiny_blip(), out)
    with pytest.raises(AdapterFileError, match="cannot read PEFT config"):
        load_peft(tiny_blip(), tmp_path / "nowhere")
