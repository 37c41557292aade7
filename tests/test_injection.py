"""Hook injection on a tiny BLIP: exact equivalences, merge/unmerge, removal, presets."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters, tiny_blip, tiny_blip_vqa

from lora import LoRAConfig, LoRALinear, inject_lora, select_targets
from models.loading import enable_activation_checkpointing

VISION = ["self_attn.qkv", "self_attn.projection", "mlp.fc1", "mlp.fc2"]
TEXT = ["attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "crossattention.self.query", "crossattention.self.key",
        "crossattention.self.value", "crossattention.output.dense", "intermediate.dense",
        "output.dense"]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_zero_b_leaves_logits_bit_identical(model, batch):
    base = logits(model, batch)
    keys = list(model.state_dict())
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    assert torch.equal(logits(model, batch), base)
    assert list(model.state_dict()) == keys  # adapters live outside the model
    assert all(not isinstance(m, LoRALinear) for m in model.modules())


def test_hooked_linear_equals_merged_formula(model):
    inj = inject_lora(model, LoRAConfig(r=4, alpha=12, targets=("vision",)))
    randomize_adapters(inj)
    path = "vision_model.encoder.layers.1.mlp.fc1"
    linear = model.get_submodule(path)
    layer = dict(inj.adapters["default"].items())[path]
    x = torch.randn(2, 5, linear.in_features)
    expected = F.linear(x, linear.weight + (12 / 4) * layer.B @ layer.A, linear.bias)
    torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-6)


def test_each_hook_fires_once_per_forward(model, batch):
    inj = inject_lora(model, LoRAConfig(r=2, alpha=2))
    calls = {}
    for path, layer in inj.adapters["default"].items():
        layer.register_forward_hook(lambda *_, p=path: calls.__setitem__(p, calls.get(p, 0) + 1))
    model(**batch)
    assert calls == dict.fromkeys(inj.adapters["default"].paths, 1)


def test_gradients_reach_only_adapters(model, batch):
    inj = inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_adapters(inj)
    model(**batch).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    grads = [p.grad for p in inj.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # r·(in + out) per targeted Linear: 4 vision + 10 text Linears per layer, 2 layers each
    linears = [model.get_submodule(p) for p in inj.adapters["default"].paths]
    assert len(linears) == 2 * (len(VISION) + len(TEXT))
    trainable, total = inj.parameter_counts()
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in linears)
    assert total == trainable + sum(p.numel() for p in model.parameters())


def test_merge_equals_unmerged_idempotent_and_unmerge_exact(model, batch):
    before = snapshot(model)
    inj = inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_adapters(inj)
    hooked = logits(model, batch)
    inj.merge(exact_unmerge=True)
    assert all(not m._forward_hooks for m in model.modules())  # zero-overhead while merged
    torch.testing.assert_close(logits(model, batch), hooked, rtol=1e-4, atol=1e-5)
    once = snapshot(model)
    inj.merge()
    assert all(torch.equal(v, once[k]) for k, v in model.state_dict().items())
    # W' = W + (alpha/r)·B·A, written out independently
    for path, layer in inj.adapters["default"].items():
        w0 = before[path + ".weight"]
        torch.testing.assert_close(once[path + ".weight"], w0 + 2.0 * layer.B @ layer.A)
    inj.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits(model, batch), hooked, rtol=0, atol=0)


def test_default_merge_keeps_no_backup_and_unmerge_subtracts(model):
    before = snapshot(model)
    inj = inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_adapters(inj)
    inj.merge()
    assert inj._backups == {}  # no copy of W by default (gigabytes on a large base)
    inj.unmerge()
    for k, v in model.state_dict().items():  # fp32: a few ulps (see test_merge_dtypes.py)
        torch.testing.assert_close(v, before[k], rtol=1e-6, atol=1e-6)
    inj.merge(exact_unmerge=True)  # opt-in: one copy per merged Linear, dropped on unmerge
    assert set(inj._backups) == set(inj.adapters["default"].paths)
    inj.unmerge()
    assert inj._backups == {}


def test_remove_restores_model_exactly(model, batch):
    before, flags = snapshot(model), [p.requires_grad for p in model.parameters()]
    base = logits(model, batch)
    inj = inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_adapters(inj)
    inj.merge(["default"], exact_unmerge=True)
    inj.remove()
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(logits(model, batch), base)


def test_named_adapters_activate_scale_delete(model):
    path = "text_decoder.bert.encoder.layer.0.intermediate.dense"
    linear = model.get_submodule(path)
    x = torch.randn(3, linear.in_features)
    base = linear(x)
    inj = inject_lora(model, LoRAConfig(r=2, alpha=4, targets=("intermediate.dense",)), "a")
    inj.add_adapter("b", LoRAConfig(r=3, alpha=3, targets=("intermediate.dense",)))
    randomize_adapters(inj)
    da, db = (dict(inj.adapters[n].items())[path](x) for n in "ab")
    torch.testing.assert_close(linear(x), base + da + db)
    inj.set_active(["b"])
    torch.testing.assert_close(linear(x), base + db)
    inj.set_active(["a", "b"])
    inj.set_scale("a", 0.5)
    torch.testing.assert_close(linear(x), base + 0.5 * da + db)
    inj.set_scale("a", 1.0)
    inj.merge(["a"], exact_unmerge=True)
    torch.testing.assert_close(linear(x), base + da + db, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError):
        inj.set_scale("a", 2.0)
    inj.delete_adapter("a")  # unmerges first
    torch.testing.assert_close(linear(x), base + db, rtol=1e-5, atol=1e-6)
    inj.set_active([])
    assert torch.equal(linear(x), base)
    with pytest.raises(KeyError):
        inj.set_active(["a"])


def test_merge_two_then_unmerge_one(model):
    path = "vision_model.encoder.layers.0.mlp.fc2"
    w0 = model.get_submodule(path).weight.detach().clone()
    inj = inject_lora(model, LoRAConfig(r=2, alpha=2, targets=("mlp.fc2",)), "a")
    inj.add_adapter("b", LoRAConfig(r=2, alpha=4, targets=("mlp.fc2",)))
    randomize_adapters(inj)
    inj.merge(exact_unmerge=True)
    inj.unmerge(["a"])
    lb = dict(inj.adapters["b"].items())[path]
    torch.testing.assert_close(model.get_submodule(path).weight, w0 + 2.0 * lb.B @ lb.A)
    inj.unmerge()
    assert torch.equal(model.get_submodule(path).weight, w0)


def _names(model, targets):
    return select_targets(model, targets)


def test_presets_select_exact_linear_sets(model):
    layers = range(2)
    assert _names(model, ["vision"]) == [
        f"vision_model.encoder.layers.{i}.{s}" for i in layers for s in VISION]
    assert _names(model, ["text"]) == [
        f"text_decoder.bert.encoder.layer.{i}.{s}" for i in layers for s in TEXT]
    vqa = tiny_blip_vqa()
    assert _names(vqa, ["text"]) == [
        f"text_{part}.encoder.layer.{i}.{s}"
        for part in ("encoder", "decoder.bert") for i in layers for s in TEXT]


def test_suffix_regex_and_overrides(model):
    # dotted-suffix match: 'attention.output.dense' must not catch 'crossattention.output.dense'
    assert _names(model, ["attention.output.dense"]) == [
        f"text_decoder.bert.encoder.layer.{i}.attention.output.dense" for i in range(2)]
    assert _names(model, [r"re:.*layers\.0\.mlp\.fc[12]"]) == [
        "vision_model.encoder.layers.0.mlp.fc1", "vision_model.encoder.layers.0.mlp.fc2"]
    cfg = LoRAConfig(r=8, alpha=16, targets=("vision",), rank_pattern={"qkv": 2},
                     alpha_pattern={"re:.*fc[12]": 4.0})
    inj = inject_lora(model, cfg)
    for path, layer in inj.adapters["default"].items():
        assert layer.r == (2 if path.endswith("qkv") else 8)
        assert layer.alpha == (4.0 if path.endswith(("fc1", "fc2")) else 16.0)
        assert layer.base_scale == layer.alpha / layer.r


def test_target_matching_nothing_lists_candidates(model):
    with pytest.raises(ValueError, match=r"q_proj.*\n.*layers\.N\.self_attn\.qkv"):
        inject_lora(model, LoRAConfig(targets=("vision", "q_proj")))
    assert all(not m._forward_hooks for m in model.modules())


def test_bf16_autocast_forward_backward(model, batch):
    inj = inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_adapters(inj)
    model(**batch).loss.backward()
    reference = [p.grad.clone() for p in inj.parameters()]
    inj.zero_grad()
    with torch.no_grad():
        loss32 = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    # bf16 keeps 8 significant bits (u = 2^-8 ≈ 0.004): the loss within a few u of fp32's,
    # the fp32 adapter grads pointing the same way (measured: 0.1% and 7% apart)
    torch.testing.assert_close(loss.float(), loss32, rtol=1e-2, atol=0)
    for p, ref in zip(inj.parameters(), reference, strict=True):
        assert p.grad.dtype == torch.float32
        assert (p.grad - ref).norm() < 0.25 * ref.norm()


def _dropout_grads(batch, checkpointing, seed, dropout=0.3):
    model = tiny_blip().train()
    inj = inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout))
    randomize_adapters(inj)
    if checkpointing:
        enable_activation_checkpointing(model)
    torch.manual_seed(seed)
    model(**batch).loss.backward()
    return [p.grad for p in inj.parameters()]


def test_lora_dropout_under_activation_checkpointing_gives_same_grads(batch):
    # The recompute in backward must draw the same dropout masks as the forward did
    # (non-reentrant checkpoint restores the RNG state): else grads use other masks.
    plain, ckpt = _dropout_grads(batch, False, 7), _dropout_grads(batch, True, 7)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # The masks matter: another seed, or no dropout, gives other grads
    for other in (_dropout_grads(batch, False, 8), _dropout_grads(batch, False, 7, dropout=0.0)):
        assert max((a - b).abs().max() for a, b in zip(plain, other, strict=True)) > 1e-3


def test_gradient_checkpointing_gives_same_adapter_grads(batch):
    grads = []
    for ckpt in (False, True):
        model = tiny_blip().train()
        inj = inject_lora(model, LoRAConfig(r=4, alpha=8))
        randomize_adapters(inj)
        if ckpt:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model(**batch).loss.backward()
        grads.append([p.grad for p in inj.parameters()])
    assert all(g.abs().sum() > 0 for g in grads[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


# --- adapter state: active ⊇ merged, disabled(), device moves ------------------------------
FC1 = "vision_model.encoder.layers.1.mlp.fc1"


def _fc1_setup(model):
    """Two adapters on one Linear, random deltas; returns (injection, linear, x, base output)."""
    linear = model.get_submodule(FC1)
    x = torch.randn(3, linear.in_features)
    base = linear(x).detach()
    inj = inject_lora(model, LoRAConfig(r=2, alpha=4, targets=("mlp.fc1",)), "a")
    inj.add_adapter("b", LoRAConfig(r=3, alpha=3, targets=("mlp.fc1",)), activate=False)
    randomize_adapters(inj)
    return inj, linear, x, base


def _delta(inj, name, x):
    layer = dict(inj.adapters[name].items())[FC1]
    return layer.scale * x @ layer.A.T @ layer.B.T


def test_deactivating_a_merged_adapter_unmerges_it(model):
    inj, linear, x, base = _fc1_setup(model)
    w0 = linear.weight.detach().clone()
    inj.merge(exact_unmerge=True)
    assert inj.merged == ["a"]
    inj.set_active([])
    assert inj.active == [] and inj.merged == []
    assert torch.equal(linear.weight, w0) and torch.equal(linear(x), base)
    inj.set_active(["a"])  # active again: hooked, not silently re-merged
    assert inj.merged == [] and torch.equal(linear.weight, w0)
    torch.testing.assert_close(linear(x), base + _delta(inj, "a", x))


def test_merging_an_inactive_adapter_is_refused(model):
    inj, linear, x, base = _fc1_setup(model)
    w0 = linear.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"'b' is not active.*set_active"):
        inj.merge(["b"])
    assert inj.merged == [] and torch.equal(linear.weight, w0)
    inj.set_active(["a", "b"])
    inj.merge(["b"])
    assert inj.merged == ["b"]
    expected = base + _delta(inj, "a", x) + _delta(inj, "b", x)
    torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-6)


def test_set_active_ignores_repeated_names(model):
    inj, linear, x, base = _fc1_setup(model)
    inj.set_active(["a", "a"])
    assert inj.active == ["a"]
    torch.testing.assert_close(linear(x), base + _delta(inj, "a", x))


def _state(inj, linear):
    params = {k: v.clone() for k, v in inj.state_dict().items()}
    return inj.active[:], inj.merged[:], params, linear.weight.detach().clone()


@pytest.mark.parametrize("merge", [None, "exact", "default"])
def test_disabled_gives_base_outputs_then_restores(model, merge):
    inj, linear, x, base = _fc1_setup(model)
    inj.set_active(["a", "b"])
    if merge:
        inj.merge(["b"], exact_unmerge=merge == "exact")
    active, merged, params, weight = _state(inj, linear)
    before = linear(x).detach()
    with inj.disabled():
        if merge == "default":  # W - delta in fp32, one rounding: within a few fp32 ulps
            torch.testing.assert_close(linear(x), base, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(linear(x), base)
    after = _state(inj, linear)
    assert after[:2] == (active, merged)
    assert all(torch.equal(after[2][k], v) for k, v in params.items())
    if merge == "default":
        torch.testing.assert_close(after[3], weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(linear(x), before, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(after[3], weight) and torch.equal(linear(x), before)


def test_disabled_restores_after_an_exception_and_undoes_changes_inside(model):
    inj, linear, x, _ = _fc1_setup(model)
    inj.merge(exact_unmerge=True)
    active, merged, _, weight = _state(inj, linear)
    before = linear(x).detach()
    with pytest.raises(KeyError), inj.disabled():
        inj.set_active(["b"])
        inj.merge()
        raise KeyError("boom")
    assert (inj.active, inj.merged) == (active, merged)
    assert torch.equal(linear.weight, weight) and torch.equal(linear(x), before)


def test_model_to_dtype_after_injection_keeps_adapters_working(model):
    inj, linear, _, _ = _fc1_setup(model)
    model.to(torch.float64)  # adapters stay fp32 (their optimizer dtype) and compute in x's dtype
    layer = dict(inj.adapters["a"].items())[FC1]
    assert layer.A.dtype == torch.float32
    x = torch.randn(3, linear.in_features, dtype=torch.float64)
    expected = F.linear(x, linear.weight + layer.scale * layer.B.double() @ layer.A.double(),
                        linear.bias)
    torch.testing.assert_close(linear(x), expected, rtol=1e-12, atol=1e-12)


def test_model_moved_without_its_adapters_fails_clearly(model):
    inj, linear, _, _ = _fc1_setup(model)
    model.to("meta")  # any device but the adapters': the same check as cuda vs cpu
    x = torch.empty(3, linear.in_features, device="meta")
    with pytest.raises(RuntimeError, match=rf"{FC1}.*cpu.*meta.*injection\.to"):
        linear(x)
    with pytest.raises(RuntimeError, match=r"injection\.to"):
        inj.merge()
    assert inj.merged == []
    inj.to("meta")
    assert linear(x).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_cuda_then_injection_cuda(model, batch):
    inj = inject_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_adapters(inj)
    expected = logits(model, batch)
    model.cuda()
    cuda_batch = {k: v.cuda() for k, v in batch.items()}
    with pytest.raises(RuntimeError, match=r"injection\.to"):
        logits(model, cuda_batch)
    inj.cuda()
    torch.testing.assert_close(logits(model, cuda_batch).cpu(), expected, rtol=1e-4, atol=1e-4)
