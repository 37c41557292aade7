"""Variants that meet: what combines (LoRA+ groups in the 8-bit optimizer) and what is refused
with a message rather than silently computing something else."""

from __future__ import annotations

import pytest
from conftest import tiny_blip

from cli import train_flags
from lora import LoRAConfig, inject_lora, save_adapter
from lora.arithmetic import add_weighted_adapter, combine_files
from training.adamw8bit import AdamW8bit
from training.optimizer import make_optimizer


def test_dora_with_pissa_init_is_refused():
    with pytest.raises(ValueError, match="DoRA with init 'pissa'"):
        LoRAConfig(dora=True, init="pissa")


@pytest.mark.parametrize("variant", [{"dora": True}, {"trainable_tokens": (3, 5)}])
def test_arithmetic_refuses_dora_and_token_rows(variant, tmp_path):
    injection = inject_lora(tiny_blip(), LoRAConfig(r=2, targets=("text",), **variant))
    injection.add_adapter("plain", LoRAConfig(r=2, targets=("text",)))
    with pytest.raises(ValueError, match="combines plain LoRA adapters only"):
        add_weighted_adapter(injection, ["default", "plain"], [0.5, 0.5], "mix", "cat")
    path = save_adapter(injection, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="combines plain LoRA adapters only"):
        combine_files([f"{path}:0.5", f"{path}:0.5"], tmp_path / "b.safetensors", "cat")


@pytest.mark.parametrize("variant", [{"dora": True}, {"trainable_tokens": (3, 5)}])
def test_per_sample_refuses_dora_and_token_rows(variant):
    injection = inject_lora(tiny_blip(), LoRAConfig(r=2, targets=("text",), **variant))
    with pytest.raises(ValueError, match="only plain LoRA adapters"), \
            injection.per_sample(["default", None]):
        pass


def test_loraplus_groups_reach_the_8bit_optimizer():
    injection = inject_lora(tiny_blip(), LoRAConfig(r=2, targets=("text",)))
    optimizer = make_optimizer(injection, "default", 1e-3, 0.01, loraplus_lr_ratio=16,
                               optimizer="adamw8bit")
    assert isinstance(optimizer, AdamW8bit)
    b_ids = {id(layer.B) for _, layer in injection._get("default").items()}
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert {lrs[i] for i in b_ids} == {16e-3}
    assert {lr for i, lr in lrs.items() if i not in b_ids} == {1e-3}
    assert len(lrs) == len(injection.adapter_parameters("default"))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_train_refuses_dora_with_pissa_before_loading(init, capsys):
    with pytest.raises(SystemExit) as e:
        train_flags.parse_args(["--dora", "--init", init])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: --dora with --init" in err


def test_train_refuses_pissa_on_a_quantized_base_before_loading(capsys):
    with pytest.raises(SystemExit) as e:
        train_flags.parse_args(["--init", "pissa", "--quantize", "nf4"])
    assert e.value.code == 2
    assert "error: --init pissa replaces each base weight" in capsys.readouterr().err
