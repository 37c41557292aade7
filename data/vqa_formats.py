"""Load visual-question-answering datasets into one flat list of VQASample, one per question.

Format detection, from the path (and, for a ``.json`` file, its top-level JSON type):
  * a ``.jsonl`` file: one JSON object per line, ``{"image": "a.png", "question": "...",
    "answer": "..."}``. The answer may be a list; "answers" is accepted for "answer" (one of the
    two), and either may list strings or VQA-style ``{"answer": ...}`` objects. "file_name" and
    "path" are accepted for "image", as in data/formats.py. Blank lines are ignored, extra fields
    allowed; a string ``split`` field is carried into the samples.
  * a ``.json`` file holding a list: one image and its questions,
    ``[{"path": "a.png"}, {"questions": [{"question": "...", "answer": "..."}, ...]}]``; the
    objects of the list are merged (a key given twice is an error); answers as in JSONL.
  * a directory: every ``*.json`` file in it (sorted by name) is such a per-image list; other
    files, such as the images themselves, are ignored.
  * a ``.json`` file holding an object with "questions": VQA v2. The questions file
    ``{"data_subtype": "val2014", "questions": [{"image_id", "question", "question_id"}]}`` is
    answered by the annotations file ``{"annotations": [{"question_id", "image_id",
    "answers": [{"answer": ...}, ...]}]}``: ``annotations`` when given, else the sibling whose
    name has "annotations" for "questions" (either capitalization), tried as is and then without
    "_OpenEnded"/"_MultipleChoice" (v2_OpenEnded_mscoco_val2014_questions.json ->
    v2_mscoco_val2014_annotations.json). Annotations are required: test splits have none and
    cannot be trained on. A sample's answers are the annotation's "answers" in order (the 10
    human answers); "multiple_choice_answer" is not used. The image of ``image_id`` is
    ``COCO_<data_subtype>_<image_id as 12 digits>.jpg``, or ``<12 digits>.jpg`` (COCO 2017
    naming) when the file has no "data_subtype".
Anything else is a DataFormatError that lists the accepted formats.

Image paths are relative to ``image_root`` when given, else to the directory of the JSON/JSONL
file naming them; VQA v2 images without ``image_root`` must sit beside the questions file.
Questions and answers are stripped of surrounding whitespace. Bad entries are a JSONL line, a
question (``file#questions[i]``), or a whole per-image file whose image or layout is unusable;
they raise or are skipped and counted as in data/formats.py. Samples come in file order.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.formats import (
    IMAGE_KEYS,
    DataFormatError,
    SkipReport,
    _BadEntry,
    _base_dir,
    _image_problem,
    _one_of,
    _read_text,
    _sample_image,
    _visible,
    collect,
    read_jsonl,
)

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = (
    "a .jsonl file of {'image': ..., 'question': ..., 'answer': ...} lines, a per-image .json "
    "list [{'path': ...}, {'questions': [...]}] or a directory of them, or a VQA v2 questions "
    ".json with its annotations file"
)
ANSWER_KEYS = ("answer", "answers")


@dataclass(frozen=True)
class VQASample:
    """One question about an image with its reference answers."""

    image: Path  # resolved path of the image file
    question: str
    answers: tuple[str, ...]  # one or several; VQA v2: the 10 human answers, in order
    source: str  # "file:line" or "file#questions[i]", for error messages
    split: str | None = None  # the JSONL "split" field, if any


# An entry's sample, or the message saying why the entry is bad.
_Entry = VQASample | str


def load_vqa_samples(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    skip_bad_samples: bool = False,
    check_images: bool = True,
    annotations: str | Path | None = None,
) -> tuple[list[VQASample], SkipReport]:
    """Load every question of a VQA dataset in any accepted format (module docstring).

    Missing images are always errors; check_images also opens each image once and verifies it.
    Bad entries raise one DataFormatError listing the first few, or with skip_bad_samples are
    skipped and counted in the SkipReport. A dataset left with no samples raises either way.
    annotations names the VQA v2 annotations file and applies to VQA v2 only.
    """
    path = Path(path)
    check = functools.cache(functools.partial(_image_problem, verify=check_images))
    vqa_v2 = False
    if path.is_dir():
        entries = _read_per_image_dir(path, image_root, check)
    elif not path.exists():
        raise DataFormatError(f"{path}: no such file or directory")
    elif path.suffix.lower() == ".jsonl":
        entries = _read_jsonl(path, _base_dir(path, image_root), check)
    elif path.suffix.lower() == ".json":
        data = _load_json(path)
        if isinstance(data, list):
            entries = _read_per_image(path, data, _base_dir(path, image_root), check)
        elif isinstance(data, dict) and "questions" in data:
            vqa_v2 = True
            annotations_path = _annotations_path(path, annotations)
            entries = _read_vqa_v2(path, data, annotations_path, image_root, check)
        else:
            is_annotations = isinstance(data, dict) and "annotations" in data
            hint = " (a VQA v2 annotations file? pass its questions file)" if is_annotations else ""
            raise DataFormatError(f"{path}: unknown VQA layout{hint}; expected {ACCEPTED_FORMATS}")
    else:
        raise DataFormatError(f"{path}: unknown dataset format; expected {ACCEPTED_FORMATS}")
    if annotations is not None and not vqa_v2:
        raise DataFormatError(f"{path}: annotations= applies to VQA v2 questions files only")
    return collect(path, entries, skip_bad_samples)


def _load_json(path: Path) -> Any:
    """The parsed JSON file; a file that does not parse is fatal (its format is unknown)."""
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e


def _question(value: Any) -> str:
    """A question as a stripped non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise _BadEntry(f"question must be a non-empty string, got {value!r}")
    return value.strip()


def _answers(value: Any) -> tuple[str, ...]:
    """An answer or a non-empty list of answers (strings or {"answer": str}), stripped."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _BadEntry("empty list of answers")
    answers = []
    for item in items:
        answer = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(answer, str):
            raise _BadEntry(f"answer must be a string or {{'answer': str}}, got {item!r:.40}")
        if not answer.strip():
            raise _BadEntry("empty answer")
        answers.append(answer.strip())
    return tuple(answers)


def _question_answers(record: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The question and answers of a JSONL line or a per-image question object."""
    if "question" not in record:
        raise _BadEntry("no question (expected the key 'question')")
    return _question(record["question"]), _answers(_one_of(record, ANSWER_KEYS, "answer"))


def _read_jsonl(path: Path, base: Path, check: Callable[[Path], str | None]) -> Iterator[_Entry]:
    """VQA entries of a JSONL file, one question per line."""

    def make(record: dict[str, Any], source: str, split: str | None) -> VQASample:
        question, answers = _question_answers(record)
        image = _sample_image(_one_of(record, IMAGE_KEYS, "image"), base, check)
        return VQASample(image, question, answers, source, split)

    return read_jsonl(path, make)


def _read_per_image(
    path: Path, data: Any, base: Path, check: Callable[[Path], str | None]
) -> Iterator[_Entry]:
    """Entries of a per-image file: each question, or the whole file if its image/layout is bad."""
    try:
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise _BadEntry("expected a list of JSON objects [{'path': ...}, {'questions': [...]}]")
        record: dict[str, Any] = {}
        for part in data:
            for key, value in part.items():
                if key in record:
                    raise _BadEntry(f"key '{key}' given twice")
                record[key] = value
        questions = record.get("questions")
        if not isinstance(questions, list) or not questions:
            raise _BadEntry("expected a non-empty 'questions' list")
        image = _sample_image(_one_of(record, IMAGE_KEYS, "image"), base, check)
    except _BadEntry as e:
        yield f"{path}: {e}"
        return
    for i, entry in enumerate(questions):
        source = f"{path}#questions[{i}]"
        try:
            if not isinstance(entry, dict):
                raise _BadEntry(f"expected a JSON object, got {type(entry).__name__}")
            yield VQASample(image, *_question_answers(entry), source)
        except _BadEntry as e:
            yield f"{source}: {e}"


def _read_per_image_dir(
    root: Path, image_root: str | Path | None, check: Callable[[Path], str | None]
) -> Iterator[_Entry]:
    """Entries of every per-image .json file in a directory, in name order."""
    files = [p for p in _visible(root) if p.suffix.lower() == ".json" and p.is_file()]
    if not files:
        raise DataFormatError(f"{root}: directory has no .json files; expected {ACCEPTED_FORMATS}")
    for file in files:
        try:
            data = json.loads(_read_text(file))
        except json.JSONDecodeError as e:  # one broken file is one bad entry, like a JSONL line
            yield f"{file}:{e.lineno}: invalid JSON ({e.msg})"
            continue
        yield from _read_per_image(file, data, _base_dir(file, image_root), check)


def _annotations_path(path: Path, annotations: str | Path | None) -> Path:
    """The VQA v2 annotations file: the one given, else the sibling named after the questions."""
    if annotations is not None:
        if not Path(annotations).is_file():
            raise DataFormatError(f"annotations file {annotations} does not exist")
        return Path(annotations)
    name = path.name.replace("questions", "annotations").replace("Questions", "Annotations")
    official = re.sub("_(OpenEnded|MultipleChoice)", "", name)  # v2_mscoco_val2014_annotations
    candidates = [path.with_name(name), path.with_name(official)]
    for candidate in candidates:
        if candidate != path and candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates) if c != path) or "none"
    raise DataFormatError(
        f"{path}: no VQA v2 annotations file found (looked for: {looked}); pass annotations=. "
        "Answers come from the annotations, so test splits, which have none, cannot be used"
    )


def _annotation_table(path: Path) -> dict[int | str, tuple[str, dict[str, Any]]]:
    """question_id -> (source, annotation) of a VQA v2 annotations file; a broken table is fatal."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataFormatError(f"{path}: expected a VQA v2 object {{'annotations': [...]}}")
    table: dict[int | str, tuple[str, dict[str, Any]]] = {}
    for i, ann in enumerate(data["annotations"]):
        source = f"{path}#annotations[{i}]"
        ok = isinstance(ann, dict) and "answers" in ann
        if not ok or not isinstance(ann.get("question_id"), int | str):
            raise DataFormatError(f"{source}: expected {{'question_id': int, 'answers': [...]}}")
        if ann["question_id"] in table:
            raise DataFormatError(f"{source}: duplicate question_id {ann['question_id']!r}")
        table[ann["question_id"]] = (source, ann)
    return table


def _read_vqa_v2(
    path: Path,
    data: dict[str, Any],
    annotations: Path,
    image_root: str | Path | None,
    check: Callable[[Path], str | None],
) -> Iterator[_Entry]:
    """Entries of a VQA v2 questions file, one per question, answered from its annotations."""
    questions, subtype = data["questions"], data.get("data_subtype")
    if not isinstance(questions, list):
        raise DataFormatError(f"{path}: VQA v2 'questions' must be a list")
    if subtype is not None and not isinstance(subtype, str):
        raise DataFormatError(f"{path}: 'data_subtype' must be a string such as 'val2014'")

    def file_name(image_id: int) -> str:
        return f"COCO_{subtype}_{image_id:012d}.jpg" if subtype else f"{image_id:012d}.jpg"

    table = _annotation_table(annotations)
    base = _base_dir(path, image_root)
    # Without image_root a wrong guess would fail every question one by one: say it once.
    ids = (q.get("image_id") for q in questions if isinstance(q, dict))
    first = next((i for i in ids if isinstance(i, int)), None)
    if image_root is None and first is not None and not (base / file_name(first)).exists():
        raise DataFormatError(
            f"{path}: image {file_name(first)} is not beside the questions file; "
            "pass image_root=<the folder holding the COCO images>"
        )
    for i, q in enumerate(questions):
        source = f"{path}#questions[{i}]"
        try:
            if not isinstance(q, dict):
                raise _BadEntry(f"expected a JSON object, got {type(q).__name__}")
            missing = [k for k in ("image_id", "question", "question_id") if k not in q]
            if missing:
                raise _BadEntry(f"missing key(s) {', '.join(missing)}")
            image_id, question_id = q["image_id"], q["question_id"]
            if not isinstance(image_id, int):
                raise _BadEntry(f"image_id must be an integer, got {image_id!r}")
            question = _question(q["question"])
            if not isinstance(question_id, int | str) or question_id not in table:
                raise _BadEntry(f"question_id {question_id!r} has no annotation in {annotations}")
            ann_source, ann = table[question_id]
            if ann.get("image_id", image_id) != image_id:
                raise _BadEntry(f"image_id {image_id}, but {ann_source} has {ann['image_id']!r}")
            try:
                answers = _answers(ann["answers"])
            except _BadEntry as e:
                raise _BadEntry(f"{ann_source}: {e}") from e
            image = _sample_image(file_name(image_id), base, check)
            yield VQASample(image, question, answers, source)
        except _BadEntry as e:
            yield f"{source}: {e}"
