"""LoRA+ (--loraplus-lr-ratio): B at ratio × lr, A and the rest at lr, one AdamW step by hand."""

import json
import math

import pytest
import torch
from conftest import tiny_blip
from tiny_runs import train_args, write_tiny_run

import train
from lora import LoRAConfig, inject_lora, read_metadata
from training.optimizer import make_optimizer, param_groups


def _injection(dora=False):
    return inject_lora(tiny_blip(), LoRAConfig(r=4, targets=("text",), dora=dora))


@pytest.mark.parametrize("dora", [False, True])
def test_param_groups_put_every_b_and_only_b_at_the_ratio(dora):
    injection = _injection(dora)
    layers = [layer for _, layer in injection.adapters["default"].items()]
    groups = param_groups(injection, "default", lr=1e-3, loraplus_lr_ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    rest, bs = ({id(p) for p in g["params"]} for g in groups)
    assert bs == {id(m.B) for m in layers}
    expected_rest = {id(m.A) for m in layers} | ({id(m.magnitude) for m in layers} if dora
                                                  else set())
    assert rest == expected_rest
    (single,) = param_groups(injection, "default", lr=1e-3)  # ratio 1: one group, as before
    assert single["lr"] == 1e-3 and len(single["params"]) == len(rest) + len(bs)


def test_one_adamw_step_matches_the_update_written_out():
    injection = _injection()
    lr, wd, ratio, betas, eps = 1e-2, 0.1, 4.0, (0.9, 0.999), 1e-8
    opt = make_optimizer(injection, "default", lr, wd, ratio)
    _, layer = next(iter(injection.adapters["default"].items()))
    with torch.no_grad():
        layer.B.normal_()
    before = {"A": layer.A.detach().clone(), "B": layer.B.detach().clone()}
    g = torch.Generator().manual_seed(0)
    for p in injection.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    grads = {"A": layer.A.grad.clone(), "B": layer.B.grad.clone()}
    opt.step()
    for name, param, group_lr in (("A", layer.A, lr), ("B", layer.B, ratio * lr)):
        # AdamW, step 1: m̂ = g, v̂ = g² after bias correction; decay decoupled, times the lr.
        m_hat = (1 - betas[0]) * grads[name] / (1 - betas[0])
        v_hat = (1 - betas[1]) * grads[name] ** 2 / (1 - betas[1])
        expected = before[name] * (1 - group_lr * wd) - group_lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ratio", [0, -1, math.inf, math.nan])
def test_bad_ratio_is_refused(ratio):
    with pytest.raises(ValueError, match="loraplus-lr-ratio"):
        param_groups(_injection(), "default", 1e-3, ratio)


def test_train_flag_groups_and_metadata(tmp_path, capsys):
    setup = write_tiny_run(tmp_path)
    adapter = train.main(train_args(setup, tmp_path / "run", "--epochs", "1",
                                    "--loraplus-lr-ratio", "16", "--lr", "1e-3"))
    assert read_metadata(adapter)["loraplus_lr_ratio"] == "16.0"
    state = torch.load(tmp_path / "run/checkpoints/step-000002/train_state.pt", weights_only=True)
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [1e-3, 16e-3]
    config = json.loads((tmp_path / "run/run_config.json").read_text())
    assert config["loraplus_lr_ratio"] == 16.0
    with pytest.raises(SystemExit):
        train.main(train_args(setup, tmp_path / "bad", "--loraplus-lr-ratio", "0"))
    assert "--loraplus-lr-ratio must be a finite number > 0" in capsys.readouterr().err
