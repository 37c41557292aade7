"""Generate the cube-scene VQA dataset from the shipped caption set (seeded, byte-identical).

    python -m data.make_vqa_dataset --seed 0

No new images: each caption of annotations.jsonl / annotations_test.jsonl fixes its scene
(empty, one cube, or a top-first stack of two), and 2-3 questions with a defined answer are
asked about that same image. Writes into --out-dir (default: the repository root)
    vqa_train.jsonl   {"image": "image_train/00000.png", "question": ..., "answer": ...}
    vqa_test.jsonl    same fields plus the caption set's "split": "normal" | "heldout_pairs"

Question style (the fine-tuning style; the tiny_blip_vqa base was pretrained on another):
    how many cubes are there?          -> zero | one | two
    is there a red cube?               -> yes | no   (a colour in the scene half the time)
    what colour is the cube?           -> red        (single cube only)
    what colour is the top cube?       -> blue       (stacks only)
    what colour is the bottom cube?    -> green      (stacks only)
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import numpy as np

from data.make_dataset import write_jsonl
from data.scenes import COLOURS

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
NUMBER_WORDS = ("zero", "one", "two")
_COLOUR = "(" + "|".join(COLOURS) + ")"
_STACKED = re.compile(rf"an? {_COLOUR} cube stacked on an? {_COLOUR} cube")
_SINGLE = re.compile(rf"a single {_COLOUR} cube")
EMPTY_CAPTION = "no block is present in the image"


def stack_of(caption: str) -> tuple[str, ...]:
    """The top-first colour stack a cube caption describes (inverse of scenes.cube_caption)."""
    if caption == EMPTY_CAPTION:
        return ()
    if m := _SINGLE.fullmatch(caption):
        return (m[1],)
    if m := _STACKED.fullmatch(caption):
        return (m[1], m[2])
    raise ValueError(f"not a cube caption: {caption!r}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def candidate_questions(stack: tuple[str, ...], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Every question type defined for this stack, as (question, answer), in a fixed order."""
    # "is there" asks about a colour in the scene half the time (never for an empty scene)
    absent = [c for c in COLOURS if c not in stack]
    pool = list(stack) if stack and rng.random() < 0.5 else absent
    colour = pool[rng.integers(len(pool))]
    qa = [("how many cubes are there?", NUMBER_WORDS[len(stack)]),
          (f"is there {_article(colour)} {colour} cube?", "yes" if colour in stack else "no")]
    if len(stack) == 1:
        qa.append(("what colour is the cube?", stack[0]))
    elif len(stack) == 2:
        qa += [("what colour is the top cube?", stack[0]),
               ("what colour is the bottom cube?", stack[1])]
    return qa


def questions_for(stack: tuple[str, ...], rng: np.random.Generator,
                  per_image: tuple[int, int]) -> list[tuple[str, str]]:
    """per_image[0]..per_image[1] of the stack's candidate questions, kept in candidate order."""
    qa = candidate_questions(stack, rng)
    k = min(len(qa), int(rng.integers(per_image[0], per_image[1] + 1)))
    keep = sorted(rng.choice(len(qa), size=k, replace=False).tolist())
    return [qa[i] for i in keep]


def vqa_records(captions: Path, rng: np.random.Generator,
                per_image: tuple[int, int]) -> list[dict[str, str]]:
    """VQA records for every image of a caption JSONL file (its "split" field is carried)."""
    records = []
    for line in captions.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for question, answer in questions_for(stack_of(row["text"]), rng, per_image):
            record = {"image": row["image"], "question": question, "answer": answer}
            if "split" in row:
                record["split"] = row["split"]
            records.append(record)
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the numpy generator (default 0)")
    p.add_argument("--captions-dir", type=Path, default=REPO_ROOT,
                   help="where annotations.jsonl and annotations_test.jsonl are "
                        "(default: repository root)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where vqa_train.jsonl and vqa_test.jsonl go (default: --captions-dir, "
                        "so the image paths stay valid)")
    p.add_argument("--min-questions", type=int, default=2, help="fewest questions per image")
    p.add_argument("--max-questions", type=int, default=3,
                   help="most questions per image (fewer when fewer are defined)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 1 <= args.min_questions <= args.max_questions:
        p.error("need 1 <= --min-questions <= --max-questions")
    out = args.out_dir or args.captions_dir
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    per_image = (args.min_questions, args.max_questions)
    for src, dst in (("annotations.jsonl", "vqa_train.jsonl"),
                     ("annotations_test.jsonl", "vqa_test.jsonl")):
        records = vqa_records(args.captions_dir / src, rng, per_image)
        write_jsonl(records, out / dst)
        log.info("wrote %d questions to %s", len(records), out / dst)


if __name__ == "__main__":
    main()
