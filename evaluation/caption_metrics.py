"""Caption metrics as the COCO caption toolkit computes them: BLEU-1..4, ROUGE-L, CIDEr-D.

Reference: tylin/coco-caption, packaged as salaniz/pycocoevalcap (``bleu/bleu_scorer.py``,
``rouge/rouge.py``, ``cider/cider_scorer.py``, ``tokenizer/ptbtokenizer.py``). The scorers are
re-implemented here from reading that code, including its constants and quirks (noted inline),
so scores on identical tokens match the toolkit up to float rounding.

Tokenisation is the one approximation. The toolkit runs Stanford CoreNLP 3.4.1's PTBTokenizer
(Java, ``-preserveLines -lowerCase``) and then drops the tokens in its ``PUNCTUATIONS`` list;
``ptb_tokenize`` is a pure-Python stand-in for that pipeline; its docstring lists where it can
differ from the Java tokenizer.

METEOR is not provided: its reference form is a Java program with WordNet synonyms and
paraphrase tables, and an approximation under that name would not be comparable to published
numbers. SPICE (Java, scene-graph parser) is absent for the same reason.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from .verdict import caption_correct

# ptbtokenizer.py's PUNCTUATIONS. Its bracket entries are upper-case but the tokenizer runs with
# -lowerCase first, so "(" → "-lrb-" is never matched and survives as a token; kept that way.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])

# PTB escapes brackets (ptb3Escaping, the default in CoreNLP 3.4.1); quotes become `` '' ` '
# (all in PUNCTUATIONS, so they are simply dropped below); unicode dashes/ellipsis normalise.
_CHAR_MAP = str.maketrans({
    "(": " -lrb- ", ")": " -rrb- ", "{": " -lcb- ", "}": " -rcb- ", "[": " -lsb- ",
    "]": " -rsb- ", '"': " '' ", "\u201c": " '' ", "\u201d": " '' ", "\u2018": "'",
    "\u2019": "'", "\u2013": " -- ", "\u2014": " -- ", "\u2026": " ... ",
})
_TOKEN = re.compile(r"""
      -l[rcs]b- | -r[rcs]b-          # the bracket escapes inserted above
    | \d+(?:[.,:/]\d+)+              # 1,000  3.5  10:30  1/2 stay one token
    | (?:[a-z]\.){2,}                # u.s.  a.m. (PTB keeps letter-dot abbreviations whole)
    | \.\.\. | --                    # ellipsis, double dash
    | \w+(?:[-/'&]\w+)*              # words; hyphenated, slashed and o'clock-style words whole
    | '(?:s|m|d|re|ve|ll)\b           # a clitic already written apart: "dog 's"
    | \S                             # any other character is its own token
""", re.VERBOSE)
_CLITICS = ("n't", "'s", "'m", "'d", "'re", "'ve", "'ll")
# PTBLexer's "assimilations", split by default: cannot → can not, gonna → gon na, ...
_ASSIMILATIONS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                  "wanna": ("wan", "na"), "gimme": ("gim", "me"), "lemme": ("lem", "me")}


def _split_clitic(word: str) -> tuple[str, ...]:
    """PTB splits contractions and possessives off the word: don't → do n't, dog's → dog 's."""
    if word in _ASSIMILATIONS:
        return _ASSIMILATIONS[word]
    for clitic in _CLITICS:
        if word.endswith(clitic) and len(word) > len(clitic):
            return (*_split_clitic(word[: -len(clitic)]), clitic)  # couldn't've: 3 tokens
    return (word,)


def ptb_tokenize(text: str) -> list[str]:
    """Lower-cased PTB-style tokens of ``text`` minus the toolkit's PUNCTUATIONS.

    Approximates ptbtokenizer.py (CoreNLP 3.4.1 PTBTokenizer, then the punctuation filter).
    Handled as PTB does: punctuation split off words; numbers with internal , . : / kept whole;
    hyphenated words kept whole; clitics n't 's 'm 'd 're 've 'll split (can't → ca n't);
    cannot/gonna/gotta/wanna/gimme/lemme split; letter-dot abbreviations (u.s.) kept; brackets
    become -lrb- -rrb- -lcb- -rcb- -lsb- -rsb- tokens, which the filter does not remove.
    Known differences from the Java tokenizer (rare in captions):
      - abbreviations from PTB's word list (mr. dr. st. etc. inc.) lose their period here;
      - urls, emails, emoticons, "'90s"/"'tis" and words glued to numbers ("3.5mm") follow the
        rules above, where PTB has dedicated rules that may keep or split them differently;
      - PTB 3.4.1 may escape "/" and "*" ("and\\/or"); not done here;
      - PTB's HTML-entity, soft-hyphen, non-breaking-space and other unicode normalisations are
        reproduced only for curly quotes, en/em dashes and the ellipsis character.
    """
    text = text.replace("\n", " ").lower().translate(_CHAR_MAP)
    tokens = []
    for token in _TOKEN.findall(text):
        tokens.extend(_split_clitic(token) if "'" in token or token in _ASSIMILATIONS else (token,))
    return [t for t in tokens if t not in PUNCTUATIONS]


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


def caption_scores(candidates: Mapping[Hashable, str],
                   references: Mapping[Hashable, Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr-D of one candidate caption per id against its references."""
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
    scores["ROUGE-L"] = rouge_l(cands, refs)
    scores["CIDEr-D"] = cider_d(cands, refs)
    return scores


def exact_match(candidates: Mapping[Hashable, str],
                references: Mapping[Hashable, Sequence[str]]) -> float:
    """Fraction of ids whose normalised candidate equals any of its normalised references."""
    if candidates.keys() != references.keys():
        raise ValueError("candidates and references must have the same ids")
    hits = [caption_correct(candidates[i], references[i]) for i in candidates]
    return sum(hits) / len(hits)
