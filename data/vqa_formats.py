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
    A single object ``{"image": "a.png", "questions": [...]}`` is accepted too.
  * a directory: every ``*.json`` file in it, and in its subfolders one level down (one folder
    per image: ``<id>/data.json`` beside its image), sorted by name, is such a per-image file;
    other files, such as the images themselves, are ignored.
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
Caption data (a COCO or Karpathy file, a captions map, JSONL lines with a caption and no
question, a caption/ + Image/ tree) is a DataFormatError saying "pass --task caption"
(data/detect.py); anything else is a DataFormatError that lists the accepted formats.

Image paths are found as data/files.py says (the file's folder, its parents up to the working
directory, the working directory, each with its ``images/``; or ``image_root``); VQA v2 also
looks in ``<dir>/<data_subtype>`` and ``<dir>/../<data_subtype>`` (train2014/ beside the
questions file, as the official downloads unpack).
Questions and answers are stripped of surrounding whitespace. Bad entries are a JSONL line, a
question (``file#questions[i]``), or a whole per-image file whose image or layout is unusable;
they raise or are skipped and counted as data/errors.py says. Samples come in file order.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data import detect
from data.errors import BadEntry, DataFormatError, SkipReport, collect
from data.files import (
    ImagePaths,
    clean_text,
    one_of,
    read_json,
    read_json_file,
    read_jsonl,
    visible_entries,
)
from data.images import image_problem

__all__ = ["ACCEPTED_FORMATS", "DataFormatError", "SkipReport", "VQASample", "load_vqa_samples"]

IMAGE_KEYS = ("image", "file_name", "path")
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
    check = functools.cache(functools.partial(image_problem, decode=check_images))
    vqa_v2 = False
    if path.is_dir():
        why = detect.caption_folder(path)
        if why:
            raise DataFormatError(detect.caption_message(path, why))
        entries = _read_per_image_dir(path, image_root, check)
    elif not path.exists():
        raise DataFormatError(f"{path}: no such file or directory")
    elif path.suffix.lower() == ".jsonl":
        entries = _read_jsonl(path, ImagePaths(path, image_root, check))
    elif path.suffix.lower() == ".json":
        data = read_json_file(path)
        if _is_per_image(data):
            entries = _read_per_image(path, data, ImagePaths(path, image_root, check))
        elif isinstance(data, dict) and "questions" in data:
            vqa_v2 = True
            annotations_path = _annotations_path(path, annotations)
            entries = _read_vqa_v2(path, data, annotations_path, image_root, check)
        else:
            why = detect.caption_json(data)
            if why:
                raise DataFormatError(detect.caption_message(path, why))
            is_annotations = isinstance(data, dict) and "annotations" in data
            hint = " (a VQA v2 annotations file? pass its questions file)" if is_annotations else ""
            raise DataFormatError(f"{path}: unknown VQA layout{hint}; expected {ACCEPTED_FORMATS}")
    else:
        raise DataFormatError(f"{path}: unknown dataset format; expected {ACCEPTED_FORMATS}")
    if annotations is not None and not vqa_v2:
        raise DataFormatError(f"{path}: annotations= applies to VQA v2 questions files only")
    return collect(path, entries, skip_bad_samples)


def _is_per_image(data: Any) -> bool:
    """A per-image record: a list of objects, or one object naming its image and questions."""
    if isinstance(data, list):
        return detect.caption_json(data) is None
    return isinstance(data, dict) and "questions" in data and any(k in data for k in IMAGE_KEYS)


def _question(value: Any) -> str:
    """A question as a stripped non-empty string."""
    return clean_text(value, "question")


def _answers(value: Any) -> tuple[str, ...]:
    """An answer or a non-empty list of answers (strings or {"answer": str}), stripped."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise BadEntry("empty list of answers")
    answers = []
    for item in items:
        answer = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(answer, str):
            raise BadEntry(f"answer must be a string or {{'answer': str}}, got {item!r:.40}")
        answers.append(clean_text(answer, "answer"))
    return tuple(answers)


def _question_answers(record: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The question and answers of a JSONL line or a per-image question object."""
    if "question" not in record:
        raise BadEntry("no question (expected the key 'question')")
    return _question(record["question"]), _answers(one_of(record, ANSWER_KEYS, "answer"))


def _read_jsonl(path: Path, images: ImagePaths) -> Iterator[_Entry]:
    """VQA entries of a JSONL file, one question per line."""

    def make(record: dict[str, Any], source: str, split: str | None) -> VQASample:
        why = detect.caption_record(record)
        if why:  # fatal: every other line is caption data too
            raise DataFormatError(detect.caption_message(source, why))
        question, answers = _question_answers(record)
        image = images.image(one_of(record, IMAGE_KEYS, "image"))
        return VQASample(image, question, answers, source, split)

    return read_jsonl(path, make)


def _merged(data: Any) -> dict[str, Any]:
    """A per-image record as one object: a list's objects merged (a key given twice is bad)."""
    if isinstance(data, dict):
        return data
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise BadEntry("expected a list of JSON objects [{'path': ...}, {'questions': [...]}] "
                       "or one object {'image': ..., 'questions': [...]}")
    record: dict[str, Any] = {}
    for part in data:
        for key, value in part.items():
            if key in record:
                raise BadEntry(f"key '{key}' given twice")
            record[key] = value
    return record


def _read_per_image(path: Path, data: Any, images: ImagePaths) -> Iterator[_Entry]:
    """Entries of a per-image file: each question, or the whole file if its image/layout is bad."""
    try:
        record = _merged(data)
        questions = record.get("questions")
        if not isinstance(questions, list) or not questions:
            raise BadEntry("expected a non-empty 'questions' list")
        image = images.image(one_of(record, IMAGE_KEYS, "image"))
    except BadEntry as e:
        yield f"{path}: {e}"
        return
    for i, entry in enumerate(questions):
        source = f"{path}#questions[{i}]"
        try:
            if not isinstance(entry, dict):
                raise BadEntry(f"expected a JSON object, got {type(entry).__name__}")
            yield VQASample(image, *_question_answers(entry), source)
        except BadEntry as e:
            yield f"{source}: {e}"


def _per_image_files(root: Path) -> list[Path]:
    """The .json files of a per-image folder: ``root/*.json`` and, one folder per image,
    ``root/<id>/*.json``; hidden files ignored, sorted by name."""
    files = []
    for entry in visible_entries(root):
        inside = visible_entries(entry) if entry.is_dir() else [entry]
        files += [p for p in inside if p.suffix.lower() == ".json" and p.is_file()]
    return files


def _read_per_image_dir(
    root: Path, image_root: str | Path | None, check: Callable[[Path], str | None]
) -> Iterator[_Entry]:
    """Entries of every per-image .json file of a folder, in name order."""
    files = _per_image_files(root)
    if not files:
        raise DataFormatError(f"{root}: directory has no .json files; expected {ACCEPTED_FORMATS}")
    for file in files:
        try:  # one broken file is one bad entry, like a JSONL line
            data = read_json(file)
        except BadEntry as e:
            yield str(e)
            continue
        yield from _read_per_image(file, data, ImagePaths(file, image_root, check))


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
        f"{path}: no VQA v2 annotations file found (looked for: {looked}); pass --annotations "
        "(annotations= in Python). "
        "Answers come from the annotations, so test splits, which have none, cannot be used"
    )


def _annotation_table(path: Path) -> dict[int | str, tuple[str, dict[str, Any]]]:
    """question_id -> (source, annotation) of a VQA v2 annotations file; a broken table is fatal."""
    data = read_json_file(path)
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
    d = path.parent
    extra = (d / subtype, d.parent / subtype, d.parent) if subtype else ()
    images = ImagePaths(path, image_root, check, extra)  # official layout: train2014/ beside
    # A wrong guess of the image folder would fail every question one by one: say it once.
    ids = (q.get("image_id") for q in questions if isinstance(q, dict))
    first = next((i for i in ids if isinstance(i, int)), None)
    if first is not None and images.find(file_name(first)) is None:
        raise DataFormatError(f"{path}: image {file_name(first)} not found "
                              f"{images.where(file_name(first))}")
    for i, q in enumerate(questions):
        source = f"{path}#questions[{i}]"
        try:
            if not isinstance(q, dict):
                raise BadEntry(f"expected a JSON object, got {type(q).__name__}")
            missing = [k for k in ("image_id", "question", "question_id") if k not in q]
            if missing:
                raise BadEntry(f"missing key(s) {', '.join(missing)}")
            image_id, question_id = q["image_id"], q["question_id"]
            if not isinstance(image_id, int):
                raise BadEntry(f"image_id must be an integer, got {image_id!r}")
            question = _question(q["question"])
            if not isinstance(question_id, int | str) or question_id not in table:
                raise BadEntry(f"question_id {question_id!r} has no annotation in {annotations}")
            ann_source, ann = table[question_id]
            if ann.get("image_id", image_id) != image_id:
                raise BadEntry(f"image_id {image_id}, but {ann_source} has {ann['image_id']!r}")
            try:
                answers = _answers(ann["answers"])
            except BadEntry as e:
                raise BadEntry(f"{ann_source}: {e}") from e
            image = images.image(file_name(image_id))
            yield VQASample(image, question, answers, source)
        except BadEntry as e:
            yield f"{source}: {e}"
