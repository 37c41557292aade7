"""Rank-based VQA decoding over an answer list (BLIP's rank_answer): checked against a
brute-force log-likelihood of every candidate from transformers' own loss; --answer-list in
infer.py and eval.py; answer-list files and their errors."""

import json
from pathlib import Path

import pytest
import torch
from conftest import COLOURS
from PIL import Image

import eval as eval_py
import infer
from data.answer_list import read_answer_list
from data.errors import DataFormatError
from models.answer_ranking import rank_vqa, tokenize_candidates
from models.blip_vqa import VQACollator
from models.loading import load_model
from training.errors import RunError

ROOT = Path(__file__).resolve().parents[1]
TINY_VQA = ROOT / "models" / "tiny_blip_vqa"
# Multi-word answers first: they tie on the first token with a shorter one later in the list.
CANDIDATES = ["red and blue", "blue and red", "two blue cubes", "a red cube", "no", "yes", "two",
              "zero", "one", "red", "blue", "green", "yellow"]
QUESTIONS = [("image_test/00000.png", "how many cubes are there?"),
             ("image_test/00001.png", "what colour is the top cube?"),
             ("image_test/00001.png", "is there a purple cube?"),
             ("image_test/00002.png", "what colour is the bottom cube?")]


@pytest.fixture(scope="module")
def tiny():
    model, processor, _ = load_model(str(TINY_VQA))
    return model, processor


def brute_force(model, processor, image, question, answer) -> tuple[float, float]:
    """(log p(answer), log p(its first token)) from transformers' own mean-token loss, one
    (image, question, answer) at a time: -loss x the number of tokens scored."""
    ids = processor.tokenizer(answer, return_tensors="pt").input_ids  # [CLS] ... [SEP]
    ids[:, 0] = model.config.text_config.bos_token_id
    enc = processor(images=[image], text=[question], return_tensors="pt")
    with torch.no_grad():
        def loss(seq):
            return model(pixel_values=enc["pixel_values"], input_ids=enc["input_ids"],
                         attention_mask=enc["attention_mask"], decoder_input_ids=seq,
                         labels=seq).loss.item()
        return -loss(ids) * (ids.shape[1] - 1), -loss(ids[:, :2])


@pytest.fixture(scope="module")
def tables(tiny):
    """Per question, the brute-force (sequence, first-token) log-likelihoods of CANDIDATES."""
    model, processor = tiny
    images = [Image.open(ROOT / p).convert("RGB") for p, _ in QUESTIONS]
    return images, [[brute_force(model, processor, img, q, c) for c in CANDIDATES]
                    for img, (_, q) in zip(images, QUESTIONS, strict=True)]


def expected_answer(scores: list[tuple[float, float]], k: int) -> str:
    """BLIP's rule written out: the k best first-token log-probabilities (ties in list order),
    then the best sequence log-likelihood among them."""
    kept = sorted(range(len(scores)), key=lambda i: (-round(scores[i][1], 4), i))[:k]
    return CANDIDATES[max(kept, key=lambda i: scores[i][0])]


@pytest.mark.parametrize("k", [len(CANDIDATES), 100, 3, 1])
def test_ranking_equals_the_brute_force_rule(tiny, tables, k):
    model, processor = tiny
    images, scores = tables
    if k >= len(CANDIDATES):  # the whole list: the exact argmax of the log-likelihood
        argmax = [CANDIDATES[max(range(len(s)), key=lambda i: s[i][0])] for s in scores]
        assert [expected_answer(s, k) for s in scores] == argmax
    candidates = tokenize_candidates(
        VQACollator(processor, model.config.text_config.bos_token_id, 40), CANDIDATES)
    got = rank_vqa(model, processor, images, [q for _, q in QUESTIONS], candidates, top_k=k)
    assert got == [expected_answer(s, k) for s in scores]


def test_the_brute_force_rule_is_not_trivial_here(tables):
    # The tables behind the test above: the full-list winners are clear, and k changes answers.
    _, scores = tables
    for s in scores:
        best = sorted(x[0] for x in s)
        assert best[-1] - best[-2] > 1e-3
    answers = {k: [expected_answer(s, k) for s in scores] for k in (1, len(CANDIDATES))}
    assert len(set(answers[len(CANDIDATES)])) > 1
    assert answers[1] != answers[len(CANDIDATES)]


def _vqa_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (32, 32), COLOURS[colour]).save(folder / f"{i}.png")
        lines += [json.dumps({"image": f"{i}.png", "question": "what colour is the cube?",
                              "answer": colour}),
                  json.dumps({"image": f"{i}.png", "question": "how many cubes are there?",
                              "answer": "one"})]
    (folder / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "vqa.jsonl"


def test_eval_with_an_answer_list_answers_only_from_it(tmp_path, monkeypatch):
    data = _vqa_file(tmp_path / "d")
    answers = tmp_path / "answers.txt"
    answers.write_text("zebra\nred\n\n  blue  \nred\none\n")  # blank and repeated lines
    seen = {}
    real = eval_py.score

    def spy(task_name, units, preds):
        seen["preds"] = preds
        return real(task_name, units, preds)
    monkeypatch.setattr(eval_py, "score", spy)
    out = tmp_path / "eval"
    eval_py.main(["--model", str(TINY_VQA), "--eval-file", str(data), "--answer-list",
                  str(answers), "--answer-top-k", "2", "--out-dir", str(out), "--no-report",
                  "--threads", "1"])
    assert len(seen["preds"]) == 6 and set(seen["preds"]) <= {"zebra", "red", "blue", "one"}
    record = json.loads((out / "eval.json").read_text())
    assert (record["answer_list"], record["answer_top_k"]) == (str(answers), 2)


def test_infer_ranks_from_the_list_and_refuses_captioning(tmp_path):
    image = str(ROOT / "image_test/00001.png")
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(CANDIDATES))
    out = infer.main([image, "--model", str(TINY_VQA), "--question", "what colour is the top "
                      "cube?", "--question", "how many cubes are there?", "--answer-list",
                      str(answers), "--threads", "1"])
    assert len(out) == 2 and all(r["answer"] in CANDIDATES for r in out)
    with pytest.raises(RunError, match="ranks BLIP VQA answers; this is blip caption"):
        infer.main([image, "--model", str(ROOT / "models/tiny_blip"), "--answer-list",
                    str(answers), "--threads", "1"])
    with pytest.raises(SystemExit) as stop:
        infer.parse_args([image, "--answer-top-k", "0"])
    assert stop.value.code == 2


def test_answer_list_files(tmp_path):
    as_json = tmp_path / "a.json"
    as_json.write_text(json.dumps(["yes", " no ", "yes", "two cubes"]))
    assert read_answer_list(as_json) == ["yes", "no", "two cubes"]
    lines = tmp_path / "a.txt"
    lines.write_text("\ufeffyes\n\nno\r\n two cubes \n")
    assert read_answer_list(lines) == ["yes", "no", "two cubes"]


@pytest.mark.parametrize(("name", "text", "message"), [
    ("a.json", '["yes",\n "no"', r"a.json:2: not valid JSON"),
    ("a.json", '{"answers": ["yes"]}', r"a.json: expected a JSON list of answer strings, got dict"),
    ("a.json", '["yes", 3]', r"a.json\[1\]: answers must be strings, got 3"),
    ("a.json", '["yes", "  "]', r"a.json\[1\]: empty answer"),
    ("a.json", "[]", r"answer list .*a.json: no answers"),
    ("a.txt", "\n  \n", r"answer list .*a.txt: no answers"),
])
def test_bad_answer_list_files_say_where(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataFormatError, match=message):
        read_answer_list(path)


def test_missing_answer_list_is_one_line_before_any_prediction(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        infer.main([str(ROOT / "image_test/00000.png"), "--model", str(TINY_VQA), "--question",
                    "how many?", "--answer-list", str(tmp_path / "nope.txt"), "--threads", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"infer.py: error: answer list {tmp_path / 'nope.txt'}: no such file"
    assert "Traceback" not in "\n".join(err)
