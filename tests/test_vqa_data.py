"""Shipped cube VQA set (vqa_train.jsonl / vqa_test.jsonl): deterministic generator, answers that
agree with the image's caption, loadable files, and no [UNK] under the tiny_blip_vqa tokenizer."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data.make_vqa_dataset import stack_of
from data.scenes import COLOURS, cube_caption
from data.vqa_formats import load_vqa_samples

ROOT = Path(__file__).resolve().parents[1]
FILES = {"vqa_train.jsonl": "annotations.jsonl", "vqa_test.jsonl": "annotations_test.jsonl"}
MODEL = ROOT / "models" / "tiny_blip_vqa"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _scene(caption: str) -> dict:
    """Count and top-first colours of a cube caption, parsed independently of the generator."""
    if caption == "no block is present in the image":
        return {"count": 0, "colours": []}
    words = caption.split()
    colours = [w for w in words if w in COLOURS]
    assert len(colours) == (2 if "stacked" in words else 1), caption
    return {"count": len(colours), "colours": colours}


def _expected(question: str, scene: dict) -> str | None:
    """The answer a question has on a scene, or None if the question is undefined there."""
    colours, n = scene["colours"], scene["count"]
    if question == "how many cubes are there?":
        return ["zero", "one", "two"][n]
    if m := re.fullmatch(r"is there an? (\w+) cube\?", question):
        assert m[1] in COLOURS
        assert question.startswith("is there an " if m[1][0] in "aeiou" else "is there a ")
        return "yes" if m[1] in colours else "no"
    position = {"what colour is the cube?": (1, 0), "what colour is the top cube?": (2, 0),
                "what colour is the bottom cube?": (2, 1)}
    if question in position:
        need, index = position[question]
        return colours[index] if n == need else None
    raise AssertionError(f"unexpected question {question!r}")


def test_generator_is_deterministic(tmp_path):
    for src in FILES.values():
        (tmp_path / src).write_bytes((ROOT / src).read_bytes())
    cmd = [sys.executable, "-m", "data.make_vqa_dataset", "--seed", "0",
           "--captions-dir", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    for dst in FILES:  # the committed files are what seed 0 writes, byte for byte
        assert (tmp_path / dst).read_bytes() == (ROOT / dst).read_bytes(), dst


@pytest.mark.parametrize("name", sorted(FILES))
def test_answers_agree_with_captions(name):
    captions = {r["image"]: r for r in _read_jsonl(ROOT / FILES[name])}
    rows = _read_jsonl(ROOT / name)
    per_image: dict[str, int] = {}
    for r in rows:
        caption = captions[r["image"]]
        assert r.get("split") == caption.get("split")
        assert r["answer"] == _expected(r["question"], _scene(caption["text"])), r
        per_image[r["image"]] = per_image.get(r["image"], 0) + 1
    assert set(per_image) == set(captions)  # every image is asked about
    assert all(2 <= k <= 3 for k in per_image.values())
    answers = [r["answer"] for r in rows]
    assert {"yes", "no", "zero", "one", "two"} <= set(answers)  # every answer type occurs


def test_stack_of_inverts_cube_caption():
    for stack in [(), ("orange",), ("red", "blue"), ("orange", "yellow"), ("blue", "orange")]:
        assert stack_of(cube_caption(stack)) == stack
    with pytest.raises(ValueError):
        stack_of("a red square above a blue square")


@pytest.mark.parametrize("name", sorted(FILES))
def test_files_load(name):
    samples, _ = load_vqa_samples(ROOT / name, check_images=False)
    assert len(samples) == len(_read_jsonl(ROOT / name))
    assert all(s.image.is_file() for s in samples)
    if name == "vqa_test.jsonl":
        assert {s.split for s in samples} == {"normal", "heldout_pairs"}


@pytest.mark.skipif(not (MODEL / "vocab.txt").is_file(), reason="models/tiny_blip_vqa not built")
def test_tiny_blip_vqa_tokenizer_has_no_unk():
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(MODEL))
    texts = {t for name in FILES for r in _read_jsonl(ROOT / name)
             for t in (r["question"], r["answer"])}
    unk = [t for t in sorted(texts) if tok.unk_token_id in tok(t)["input_ids"]]
    assert not unk, unk
    # whole words only: no word falls apart into characters (short, learnable answer targets)
    pieces = [t for t in sorted(texts) if any(p.startswith("##") for p in tok.tokenize(t))]
    assert not pieces, pieces
