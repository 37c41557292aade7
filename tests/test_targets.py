"""``--targets auto``: one preset set per model family, resolved before it is stored."""

import json

import pytest
from blip2_tiny import tiny_blip2
from conftest import tiny_blip, tiny_blip_vqa, write_tiny_dataset
from safetensors import safe_open
from torch import nn

from lora import LoRAConfig, inject_lora, save_adapter, select_targets
from lora.targets import resolve_targets

VISION = ("self_attn.qkv", "self_attn.projection", "mlp.fc1", "mlp.fc2")
BERT = ("attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "crossattention.self.query", "crossattention.self.key",
        "crossattention.self.value", "crossattention.output.dense", "intermediate.dense",
        "output.dense")
QFORMER = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
           "attention.output.dense", "crossattention.attention.query",
           "crossattention.attention.key", "crossattention.attention.value",
           "crossattention.output.dense", "intermediate_query.dense", "output_query.dense")
OPT = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1",
       "fc2")
T5_ATTN = ("q", "k", "v", "o")
T5_FFN = ("DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")


def per_layer(prefix, layers, suffixes):
    return [f"{prefix}.{i}.{s}" for i in range(layers) for s in suffixes]


# What auto selects in each tiny model, in module order (all 2-layer except T5's 1+1 blocks).
EXPECTED = {
    "blip": per_layer("vision_model.encoder.layers", 2, VISION)
    + per_layer("text_decoder.bert.encoder.layer", 2, BERT),
    # VQA: the question encoder and the answer decoder both get adapters.
    "blip_vqa": per_layer("vision_model.encoder.layers", 2, VISION)
    + per_layer("text_encoder.encoder.layer", 2, BERT)
    + per_layer("text_decoder.bert.encoder.layer", 2, BERT),
    # BLIP-2: Q-Former and language model; no ViT, no language_projection, no lm_head.
    "opt": per_layer("qformer.encoder.layer", 1, QFORMER)
    + per_layer("language_model.model.decoder.layers", 2, OPT),
    "t5": per_layer("qformer.encoder.layer", 1, QFORMER)
    + [f"language_model.encoder.block.0.layer.0.SelfAttention.{a}" for a in T5_ATTN]
    + [f"language_model.encoder.block.0.layer.1.{f}" for f in T5_FFN]
    + [f"language_model.decoder.block.0.layer.0.SelfAttention.{a}" for a in T5_ATTN]
    + [f"language_model.decoder.block.0.layer.1.EncDecAttention.{a}" for a in T5_ATTN]
    + [f"language_model.decoder.block.0.layer.2.{f}" for f in T5_FFN],
}
MODELS = {"blip": tiny_blip, "blip_vqa": tiny_blip_vqa,
          "opt": lambda: tiny_blip2("opt")[0], "t5": lambda: tiny_blip2("t5")[0]}
PRESETS_OF = {"blip": ("vision", "text"), "blip_vqa": ("vision", "text"),
              "opt": ("qformer", "language"), "t5": ("qformer", "language")}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_auto_selects_the_family_preset_set(family):
    model = MODELS[family]()
    assert resolve_targets(model, ["auto"]) == PRESETS_OF[family]
    assert select_targets(model, ["auto"]) == EXPECTED[family]


def test_auto_combines_with_other_targets_without_duplicates():
    model = tiny_blip2("opt")[0]
    assert resolve_targets(model, ["auto", "vision", "qformer"]) == ("qformer", "language",
                                                                     "vision")


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_saved_adapter_stores_the_resolved_presets_not_auto(family, tmp_path):
    model = MODELS[family]()
    path = save_adapter(inject_lora(model, LoRAConfig(r=2, alpha=4)), tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    assert config["targets"] == ["qformer", "language"]


@pytest.mark.parametrize(("family", "missing", "present"), [
    ("opt", "text", "vision, qformer, language"),
    ("blip", "qformer", "vision, text"),
    ("blip_vqa", "language", "vision, text"),
])
def test_unmatched_target_names_the_presets_that_match_here(family, missing, present):
    with pytest.raises(ValueError) as e:
        select_targets(MODELS[family](), [missing])
    message = str(e.value)
    assert f"presets that match here: {present}" in message
    assert f"auto = {', '.join(PRESETS_OF[family])}" in message
    assert "self_attn" in message or "attention.self.query" in message  # candidates still listed


def test_auto_on_an_unknown_architecture_says_so():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError) as e:
        resolve_targets(model, ["auto"])
    assert "no preset set for Sequential" in str(e.value)
    assert "presets that match here: none" in str(e.value)


def test_train_py_on_blip2_dir_without_targets(tmp_path, caplog):
    """The first command a BLIP-2 user types: no --targets; the choice is printed and stored."""
    import train

    model, processor = tiny_blip2("opt")
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    data = write_tiny_dataset(tmp_path / "c", n=6)
    caplog.set_level("INFO", logger="train")
    adapter = train.main(["--model", str(tmp_path / "m"), "--epochs", "1", "--batch-size", "3",
                          "--val-fraction", "0", "--train-file", str(data), "--eval-file",
                          str(data), "--output-dir", str(tmp_path / "run"), "--no-eval-base"])
    lines = [r.getMessage() for r in caplog.records if "LoRA targets" in r.getMessage()]
    assert lines == ["LoRA targets: auto (BLIP-2 OPT) → qformer, language: 22 Linear layers"]
    with safe_open(str(adapter), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["targets"] == ["qformer", "language"]
    assert len(json.loads(meta["modules"])) == 22
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert run_config["targets"] == "qformer,language" and run_config["total_steps"] == 2
