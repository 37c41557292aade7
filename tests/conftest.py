"""Tiny random-init BLIP models built from configs: no downloads, milliseconds per forward."""

from __future__ import annotations

import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering

VOCAB = 64


def tiny_blip_config(hidden: int = 32, layers: int = 2, vocab: int = VOCAB,
                     vision_hidden: int | None = None) -> BlipConfig:
    """A 2+2-layer BLIP with init scale 1/sqrt(hidden) (the vision default of 1e-10 is ~zero).

    The vision tower is wider than the text model by default, so cross-attention key/value
    Linears have other shapes than the self-attention ones (as in BLIP-large)."""
    init = hidden**-0.5
    vision_hidden = vision_hidden or hidden + 16
    text = dict(vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=vision_hidden,
                intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=1, sep_token_id=2, eos_token_id=2,
                pad_token_id=0, initializer_range=init)
    vision = dict(hidden_size=vision_hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=2, image_size=32, patch_size=8, initializer_range=init)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=16,
                      initializer_range=init)


def tiny_blip(seed: int = 0, **kw) -> BlipForConditionalGeneration:
    """A seeded tiny captioning BLIP in eval mode."""
    torch.manual_seed(seed)
    return BlipForConditionalGeneration(tiny_blip_config(**kw)).eval()


def tiny_blip_vqa(seed: int = 0, hidden: int = 32, **kw) -> BlipForQuestionAnswering:
    """A seeded tiny VQA BLIP in eval mode. Its answer decoder cross-attends to the question
    encoder, so both towers share one width (as in every real BLIP VQA checkpoint)."""
    torch.manual_seed(seed)
    config = tiny_blip_config(hidden=hidden, vision_hidden=hidden, **kw)
    return BlipForQuestionAnswering(config).eval()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run 10-30x faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model() -> BlipForConditionalGeneration:
    return tiny_blip()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    ids[:, 0] = 1
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "input_ids": ids,
            "labels": ids.clone()}


def randomize_adapters(injection, seed: int = 0, std: float = 0.05) -> None:
    """Give every B (and A) random values so deltas are non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in injection.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


WORDS = ["a", "red", "green", "blue", "cube", "on", "single", "no", "block", "picture", "of",
         "what", "colour", "is", "the", "?", "yes"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_tiny_model_dir(path, seed: int = 0, vqa: bool = False):
    """A tiny random BLIP (captioning, or VQA) saved like a hub checkpoint: config, weights,
    tokenizer, processor."""
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    path.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]", *letters,
             *("##" + c for c in letters), *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(path))
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    processor.save_pretrained(str(path))
    (tiny_blip_vqa if vqa else tiny_blip)(seed, vocab=len(vocab)).save_pretrained(str(path))
    return path


def write_tiny_dataset(folder, n: int = 12, split: str | None = None, name="data.jsonl"):
    """n solid-colour PNGs captioned by colour, as a JSONL file."""
    import json

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        Image.new("RGB", (32, 32), COLOURS[colour]).save(folder / f"{i}.png")
        record = {"image": f"{i}.png", "text": f"a {colour} cube"}
        if split:
            record["split"] = split
        lines.append(json.dumps(record))
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


def write_tiny_vqa_dataset(folder, n: int = 12, name="vqa.jsonl"):
    """n solid-colour PNGs with a colour question each, as a VQA JSONL file."""
    import json

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        Image.new("RGB", (32, 32), COLOURS[colour]).save(folder / f"{i}.png")
        question = "what colour is the cube?" if i % 2 else "is the cube red?"
        answer = colour if i % 2 else ("yes" if colour == "red" else "no")
        lines.append(json.dumps({"image": f"{i}.png", "question": question, "answer": answer}))
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name
