"""BLIP-2 with LoRA on tiny random OPT and Flan-T5 models (their real tokenizer types: byte-level
BPE, Unigram): batches, loss, generation, adapters."""

import pytest
import torch
from blip2_tiny import QUERY_TOKENS, tiny_blip2
from conftest import randomize_adapters
from PIL import Image

from lora import LoRAConfig, inject_lora, load_adapter, save_adapter, select_targets
from models.blip2 import Blip2Collator, blip2_generate, blip2_loss_sum, model_inputs

FAMILIES = ["opt", "t5"]
ALL = LoRAConfig(r=4, alpha=8, targets=("vision", "qformer", "language"))
PROMPTS = ["Question: what colour is the cube? Answer:", ""]
TARGETS = ["red", "a photo of a blue cube"]


def image(rgb):
    return Image.new("RGB", (32, 32), rgb)


ITEMS = [(image((220, 30, 30)), PROMPTS[0], TARGETS[0]),
         (image((30, 30, 220)), PROMPTS[1], TARGETS[1])]


def expected_targets(family):
    vision = [f"vision_model.encoder.layers.{i}.{s}" for i in range(2)
              for s in ("self_attn.qkv", "self_attn.projection", "mlp.fc1", "mlp.fc2")]
    qformer = [f"qformer.encoder.layer.0.{s}" for s in (
        "attention.attention.query", "attention.attention.key", "attention.attention.value",
        "attention.output.dense", "crossattention.attention.query",
        "crossattention.attention.key", "crossattention.attention.value",
        "crossattention.output.dense", "intermediate_query.dense", "output_query.dense")]
    if family == "opt":
        language = [f"language_model.model.decoder.layers.{i}.{s}" for i in range(2) for s in (
            "self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
            "fc1", "fc2")]
    else:
        ffn = ("DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")
        attn = ("q", "k", "v", "o")
        language = [f"language_model.encoder.block.0.layer.{s}" for s in (
            *(f"0.SelfAttention.{a}" for a in attn), *(f"1.{f}" for f in ffn))]
        language += [f"language_model.decoder.block.0.layer.{s}" for s in (
            *(f"0.SelfAttention.{a}" for a in attn), *(f"1.EncDecAttention.{a}" for a in attn),
            *(f"2.{f}" for f in ffn))]
    return {"vision": vision, "qformer": qformer, "language": language}


@pytest.fixture(params=FAMILIES)
def setup(request):
    """(family, model, processor, batch) for one language-model family."""
    model, processor = tiny_blip2(request.param)
    batch = Blip2Collator.for_model(model, processor)(ITEMS)
    return request.param, model, processor, batch


def logits(model, batch):
    with torch.no_grad():
        return model(**model_inputs(model, batch)).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_select_exactly_the_intended_linears(family):
    model, _ = tiny_blip2(family)
    want = expected_targets(family)
    for preset, paths in want.items():
        assert select_targets(model, [preset]) == paths, preset
    selected = select_targets(model, list(want))
    assert "language_projection" not in selected and "language_model.lm_head" not in selected
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears - set(selected) == {"language_projection", "language_model.lm_head"}


def test_collator_labels_only_the_targets(setup):
    family, model, processor, batch = setup
    tok = processor.tokenizer
    ids, labels = batch["input_ids"], batch["labels"]
    image_id = model.config.image_token_index
    assert ((ids == image_id).sum(1) == QUERY_TOKENS).all()  # one token per query output
    assert (ids[:, :QUERY_TOKENS] == image_id).all()
    if family == "opt":
        assert labels.shape == ids.shape
        assert not ((labels != -100) & ((ids == image_id) | (batch["attention_mask"] == 0))).any()
    for row, prompt, target in zip(labels, PROMPTS, TARGETS, strict=True):
        # OPT's byte-level BPE: a target after the prompt's space starts with "Ġ" ("Ġred").
        spaced = " " + target if family == "opt" and prompt else target
        want = [*tok(spaced, add_special_tokens=False).input_ids, tok.eos_token_id]
        assert row[row != -100].tolist() == want
    if family == "opt":
        assert tok.convert_ids_to_tokens(labels[0][labels[0] != -100][0].item()) == "Ġred"


def test_forward_uses_the_image(setup):
    _, model, _, batch = setup
    other = {**batch, "pixel_values": batch["pixel_values"].flip(0)}
    assert not torch.allclose(logits(model, batch), logits(model, other))


def test_mismatched_image_token_fails_loudly(setup):
    _, model, processor, _ = setup
    model.config.image_token_index = None  # the transformers default
    with pytest.raises(ValueError, match="image_token_index"):
        Blip2Collator.for_model(model, processor)
    with pytest.raises(ValueError, match="image_token_index"):
        blip2_generate(model, processor, [ITEMS[0][0]], "")


def test_zero_b_adapters_leave_logits_bit_identical(setup):
    _, model, _, batch = setup
    base = logits(model, batch)
    inject_lora(model, ALL)
    assert torch.equal(logits(model, batch), base)


def test_loss_sum_matches_model_loss_and_grads_reach_only_adapters(setup):
    _, model, processor, batch = setup
    inj = inject_lora(model, ALL)
    randomize_adapters(inj)
    total, n = blip2_loss_sum(model, batch)
    assert n == int((batch["labels"] != -100).sum())  # OPT: labels[:, 0] is an image token
    torch.testing.assert_close(total / n, model(**batch).loss, rtol=1e-6, atol=1e-6)
    (total / n).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in inj.parameters())
    # Per-item sums add up to the batch sum: exact accumulation over differently padded batches.
    collate = Blip2Collator.for_model(model, processor)
    with torch.no_grad():
        parts = [blip2_loss_sum(model, collate([item])) for item in ITEMS]
        torch.testing.assert_close(sum(s for s, _ in parts), blip2_loss_sum(model, batch)[0],
                                   rtol=1e-5, atol=1e-5)
    assert sum(k for _, k in parts) == n


def test_generate_returns_only_new_text(setup):
    _, model, processor, _ = setup
    tok = processor.tokenizer
    images = [item[0] for item in ITEMS]
    # Forbid special tokens and the prompt's own tokens: a text holding a prompt word was not
    # cut (test_prompts.py checks the cut for every family against the model's own output).
    prompt_ids = tok(" ".join(PROMPTS), add_special_tokens=False).input_ids
    no_special = dict(min_new_tokens=3, suppress_tokens=tok.all_special_ids + prompt_ids)
    texts = blip2_generate(model, processor, images, PROMPTS, max_new_tokens=3, **no_special)
    assert all(t and "Question" not in t and "Answer" not in t for t in texts)
    one = blip2_generate(model, processor, images[:1], PROMPTS[0], max_new_tokens=3,
                         **no_special)
    assert one == texts[:1]  # left padding does not change the answer


def test_generate_passes_sampling_settings_only_when_sampling(setup, monkeypatch):
    # infer.py always passes top_p and temperature; transformers warns about them (a line every
    # BLIP-2 user would see) unless do_sample is on.
    _, model, processor, _ = setup
    seen = []
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw) or kw["input_ids"])
    for do_sample in (False, True):
        blip2_generate(model, processor, [ITEMS[0][0]], "", max_new_tokens=2,
                       do_sample=do_sample, top_p=0.9, temperature=0.7)
    assert not {"do_sample", "top_p", "temperature"} & set(seen[0])
    assert (seen[1]["do_sample"], seen[1]["top_p"], seen[1]["temperature"]) == (True, 0.9, 0.7)


def test_save_fresh_model_load_bit_identical(setup, tmp_path):
    family, model, _, batch = setup
    inj = inject_lora(model, ALL)
    randomize_adapters(inj)
    want = logits(model, batch)
    path = save_adapter(inj, tmp_path / "blip2.safetensors", base_model=f"tiny-blip2-{family}")
    fresh, _ = tiny_blip2(family)
    load_adapter(fresh, path)
    assert torch.equal(logits(fresh, batch), want)


def test_merged_equals_unmerged_and_unmerge_restores_weights(setup):
    _, model, _, batch = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inj = inject_lora(model, ALL)
    randomize_adapters(inj)
    hooked = logits(model, batch)
    inj.merge(exact_unmerge=True)  # the bit-exact restore below needs the backup
    torch.testing.assert_close(logits(model, batch), hooked, rtol=1e-5, atol=1e-5)
    inj.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gradient_checkpointing_gives_the_same_adapter_grads(setup):
    _, model, _, batch = setup
    inj = inject_lora(model, ALL)
    randomize_adapters(inj)
    model.train()
    calls = []
    layer = next(iter(inj.adapters["default"].layers.values()))  # first vision layer
    layer.register_forward_hook(lambda *_: calls.append(1))

    def grads():
        inj.zero_grad(set_to_none=True)
        calls.clear()
        total, n = blip2_loss_sum(model, batch)
        (total / n).backward()
        return [p.grad.clone() for p in inj.parameters()], len(calls)

    plain, plain_calls = grads()
    # transformers 5.x name; gradient_checkpointing_enable is a deprecated alias (FutureWarning).
    model.activation_checkpointing_enable({"use_reentrant": False})
    checkpointed, ckpt_calls = grads()
    assert ckpt_calls == 2 * plain_calls  # recomputed in backward: checkpointing is on
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_optimizer_holds_only_adapter_parameters(setup):
    _, model, _, batch = setup
    inj = inject_lora(model, ALL)
    randomize_adapters(inj)
    params = inj.adapter_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    held = [p for g in optimizer.param_groups for p in g["params"]]
    base_ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in base_ids for p in held)
    assert sum(p.numel() for p in held) == sum(p.numel() for p in inj.parameters())
    assert sum(p.numel() for p in held) == inj.parameter_counts()[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    total, n = blip2_loss_sum(model, batch)
    (total / n).backward()
    optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_train_py_and_infer_py_on_saved_blip2(tmp_path, family):
    """The same train.py / infer.py run BLIP-2: captioning and prompted VQA, end to end."""
    from conftest import write_tiny_dataset, write_tiny_vqa_dataset

    import infer
    import train

    model, processor = tiny_blip2(family)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    caps = write_tiny_dataset(tmp_path / "c", n=6)
    vqa = write_tiny_vqa_dataset(tmp_path / "v", n=6)
    common = ["--model", str(tmp_path / "m"), "--epochs", "1", "--batch-size", "3",
              "--val-fraction", "0", "--targets", "vision,qformer,language"]
    cap_adapter = train.main([*common, "--train-file", str(caps), "--eval-file", str(caps),
                              "--output-dir", str(tmp_path / "rc")])
    vqa_adapter = train.main([*common, "--task", "vqa", "--train-file", str(vqa),
                              "--eval-file", str(vqa), "--output-dir", str(tmp_path / "rv")])
    image = str(tmp_path / "c/0.png")
    out = infer.main([image, "--adapter", str(cap_adapter), "--max-new-tokens", "3"])
    assert len(out) == 1 and isinstance(out[0]["caption"], str)
    hooked = infer.main([image, "--adapter", str(vqa_adapter), "--question", "is the cube red?",
                         "--max-new-tokens", "3"])
    merged = infer.main([image, "--adapter", str(vqa_adapter), "--merge", "--question",
                         "is the cube red?", "--max-new-tokens", "3"])
    assert hooked == merged and hooked[0]["question"] == "is the cube red?"


@pytest.mark.parametrize("task_name", ["caption", "vqa"])
def test_task_counts_the_tokens_its_loss_averages(setup, task_name):
    # train.py divides each window by task.count_targets before any forward: it must count the
    # tokens the loss averages over (T5's labels are unshifted, OPT's shifted).
    from models.tasks import make_task

    _, model, processor, _ = setup
    task = make_task(model, processor, task_name)
    image = ITEMS[0][0]
    items = ([(image, "a red cube"), (image, "no block")] if task_name == "caption"
             else [(image, "what colour?", "red"), (image, "is it red?", "yes")])
    batch = task.collate(items)
    loss_sum, _ = task.loss_sum(model, batch, 0.0)
    # transformers' own loss (its own shift and ignore mask) is the mean over the targets it
    # counts: our sum over our count must equal it.
    with torch.no_grad():
        hf_mean = model(**model_inputs(model, batch), labels=batch["labels"]).loss
    n = task.count_targets(batch)
    assert n > 0
    torch.testing.assert_close(loss_sum.detach() / n, hf_mean, rtol=1e-5, atol=0)
