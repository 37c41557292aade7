"""A user's own checkpoint, per family, end to end through the command-line tools.

Each family's checkpoint has the real configuration shape (shrunk) and the real tokenizer type
(WordPiece with [DEC] as bos, byte-level BPE for OPT, Unigram for T5), saved with
save_pretrained. train.py runs 2 steps with its default targets, infer.py uses the adapter,
export.py merges it, and plain transformers reloads the export with the hooked model's logits.
"""

import json

import pytest
import torch
from conftest import write_tiny_dataset, write_tiny_vqa_dataset
from real_tokenizers import FAMILIES, write_real_checkpoint
from safetensors import safe_open
from transformers import AutoConfig, AutoProcessor

import export
import infer
import train
from lora import load_adapter
from models.blip_vqa import answer_logits
from models.loading import ARCHITECTURES, load_model

TASK = {"blip-caption": "caption", "blip-vqa": "vqa", "blip2-opt": "caption", "blip2-t5": "caption"}


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory):
    """(family, checkpoint dir, data file, adapter) after 2 steps of train.py's defaults."""
    family, root = request.param, tmp_path_factory.mktemp(request.param)
    model_dir = write_real_checkpoint(root / "model", family)
    data = (write_tiny_vqa_dataset if TASK[family] == "vqa" else write_tiny_dataset)(
        root / "data", n=6)
    adapter = train.main(["--model", str(model_dir), "--train-file", str(data),
                          "--eval-file", "none", "--val-fraction", "0", "--batch-size", "3",
                          "--stop-after-steps", "2", "--lr", "1e-2", "--threads", "1",
                          "--output-dir", str(root / "run")])
    return family, model_dir, data, adapter


def test_train_with_default_targets_stores_the_resolved_ones(trained):
    family, _, _, adapter = trained
    with safe_open(str(adapter), "pt") as f:
        config = json.loads(f.metadata()["config"])
        b = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_B.weight")]  # noqa: SIM118
    expected = ["vision", "text"] if family.startswith("blip-") else ["qformer", "language"]
    assert config["targets"] == expected
    assert b and any(t.abs().sum() > 0 for t in b)  # 2 steps at lr 1e-2 moved B off zero


def test_infer_with_the_adapter_answers_every_image(trained):
    family, _, data, adapter = trained
    images = sorted(str(p) for p in data.parent.glob("*.png"))[:2]
    question = ["--question", "what colour is the cube?"] if TASK[family] == "vqa" else []
    results = infer.main([*images, "--adapter", str(adapter), "--max-new-tokens", "4",
                          *question])
    assert [r["image"] for r in results] == images
    assert all(isinstance(r.get("answer", r.get("caption")), str) for r in results)


def test_export_reloads_in_plain_transformers_with_the_hooked_logits(trained, tmp_path):
    family, model_dir, _, adapter = trained
    out = tmp_path / "merged"
    export.main(["--adapter", str(adapter), "--model", str(model_dir), "--out", str(out),
                 "--threads", "1"])
    arch = AutoConfig.from_pretrained(out).architectures[0]
    merged = ARCHITECTURES[arch][0].from_pretrained(out).eval()  # transformers only
    processor = AutoProcessor.from_pretrained(out)
    hooked, _, _ = load_model(str(model_dir), TASK[family])
    load_adapter(hooked, adapter)
    inputs = _inputs(family, processor)
    with torch.no_grad():
        torch.testing.assert_close(_logits(merged, inputs), _logits(hooked, inputs),
                                   rtol=0, atol=1e-5)


def _inputs(family: str, processor) -> dict[str, torch.Tensor]:
    from PIL import Image

    image = Image.new("RGB", (32, 32), (200, 40, 40))
    text = "Question: what colour? Answer: red" if family.startswith("blip2") else "a red cube"
    inputs = dict(processor(images=[image], text=[text], return_tensors="pt"))
    if family == "blip-vqa":  # teacher-forced answer "red cube"
        inputs["answer_ids"] = processor.tokenizer(["red cube"], return_tensors="pt").input_ids
        inputs["answer_mask"] = torch.ones_like(inputs["answer_ids"])
    if family == "blip2-t5":
        inputs["decoder_input_ids"] = processor.tokenizer(["red"], return_tensors="pt").input_ids
    return inputs


def _logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if "answer_ids" in inputs:  # BLIP VQA's forward returns no logits: its decoder's, directly
        return answer_logits(model, inputs)
    return model(**inputs).logits
