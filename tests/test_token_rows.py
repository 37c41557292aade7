"""Trainable token rows (lora/token_rows.py): hooks equal editing the embedding rows by hand."""

import copy
import json

import pytest
import torch
from conftest import tiny_blip, tiny_blip_vqa
from real_tokenizers import bert_tokenizer, real_model
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_runs import train_args, write_tiny_run
from transformers import BertTokenizer

import infer
import train
from lora import AdapterFileError, LoRAConfig, inject_lora, load_adapter, load_peft, save_adapter
from lora.peft_format import save_peft
from lora.token_rows import parse_token_spec, target_token_ids, task_target_labels

EMB = "text_decoder.bert.embeddings.word_embeddings"
HEAD = "text_decoder.cls.predictions.decoder"
IDS = (2, 5, 9, 17)


def with_rows(model, ids=IDS, seed=0, std=0.5):
    """``model`` with an adapter training ``ids`` (LoRA B left 0) and a random delta."""
    injection = inject_lora(model, LoRAConfig(r=4, trainable_tokens=ids))
    rows = injection.adapters["default"].token_rows
    with torch.no_grad():
        rows.delta.copy_(torch.randn(rows.delta.shape, generator=torch.Generator().manual_seed(
            seed)) * std)
    return injection, rows


def edited_copy(model, ids, delta):
    """An independent reference: a copy of the model with W[ids] += delta written in."""
    ref = copy.deepcopy(model)
    weight = ref.get_submodule(EMB).weight
    with torch.no_grad():
        for i, row in zip(ids, delta, strict=True):
            weight[i] += row
    return ref


def logits(model, batch):
    return model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"]).logits


def test_the_blip_lm_head_is_tied_to_the_rows_that_train():
    model = tiny_blip()
    assert model.get_submodule(HEAD).weight is model.get_submodule(EMB).weight
    _, rows = with_rows(model)
    assert rows.embedding == EMB


def test_forward_equals_the_model_with_those_rows_replaced(batch):
    base = tiny_blip()
    reference = edited_copy(base, IDS, torch.zeros(len(IDS), 32))  # before hooks: W untouched
    injection, rows = with_rows(base)
    reference = edited_copy(reference, IDS, rows.delta.detach())
    batch["input_ids"][0, 1:5] = torch.tensor(IDS)  # the chosen ids are read, not only written
    assert torch.allclose(logits(base, batch), logits(reference, batch), atol=1e-5)
    with injection.disabled():  # and the hooks, not the weights, made the difference
        assert torch.equal(logits(base, batch), logits(tiny_blip(), batch))


def test_the_tied_head_gains_x_times_delta_in_the_chosen_columns_only(batch):
    model = tiny_blip()
    _, rows = with_rows(model)
    head = model.get_submodule(HEAD)
    seen = {}  # registered after the rows' hook: sees its output, and the head's input x
    head.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        logits(model, batch)
        x = seen["x"]
        plain = torch.nn.functional.linear(x, head.weight, head.bias)  # (B, T, vocab)
        expected = plain.clone()
        expected[..., list(IDS)] += x @ rows.delta.T  # (B, T, k)
    assert torch.allclose(seen["out"], expected, atol=1e-5)
    others = [i for i in range(plain.shape[-1]) if i not in IDS]
    assert not torch.allclose(seen["out"][..., list(IDS)], plain[..., list(IDS)])
    assert torch.equal(seen["out"][..., others], plain[..., others])


def test_gradients_reach_only_the_delta_and_equal_those_of_the_edited_rows(batch):
    model = tiny_blip()
    injection, rows = with_rows(model)
    reference = edited_copy(tiny_blip(), IDS, rows.delta.detach())
    model(**batch).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert rows.delta.grad is not None and rows.delta.grad.abs().min() > 0
    assert any(p is rows.delta for p in injection.adapter_parameters())  # the optimizer's
    weight = reference.get_submodule(EMB).weight
    reference.requires_grad_(False)
    weight.requires_grad_(True)
    reference(**batch).loss.backward()
    assert torch.allclose(rows.delta.grad, weight.grad[list(IDS)], atol=1e-6)


def test_merge_writes_the_rows_once_and_unmerge_restores_them_exactly(batch):
    model = tiny_blip()
    original = model.get_submodule(EMB).weight.detach().clone()
    injection, rows = with_rows(model)
    hooked = logits(model, batch)
    injection.merge()
    injection.merge()  # idempotent
    weight = model.get_submodule(EMB).weight
    assert torch.allclose(weight[list(IDS)], original[list(IDS)] + rows.delta, atol=1e-6)
    others = [i for i in range(weight.shape[0]) if i not in IDS]
    assert torch.equal(weight[others], original[others])
    assert torch.allclose(logits(model, batch), hooked, atol=1e-5)  # and no hook adds it twice
    injection.unmerge()
    assert torch.equal(model.get_submodule(EMB).weight, original)
    assert torch.allclose(logits(model, batch), hooked, atol=1e-5)
    injection.remove()
    assert torch.equal(logits(model, batch), logits(tiny_blip(), batch))


def test_save_holds_only_the_chosen_rows_and_loads_back_identically(tmp_path, batch):
    model = tiny_blip()
    injection, rows = with_rows(model)
    path = save_adapter(injection, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        saved = f.get_tensor(f"{EMB}.token_rows.delta")
    lora_keys = {f"{p}.lora_{ab}.weight" for p in injection.adapters["default"].paths
                 for ab in "AB"}
    assert keys == lora_keys | {f"{EMB}.token_rows.delta"}
    assert saved.shape == (len(IDS), 32) and torch.equal(saved, rows.delta.detach())
    assert json.loads(meta["config"])["trainable_tokens"] == list(IDS)
    fresh = tiny_blip()
    load_adapter(fresh, path)
    assert torch.equal(logits(fresh, batch), logits(model, batch))


def test_plain_adapters_keep_their_old_config_and_still_load(tmp_path, batch):
    model = tiny_blip()
    injection = inject_lora(model, LoRAConfig(r=4))
    path = save_adapter(injection, tmp_path / "plain.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert "trainable_tokens" not in json.loads(f.metadata()["config"])
    loaded = load_adapter(tiny_blip(), path)
    assert loaded.adapters["plain"].token_rows is None


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop(f"{EMB}.token_rows.delta"), "no key"),
    (lambda t: t.update({f"{EMB}.token_rows.delta": torch.zeros(3, 32)}), "needs floating"),
    (lambda t: t[f"{EMB}.token_rows.delta"].__setitem__((0, 0), float("nan")), "NaN"),
])
def test_a_damaged_rows_tensor_is_refused_before_the_model_changes(tmp_path, damage, message):
    injection, _ = with_rows(tiny_blip())
    path = save_adapter(injection, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    damage(tensors)
    save_file(tensors, str(path), metadata=meta)
    fresh = tiny_blip()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(fresh, path)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="not in this model's vocabulary"):
        inject_lora(tiny_blip(), LoRAConfig(trainable_tokens=(64,)))
    with pytest.raises(ValueError, match="token ids"):
        LoRAConfig(trainable_tokens=(True,))


def test_peft_format_writes_new_rows_under_peft_names_and_reads_them_back(tmp_path, batch):
    model = tiny_blip()
    injection, rows = with_rows(model)
    save_peft(injection, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {EMB: list(IDS)}
    key = f"base_model.model.{EMB}.token_adapter.trainable_tokens_delta"
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), framework="pt") as f:
        values = f.get_tensor(key)
        assert not any("token_rows" in k for k in f.keys())  # noqa: SIM118
    # PEFT stores the replacement rows W[ids] + delta (TrainableTokensLayer.update_layer).
    expected = tiny_blip().get_submodule(EMB).weight[list(IDS)] + rows.delta
    assert torch.allclose(values, expected.detach(), atol=1e-6)
    fresh = tiny_blip()
    loaded = load_peft(fresh, tmp_path / "peft")
    assert loaded.adapters["default"].config.trainable_tokens == IDS
    assert torch.allclose(logits(fresh, batch), logits(model, batch), atol=1e-5)


def test_peft_rows_in_any_id_order_and_a_list_config_read_as_peft_means_them(tmp_path, batch):
    """PEFT keeps the user's id order; a plain list names get_input_embeddings()."""
    model = tiny_blip()
    injection, _ = with_rows(model)
    save_peft(injection, tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["trainable_token_indices"] = list(reversed(IDS))
    config_path.write_text(json.dumps(config))
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    key = f"base_model.model.{EMB}.token_adapter.trainable_tokens_delta"
    with safe_open(str(weights), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors[key] = tensors[key].flip(0).contiguous()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    fresh = tiny_blip()
    load_peft(fresh, tmp_path / "peft")
    assert torch.allclose(logits(fresh, batch), logits(model, batch), atol=1e-5)
    config["trainable_token_indices"] = {"text_encoder.nothing": list(IDS)}
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=r"not .* or a module tied to it"):
        load_peft(tiny_blip(), tmp_path / "peft")


@pytest.mark.parametrize("family", ["blip2-opt", "blip2-t5"])
def test_blip2_rows_follow_every_module_sharing_the_embedding(family):
    model = real_model(family)
    model = model[0] if isinstance(model, tuple) else model
    model.eval()
    ids = (5, 7, 11)
    torch.manual_seed(0)
    inputs = {"pixel_values": torch.randn(1, 3, 32, 32),
              "input_ids": torch.tensor([[model.config.image_token_index] * 32 + [5, 7, 9, 11]])}
    if family == "blip2-t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 11, 5, 3]])
    reference = copy.deepcopy(model)
    injection = inject_lora(model, LoRAConfig(r=2, trainable_tokens=ids))
    rows = injection.adapters["default"].token_rows
    with torch.no_grad():
        rows.delta.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        reference.get_submodule(rows.embedding).weight[list(ids)] += rows.delta
    assert torch.allclose(model(**inputs).logits, reference(**inputs).logits, atol=1e-4)


def test_blip_vqa_trains_the_answer_decoder_rows_and_leaves_the_question_encoder_alone():
    from models.blip_vqa import answer_logits

    model = tiny_blip_vqa()
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g),
             "input_ids": torch.tensor([[1, 5, 9, 17], [1, 9, 9, 2]]),
             "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "answer_ids": torch.tensor([[1, 17, 5, 2], [1, 9, 2, 0]]),
             "answer_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    reference = copy.deepcopy(model)
    _, rows = with_rows(model)
    assert rows.embedding == EMB  # the decoder's, tied to its head; not text_encoder's
    with torch.no_grad():
        reference.get_submodule(EMB).weight[list(IDS)] += rows.delta
        assert torch.allclose(answer_logits(model, batch), answer_logits(reference, batch),
                              atol=1e-5)


def test_token_spec_names_ids_and_vocabulary_tokens():
    tok = bert_tokenizer()
    red, sep = tok.convert_tokens_to_ids(["red", "[SEP]"])
    assert parse_token_spec(f"red, [SEP],{red}, 7", tok) == [red, sep, red, 7]
    with pytest.raises(ValueError, match="not one token of this vocabulary"):
        parse_token_spec("redcube", tok)
    with pytest.raises(ValueError, match="empty entry"):
        parse_token_spec("red,,blue", tok)


def test_auto_takes_exactly_the_ids_of_the_training_targets():
    assert target_token_ids([torch.tensor([[-100, 5, 3], [3, 9, -100]])]) == [3, 5, 9]

    class Task:  # the collator puts the prompt in the input, not in the labels
        def item(self, sample, image):
            assert image.size == (1, 1)
            return sample

        def collate(self, items):
            return {"labels": torch.tensor([[-100, *s] for s in items])}

    batches = list(task_target_labels(Task(), [[4, 2], [8, 1], [4, 4]], batch_size=2))
    assert [b.tolist() for b in batches] == [[[-100, 4, 2], [-100, 8, 1]], [[-100, 4, 4]]]


def test_train_auto_rows_are_the_target_words_and_infer_uses_them(tmp_path):
    setup = write_tiny_run(tmp_path)
    adapter = train.main(train_args(setup, tmp_path / "run", "--epochs", "2", "--lr", "1e-2",
                                    "--trainable-tokens", "auto"))
    with safe_open(str(adapter), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
        delta = f.get_tensor(f"{EMB}.token_rows.delta")
    tok = BertTokenizer.from_pretrained(str(setup[0]))
    # Captions are "a <colour> cube" (every colour in the training split) + [SEP] to end them.
    words = ["a", "red", "green", "blue", "cube", "[SEP]"]
    assert config["trainable_tokens"] == sorted(tok.convert_tokens_to_ids(words))
    assert delta.shape == (6, 32) and delta.abs().min(dim=1).values.gt(0).all()  # all trained
    images = sorted(str(p) for p in setup[1].parent.glob("*.png"))[:3]
    hooked = infer.main([*images, "--adapter", str(adapter)])
    merged = infer.main([*images, "--adapter", str(adapter), "--merge"])
    assert hooked == merged
    with pytest.raises(SystemExit, match="not one token of this vocabulary"):
        train.main(train_args(setup, tmp_path / "bad", "--trainable-tokens", "redcube"))


def test_a_resumed_run_trains_the_same_rows_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    setup = write_tiny_run(tmp_path)
    flags = ("--epochs", "2", "--trainable-tokens", "auto")
    full = load_file(train.main(train_args(setup, tmp_path / "a", *flags)))
    train.main(train_args(setup, tmp_path / "b", *flags, "--stop-after-steps", "3"))
    resumed = load_file(train.main(train_args(setup, tmp_path / "b", *flags, "--resume", "auto")))
    key = f"{EMB}.token_rows.delta"
    assert key in full and full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
