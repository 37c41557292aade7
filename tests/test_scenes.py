"""Scene renderer, committed cube dataset and tiny_blip tokenizer: fast checks (no model runs)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from data.make_dataset import HELDOUT_PAIRS, TRAIN_PAIRS, sample_stacks
from data.scenes import (
    COLOURS,
    RELATIONS,
    SHAPES,
    STACK_PAIRS,
    cube_caption,
    render_cube_scene,
    render_shape_scene,
    sample_shape_scene,
    shape_caption,
)

ROOT = Path(__file__).resolve().parents[1]
COLOUR = "(?:" + "|".join(COLOURS) + ")"
SHAPE = "(?:" + "|".join(SHAPES) + ")"
ART = "(?:a|an)"
CUBE_RE = re.compile(
    rf"no block is present in the image|a single {COLOUR} cube"
    rf"|{ART} ({COLOUR}) cube stacked on {ART} ({COLOUR}) cube"
)
SHAPE_RE = re.compile(
    rf"an empty canvas|a lone {COLOUR} {SHAPE}"
    rf"|{ART} {COLOUR} {SHAPE} (?:{'|'.join(RELATIONS)}) {ART} {COLOUR} {SHAPE}"
)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_renderers_are_deterministic():
    for seed in range(3):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        for stack in [(), ("red",), ("blue", "green")]:
            im_a, im_b = render_cube_scene(stack, a, size=64), render_cube_scene(stack, b, size=64)
            assert im_a.size == (64, 64) and im_a.mode == "RGB"
            assert np.array_equal(np.asarray(im_a), np.asarray(im_b))
        scene_a, scene_b = sample_shape_scene(a), sample_shape_scene(b)
        assert scene_a == scene_b
        assert np.array_equal(np.asarray(render_shape_scene(*scene_a, a)),
                              np.asarray(render_shape_scene(*scene_b, b)))


def test_different_seeds_give_different_pixels():
    ims = [np.asarray(render_cube_scene(("red",), np.random.default_rng(s))) for s in (0, 1)]
    assert not np.array_equal(*ims)


def test_cube_caption_grammar():
    assert cube_caption(()) == "no block is present in the image"
    assert cube_caption(("red",)) == "a single red cube"
    assert cube_caption(("blue", "green")) == "a blue cube stacked on a green cube"
    assert cube_caption(("orange", "red")) == "an orange cube stacked on a red cube"
    for top, bottom in STACK_PAIRS:
        m = CUBE_RE.fullmatch(cube_caption((top, bottom)))
        assert m and m.groups() == (top, bottom)  # top colour comes first
    with pytest.raises(ValueError):
        cube_caption(("red", "green", "blue"))


def test_shape_caption_grammar_and_vocabulary():
    assert shape_caption((), None) == "an empty canvas"
    assert shape_caption((("triangle", "purple"),), None) == "a lone purple triangle"
    assert (shape_caption((("circle", "red"), ("square", "green")), "left of")
            == "a red circle left of a green square")
    rng = np.random.default_rng(0)
    captions = {shape_caption(*sample_shape_scene(rng)) for _ in range(2000)}
    forbidden = {"cube", "stacked", "single", "block", "present", "image", "no", "is"}
    for c in captions:
        assert SHAPE_RE.fullmatch(c), c
        assert not forbidden & set(c.split()), c
    # every (top, bottom) colour pair appears as two touching squares in pretraining captions
    for top, bottom in STACK_PAIRS:
        assert (f"{'an' if top == 'orange' else 'a'} {top} square above "
                f"{'an' if bottom == 'orange' else 'a'} {bottom} square") in captions


def test_heldout_pairs_cover_every_colour():
    assert len(HELDOUT_PAIRS) == 6 and set(HELDOUT_PAIRS) <= set(STACK_PAIRS)
    assert {t for t, _ in TRAIN_PAIRS} == set(COLOURS) == {b for _, b in TRAIN_PAIRS}
    assert len(sample_stacks(400, TRAIN_PAIRS, np.random.default_rng(0))) == 400


def test_committed_dataset_keeps_heldout_pairs_out_of_train():
    train = _read_jsonl(ROOT / "annotations.jsonl")
    test = _read_jsonl(ROOT / "annotations_test.jsonl")
    heldout_captions = {cube_caption(p) for p in HELDOUT_PAIRS}
    train_captions = {r["text"] for r in train}
    assert not heldout_captions & train_captions
    for r in train + test:
        assert CUBE_RE.fullmatch(r["text"]), r
        assert (ROOT / r["image"]).is_file(), r
    splits = {r["split"] for r in test}
    assert splits == {"normal", "heldout_pairs"}
    for r in test:
        if r["split"] == "normal":
            assert r["text"] in train_captions
        else:
            assert r["text"] in heldout_captions


def test_tiny_blip_tokenizer_round_trips_cube_captions():
    model_dir = ROOT / "models" / "tiny_blip"
    if not (model_dir / "vocab.txt").is_file():
        pytest.skip("models/tiny_blip not generated (python -m models.pretrain_tiny_blip)")
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(model_dir)
    assert len(tok) == len((model_dir / "vocab.txt").read_text().splitlines())
    for text in ["a blue cube stacked on a green cube", "no block is present in the image",
                 "an orange cube stacked on a red cube", "a single purple cube",
                 "there is a picture of one block on the table"]:
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids, text
        # whole words only: every word is one token, so the LoRA target is a short sequence
        assert len(ids) == len(text.split()) + 2, tok.convert_ids_to_tokens(ids)
        assert tok.decode(ids, skip_special_tokens=True) == text
