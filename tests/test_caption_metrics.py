"""Tests for evaluation/caption_metrics.py: hand-computed BLEU, ROUGE-1/2/L, CIDEr-D, the optional
METEOR (absent without the toolkit; checked against its jar where it can run) and edge cases."""

from __future__ import annotations

import logging
import math

import pytest

from evaluation import caption_metrics
from evaluation.caption_metrics import (
    METEOR_HINT,
    caption_scores,
    cider_d,
    corpus_bleu,
    exact_match,
    meteor_available,
    ptb_tokenize,
    rouge_l,
    rouge_n,
)


def toks(*captions: str) -> list[list[str]]:
    return [c.split() for c in captions]


# ---- tokenisation ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, tokens", [
    ("A Dog.", ["a", "dog"]),                                    # lower-case, "." dropped
    ("Hello, world! Yes? No; maybe: ok...", ["hello", "world", "yes", "no", "maybe", "ok"]),
    ("The dog's ball", ["the", "dog", "'s", "ball"]),            # possessive clitic split
    ("It can't, won't, don't", ["it", "ca", "n't", "wo", "n't", "do", "n't"]),
    ("the dogs' toys", ["the", "dogs", "toys"]),                 # bare "'" is in PUNCTUATIONS
    ('a "big" dog', ["a", "big", "dog"]),                        # quotes → `` '' → dropped
    ("1,000 cubes at 3.5 m", ["1,000", "cubes", "at", "3.5", "m"]),
    ("a t-shirt - red -- blue", ["a", "t-shirt", "red", "blue"]),
    ("a cube (red)", ["a", "cube", "-lrb-", "red", "-rrb-"]),    # -LRB- lower-cased survives
    ("he cannot go", ["he", "can", "not", "go"]),
    ("", []),
])
def test_ptb_tokenize(text: str, tokens: list[str]) -> None:
    assert ptb_tokenize(text) == tokens


# ---- BLEU -----------------------------------------------------------------------------------

def test_bleu_one_candidate_two_references_by_hand() -> None:
    # cand "the cat on the mat" (5); R1 "the cat is on the mat" (6), R2 "there is a cat on the
    # mat" (7). Clipped counts (max count of each n-gram in any single reference):
    #   1-grams the×2 cat on mat: "the" ≤ 2 in R1, all match      p1 = 5/5
    #   2-grams the·cat(R1) cat·on(R2) on·the the·mat             p2 = 4/4
    #   3-grams the·cat·on ✗, cat·on·the(R2), on·the·mat          p3 = 2/3
    #   4-grams the·cat·on·the ✗, cat·on·the·mat(R2)              p4 = 1/2
    # closest reference length to 5 is 6 → BP = exp(1 - 6/5) = exp(-0.2)
    bleu = corpus_bleu(toks("the cat on the mat"),
                       [toks("the cat is on the mat", "there is a cat on the mat")])
    bp = math.exp(-0.2)
    expected = [bp, bp, (2 / 3) ** (1 / 3) * bp, (1 * 1 * 2 / 3 * 1 / 2) ** (1 / 4) * bp]
    assert bleu == pytest.approx(expected, rel=1e-8)  # 0.8187, 0.8187, 0.7152, 0.6221


def test_bleu_clips_repeated_words() -> None:
    # "the the the the" vs "the cat": "the" counts once (max in the reference), p1 = 1/4;
    # candidate longer than the reference → no brevity penalty
    assert corpus_bleu(toks("the the the the"), [toks("the cat")])[0] == pytest.approx(0.25)


def test_bleu_pools_counts_over_the_corpus() -> None:
    # image 1: "a b" vs "a b" → 2/2 unigrams; image 2: "c d" vs "c e" → 1/2.
    # Corpus p1 = (2 + 1) / (2 + 2) = 3/4 (not the mean of 1 and 1/2); lengths 4 vs 4 → BP 1
    bleu = corpus_bleu(toks("a b", "c d"), [toks("a b"), toks("c e")])
    assert bleu[0] == pytest.approx(0.75)
    # p2: image 1 has 1/1 bigram, image 2 has 0/1 → (1 + 0) / 2; BLEU-2 = sqrt(3/4 · 1/2)
    assert bleu[1] == pytest.approx(math.sqrt(0.375))


def test_bleu_closest_reference_length_prefers_shorter_on_tie() -> None:
    # cand length 3, references of length 2 and 4 are equally close → 2 is used, BP = 1;
    # with 4 the brevity penalty would be exp(1 - 4/3)
    bleu = corpus_bleu(toks("a b c"), [toks("a b c d", "a b")])
    assert bleu[0] == pytest.approx(1.0)


def test_bleu_single_word_candidate_keeps_the_toolkit_epsilons() -> None:
    # "dog" vs "a dog": p1 = 1/1; no bigram exists, so p2 = (0 + 1e-15) / (0 + 1e-9) = 1e-6,
    # not 0; BP = exp(1 - 2/1) = e^-1. BLEU-2 = sqrt(1e-6) e^-1, BLEU-4 = (1e-18)^(1/4) e^-1
    bleu = corpus_bleu(toks("dog"), [toks("a dog")])
    assert bleu[0] == pytest.approx(math.exp(-1))
    assert bleu[1] == pytest.approx(1e-3 * math.exp(-1), rel=1e-6)
    assert bleu[3] == pytest.approx(1e-18 ** 0.25 * math.exp(-1), rel=1e-6)


# ---- ROUGE-L --------------------------------------------------------------------------------

def test_rouge_l_lcs_by_hand() -> None:
    # cand "a cat on a mat" (5 tokens)
    #   R1 "a cat"                        LCS "a cat" = 2:      P = 2/5, R = 2/2
    #   R2 "the cat sat on the mat today" LCS "cat on mat" = 3: P = 3/5, R = 3/7
    # rouge.py maximises P and R separately: P = 3/5 (R2), R = 1 (R1), so
    # F = (1 + 1.2²) P R / (R + 1.2² P) = 2.44 · 0.6 / (1 + 1.44 · 0.6) = 1.464 / 1.864
    score = rouge_l(toks("a cat on a mat"), [toks("a cat", "the cat sat on the mat today")])
    assert score == pytest.approx(1.464 / 1.864)  # 0.7854, above either reference's own F


def test_rouge_l_averages_over_images() -> None:
    # image 1 identical → 1; image 2 "dog" vs "a dog": P = 1, R = 1/2 →
    # F = 2.44 · 0.5 / (0.5 + 1.44) = 1.22 / 1.94
    score = rouge_l(toks("a dog", "dog"), [toks("a dog"), toks("a dog")])
    assert score == pytest.approx((1 + 1.22 / 1.94) / 2)


# ---- ROUGE-1 / ROUGE-2 (rouge-score's F-measure) -------------------------------------------

def test_rouge_n_by_hand() -> None:
    # cand "the cat sat on the mat", ref "the cat is on the mat"
    # unigrams: cand the×2 cat sat on mat, ref the×2 cat is on mat → overlap 2+1+1+1 = 5 of 6
    #           each: P = R = 5/6 → F1 = 5/6
    # bigrams:  cand the·cat cat·sat sat·on on·the the·mat, ref the·cat cat·is is·on on·the
    #           the·mat → overlap the·cat on·the the·mat = 3 of 5 each → F1 = 3/5
    cand, refs = toks("the cat sat on the mat"), [toks("the cat is on the mat")]
    assert rouge_n(cand, refs, 1) == pytest.approx(5 / 6)
    assert rouge_n(cand, refs, 2) == pytest.approx(3 / 5)


def test_rouge_n_clips_counts() -> None:
    # "the the the" vs "the cat": overlap min(3, 1) = 1, P = 1/3, R = 1/2,
    # F1 = 2 · 1/6 / (1/3 + 1/2) = (1/3) / (5/6) = 2/5
    assert rouge_n(toks("the the the"), [toks("the cat")], 1) == pytest.approx(0.4)


def test_rouge_n_takes_the_best_reference_f1_not_the_best_p_and_r() -> None:
    # cand "a dog runs": vs "a dog runs in the park" P = 3/3, R = 3/6 → F1 = 2/3;
    # vs "dog" P = 1/3, R = 1/1 → F1 = 1/2.  Best F1 = 2/3 (max P with max R would give 1)
    score = rouge_n(toks("a dog runs"), [toks("a dog runs in the park", "dog")], 1)
    assert score == pytest.approx(2 / 3)


def test_rouge_n_averages_over_images_and_scores_no_ngrams_zero() -> None:
    # image 1 identical → 1; image 2 "dog" has no bigram: P = 0 / max(1, 0) = 0 → F1 = 0
    assert rouge_n(toks("a dog", "dog"), [toks("a dog"), toks("a dog")], 2) == pytest.approx(0.5)
    assert rouge_n([[]], [toks("a dog")], 1) == 0.0  # empty candidate


# ---- CIDEr-D --------------------------------------------------------------------------------

def test_cider_d_two_images_by_hand() -> None:
    # image 1: cand "red cube",  refs ["red cube"];  image 2: cand "blue cube", refs ["green cube"]
    # df over the REFERENCES (images containing the n-gram): red 1, cube 2, red·cube 1,
    # green 1, green·cube 1, blue 0.  idf = ln(2 images) - ln(max(1, df)):
    #   cube: ln2 - ln2 = 0;  every other n-gram (blue too, df 0 → 1): ln2
    # image 1: unigram vectors (red ln2, cube 0) both sides → cosine 1; bigram → 1;
    #          no 3-/4-grams → 0; equal lengths → penalty 1.  10 · mean(1, 1, 0, 0) = 5
    # image 2: shared "cube" has weight 0, nothing else overlaps → 0
    score = cider_d(toks("red cube", "blue cube"), [toks("red cube"), toks("green cube")])
    assert score == pytest.approx((5.0 + 0.0) / 2)


def test_cider_d_clips_candidate_counts_and_penalises_length() -> None:
    # as above but image 1's candidate is "red red cube" (idf the same: it is from references)
    #   unigrams: cand (red 2ln2, cube 0), ref (red ln2, cube 0)
    #             Σ min(w_c, w_r)·w_r / (|c||r|) = ln2·ln2 / (2ln2 · ln2) = 1/2
    #             (unclipped CIDEr would give 2ln2·ln2 / (2ln2 · ln2) = 1)
    #   bigrams:  cand (red·red ln2 [df 0], red·cube ln2), ref (red·cube ln2)
    #             ln2·ln2 / (√2 ln2 · ln2) = 1/√2
    #   trigram:  reference has none → 0
    #   length (the toolkit counts bigrams): 2 vs 1 → penalty exp(-1² / (2·6²)) = exp(-1/72)
    score1 = 10 * (0.5 + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    score = cider_d(toks("red red cube", "blue cube"), [toks("red cube"), toks("green cube")])
    assert score == pytest.approx((score1 + 0.0) / 2)  # (2.9761 + 0) / 2


def test_cider_d_averages_over_references() -> None:
    # image 1: cand "red cube", refs ["red cube", "green cube"]; image 2: "green cube" for both.
    # df: red 1, red·cube 1, cube 2, green 2, green·cube 2 → only red and red·cube weigh ln2.
    # image 1 vs ref 1: cosine 1 for 1- and 2-grams; vs ref 2: zero vector → 0.
    #   10 · mean over n of (1+0, 1+0, 0, 0) / 2 references = 10 · 0.5 / 2 = 2.5
    # image 2: every n-gram has df 2 → zero vectors → 0.  CIDEr-D = (2.5 + 0) / 2
    score = cider_d(toks("red cube", "green cube"),
                    [toks("red cube", "green cube"), toks("green cube")])
    assert score == pytest.approx(1.25)


def test_cider_d_is_zero_on_a_single_image() -> None:
    # idf = ln(1) - ln(1) = 0 for every n-gram: all vectors vanish (a property of the toolkit)
    assert cider_d(toks("a red cube"), [toks("a red cube")]) == 0.0


# ---- entry points and edge cases ------------------------------------------------------------

def test_caption_scores_identical_candidate() -> None:
    refs = {1: ["A red cube on a blue cube."], 2: ["a single green cube"]}
    scores = caption_scores({1: "a red cube on a blue cube", 2: "A single green cube."}, refs,
                            with_meteor=False)
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-1", "ROUGE-2",
                           "ROUGE-L", "CIDEr-D"}
    # BLEU is 1 - O(1e-9) (the toolkit's epsilons), ROUGE exactly 1
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-8)
    assert scores["ROUGE-1"] == scores["ROUGE-2"] == scores["ROUGE-L"] == pytest.approx(1.0)
    assert scores["CIDEr-D"] > 0


def test_caption_scores_empty_candidate_scores_zero() -> None:
    scores = caption_scores({1: "", 2: ""}, {1: ["a red cube"], 2: ["a blue cube"]},
                            with_meteor=False)
    # BLEU: brevity penalty exp(1 - 1/ratio) with ratio ~ 1e-15 / 6 underflows to 0
    assert scores == {k: 0.0 for k in scores}


def test_caption_scores_ignores_case_and_punctuation() -> None:
    refs = {1: ["a red cube."], 2: ["two blue cubes"]}
    plain = caption_scores({1: "a red cube", 2: "two cubes"}, refs, with_meteor=False)
    noisy = caption_scores({1: "A RED cube!", 2: "Two, cubes..."}, refs, with_meteor=False)
    assert noisy == plain


def test_caption_scores_rejects_mismatched_ids() -> None:
    with pytest.raises(ValueError):
        caption_scores({1: "a"}, {2: ["a"]})
    with pytest.raises(ValueError):
        caption_scores({1: "a"}, {1: []})
    with pytest.raises(ValueError):  # a bare string would otherwise count as one-letter refs
        caption_scores({1: "a"}, {1: "a"})
    with pytest.raises(ValueError):
        caption_scores({}, {})


def test_exact_match() -> None:
    refs = {1: ["A red cube.", "a red block"], 2: ["a blue cube"], 3: ["a cube"]}
    # 1: "a  RED cube" → "a red cube" = first reference without its trailing period
    # 2: "a blue cube ." → "a blue cube";  3: "the cube" matches nothing → 2/3
    assert exact_match({1: "a  RED cube", 2: "a blue cube .", 3: "the cube"}, refs) == 2 / 3


# ---- METEOR (optional: the toolkit's jar) ---------------------------------------------------

@pytest.fixture
def no_java(monkeypatch: pytest.MonkeyPatch):
    """A machine without java on PATH; the availability check re-runs before and after."""
    meteor_available.cache_clear()
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    yield
    meteor_available.cache_clear()


def test_meteor_is_absent_without_java_and_says_how_to_enable_once(
        no_java, caplog: pytest.LogCaptureFixture) -> None:
    refs = {1: ["a red cube"], 2: ["a blue cube"]}
    with caplog.at_level(logging.INFO, logger="evaluation.caption_metrics"):
        first = caption_scores({1: "a red cube", 2: "a cube"}, refs)
        second = caption_scores({1: "a red cube", 2: "a cube"}, refs)
    assert "METEOR" not in first and first == second
    assert caplog.text.count(METEOR_HINT) == 1  # one line per run, not per table column
    assert "pip install pycocoevalcap" in METEOR_HINT and "java" in METEOR_HINT


@pytest.mark.skipif(not meteor_available(), reason="pycocoevalcap or java not installed")
def test_meteor_from_the_toolkit_jar() -> None:
    from pycocoevalcap.meteor.meteor import Meteor

    refs = {1: ["A red cube on a mat.", "a red block"], 2: ["Two blue cubes!"]}
    cands = {1: "a red cube on the mat", 2: "some green spheres"}
    scores = caption_scores(cands, refs)
    # the toolkit's own call on the toolkit's tokens (lower case, punctuation dropped)
    expected, _ = Meteor().compute_score(
        {1: ["a red cube on a mat", "a red block"], 2: ["two blue cubes"]},
        {1: ["a red cube on the mat"], 2: ["some green spheres"]})
    assert scores["METEOR"] == pytest.approx(expected)
    assert 0 < scores["METEOR"] < 1
    same = caption_scores({1: "a red cube", 2: "two blue cubes"},
                          {1: ["a red cube"], 2: ["two blue cubes"]})
    assert same["METEOR"] == pytest.approx(1.0)
