"""VQA accuracy as the official evaluation computes it, plus exact match and token F1.

Reference: GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``. Answers are
normalised by its ``processPunctuation`` then ``processDigitArticle`` (re-implemented here from
reading that code, quirks included and noted inline), and

    acc(pred) = mean over leave-one-out subsets S of the answers of min(1, #{a in S: a == pred} / 3)

With the usual 10 answers that is the published metric. With fewer, the same formula runs over
all len(answers) leave-one-out subsets (as vqaEval.py would); in particular a question with a
single reference answer always scores 0 (its one subset is empty) — use exact_match there.

One deliberate difference: vqaEval.py takes the reference answers as already normalised (the
official annotations are) and only applies processPunctuation to them, and only when they are
not all identical. Here references go through the full normalisation by default, so raw answers
such as "Two" compare equal to a predicted "2"; ``official_reference_processing=True``
restores the official behaviour for parity runs on official annotations. Scores are fractions
in [0, 1], not vqaEval.py's percentages rounded to 2 decimals.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

# vqaEval.py `contractions`, verbatim (data table). Keys with capitals ("Im", "Ive", ...) never
# match because processDigitArticle lower-cases first; "somebody'd" → "somebodyd" is upstream's.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# vqaEval.py `punct`, in its order. Apostrophe, colon and period are not in it.
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
         "`", ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# vqaEval.py's periodStrip is "(?!<=\d)(\.)(?!\d)": "(?!<=" is a negative *lookahead* for the
# text "<=", always true before a ".", so it only means "a period not followed by a digit".
_PERIOD = re.compile(r"\.(?!\d)")
# vqaEval.py calls periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) lands in `count`.
_PERIOD_COUNT = 32


def process_punctuation(text: str) -> str:
    """vqaEval.py processPunctuation: delete or space out PUNCT, drop periods not before a digit.

    A punctuation mark is deleted when it touches a space anywhere in the text, or when the
    text has a digit,digit comma anywhere ("1,000" → "1000"); otherwise it becomes a space.
    """
    out = text
    for p in PUNCT:
        if p + " " in text or " " + p in text or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.py processDigitArticle: lower-case, number words → digits, drop articles, fix
    contractions ("dont" → "don't")."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """An answer as vqaEval.py normalises a prediction: whitespace, punctuation, digits/articles."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def _references(answers: Sequence[str], official: bool) -> list[str]:
    """Reference answers ready for comparison (see the module docstring for ``official``)."""
    if not answers:
        raise ValueError("a question needs at least one reference answer")
    if not official:
        return [normalize_answer(a) for a in answers]
    if len(set(answers)) > 1:
        return [process_punctuation(a) for a in answers]
    return list(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str], *,
                 official_reference_processing: bool = False) -> float:
    """Official VQA accuracy of one prediction: leave-one-out mean of min(1, matches / 3)."""
    pred = normalize_answer(prediction)
    refs = _references(answers, official_reference_processing)
    # vqaEval.py leaves out each answer *record* in turn, so duplicates are left out one at a time
    per_subset = [min(1.0, sum(r == pred for j, r in enumerate(refs) if j != i) / 3)
                  for i in range(len(refs))]
    return sum(per_subset) / len(per_subset)


def answer_correct(prediction: str, answers: Sequence[str]) -> bool:
    """Exact match of one answer: VQA-normalised, equal to any (fully normalised) reference."""
    return normalize_answer(prediction) in _references(answers, official=False)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD-style token F1 on normalised answers, maximised over the reference answers."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for ref in _references(answers, official=False):
        gold = ref.split()
        if not pred or not gold:  # SQuAD v2: two empty answers agree, one empty scores 0
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def vqa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]], *,
               official_reference_processing: bool = False) -> dict[str, float]:
    """Mean VQA accuracy, exact match (normalised, any reference) and token F1 over questions.

    "VQA-acc" is reported only when every question has the 10 human answers it is defined on:
    with one reference answer its leave-one-out average is 0 whatever the prediction.
    """
    if len(predictions) != len(answers) or not predictions:
        raise ValueError(f"need equal, non-zero counts: {len(predictions)} predictions, "
                         f"{len(answers)} answer lists")
    acc = [vqa_accuracy(p, a, official_reference_processing=official_reference_processing)
           for p, a in zip(predictions, answers, strict=True)]
    em = [answer_correct(p, a) for p, a in zip(predictions, answers, strict=True)]
    f1 = [token_f1(p, a) for p, a in zip(predictions, answers, strict=True)]
    n = len(predictions)
    scores = {"exact_match": sum(em) / n, "token_F1": sum(f1) / n}
    if all(len(a) == 10 for a in answers):
        scores["VQA-acc"] = sum(acc) / n
    return scores
