"""Tests for evaluation/vqa_metrics.py: official normalisation rules and leave-one-out accuracy."""

from __future__ import annotations

import pytest

from evaluation.vqa_metrics import (
    CONTRACTIONS,
    normalize_answer,
    token_f1,
    vqa_accuracy,
    vqa_scores,
)


@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"),                 # lower-case, then number word → digit
    ("none", "0"),
    ("ten", "10"),
    ("the dog.", "dog"),          # period not before a digit dropped; article dropped
    ("A cat", "cat"),
    ("dont", "don't"),            # contractions table
    ("yes!", "yes"),              # "!" touches no space → becomes a space → split away
    ("1,000", "1000"),            # digit,digit anywhere → punctuation deleted: one number stays
    ("3.5", "3.5"),               # period before a digit kept
    ("t-shirt", "t shirt"),       # "-" touches no space → replaced by a space
    ("red - blue", "red blue"),   # "-" touches a space → deleted
    ("yes, it is", "yes it is"),
    ("  red\tcube\n", "red cube"),
    ("Im", "im"),                 # the table's capitalised keys never match after lower-casing
])
def test_normalize_answer_follows_vqaeval(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_contractions_table_is_complete() -> None:
    # vqaEval.py's table has 120 entries; spot-check both ends and its odd "somebody'd" entry
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["aint"] == "ain't" and CONTRACTIONS["youve"] == "you've"
    assert CONTRACTIONS["somebody'd"] == "somebodyd"


def test_vqa_accuracy_two_of_ten() -> None:
    # 10 answers, 2 say "2". Leave each answer out in turn:
    #   out = one of the 2 matches (2 subsets): 1 match left  → min(1, 1/3) = 1/3
    #   out = a non-match          (8 subsets): 2 matches left → min(1, 2/3) = 2/3
    #   mean = (2 · 1/3 + 8 · 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
    answers = ["2", "2"] + ["3"] * 8
    assert vqa_accuracy("two", answers) == pytest.approx(0.6)


@pytest.mark.parametrize("matches, expected", [
    (0, 0.0),
    (1, 0.3),   # 1 subset with 0 left, 9 with 1 left: 9 · 1/3 / 10
    (3, 0.9),   # 3 subsets with 2 left (2/3), 7 with 3 left (1): (2 + 7) / 10
    (4, 1.0),   # every subset keeps at least 3 matches
    (10, 1.0),
])
def test_vqa_accuracy_ten_answers(matches: int, expected: float) -> None:
    answers = ["yes"] * matches + ["no"] * (10 - matches)
    assert vqa_accuracy("yes", answers) == pytest.approx(expected)


def test_vqa_accuracy_with_fewer_answers() -> None:
    # 2 answers, both "yes": each of the 2 leave-one-out subsets has 1 match → 1/3
    assert vqa_accuracy("yes", ["yes", "yes"]) == pytest.approx(1 / 3)
    # 1 answer: its only leave-one-out subset is empty → 0 by construction
    assert vqa_accuracy("yes", ["yes"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_reference_processing_default_vs_official() -> None:
    # raw references are normalised here, so "Two" (raw) matches a predicted "2"
    assert vqa_accuracy("2", ["Two"] * 10) == 1.0
    # vqaEval.py leaves identical references untouched: "t-shirt" ≠ normalised "t shirt"
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10, official_reference_processing=True) == 0.0
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 1.0
    # ...and only punctuation-processes them when they disagree ("Two" stays "Two")
    assert vqa_accuracy("two", ["Two"] * 5 + ["2."] * 5, official_reference_processing=True) == 1.0


def test_token_f1() -> None:
    # "red cube" vs "a red ball" → "red ball": 1 common token, P = 1/2, R = 1/2 → F1 = 1/2;
    # the best reference wins
    assert token_f1("red cube", ["a red ball", "blue"]) == pytest.approx(0.5)
    assert token_f1("The red cube.", ["red cube"]) == 1.0
    assert token_f1("", ["red"]) == 0.0
    assert token_f1("a", ["the"]) == 1.0  # both normalise to "" (articles only)


def test_vqa_scores() -> None:
    preds = ["Two", "yes!", "red cube"]
    answers = [["2"] * 10, ["no"] * 10, ["red"] * 3 + ["blue"] * 7]
    scores = vqa_scores(preds, answers)
    # acc: "2" in all 10 → 1; "yes" in none → 0; "red cube" equals neither "red" nor "blue" → 0
    assert scores["VQA-acc"] == pytest.approx(1 / 3)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    # F1: 1, 0, and "red cube" vs "red": P = 1/2, R = 1 → 2/3
    assert scores["token_F1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    with pytest.raises(ValueError):
        vqa_scores(["a"], [])
    # One reference answer: VQA accuracy is undefined (its leave-one-out mean is always 0).
    assert set(vqa_scores(["red"], [["red"]])) == {"exact_match", "token_F1"}
