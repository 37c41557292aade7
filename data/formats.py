"""Load image-caption datasets from the formats users bring into one flat list of CaptionSample.

Format detection, from the path (and, for a ``.json`` file, its top-level JSON type):
  * a ``.jsonl`` file: one JSON object per line, ``{"image": "a.png", "text": "a caption"}``.
    ``text`` may be a list of captions; "caption"/"captions" are accepted for ``text`` and
    "file_name"/"path" for ``image`` (one of each, not two). Blank lines are ignored, extra
    fields allowed; a string ``split`` field is carried into the samples.
  * a ``.json`` file holding an object with both "images" and "annotations" keys: COCO captions,
    ``images = [{"id", "file_name"}]`` and ``annotations = [{"image_id", "caption"}]``.
    Images without annotations yield nothing (COCO test splits list such images).
  * a ``.json`` file holding a list: the LAVIS / BLIP Karpathy split,
    ``[{"image": "val2014/a.jpg", "caption": caption or [captions], "image_id": ...}]``.
  * any other ``.json`` file holding an object: a captions map ``{"a.png": caption or [captions]}``;
    keys may carry a relative sub-path ("images/a.png").
  * a directory holding ``caption/`` and ``Image/``: each ``caption/<name>.txt`` holds captions,
    one per non-empty line, for every image in ``Image/<name>/``. Every caption file needs a
    non-empty image folder and every image folder a caption file, so no image goes unused.
VQA data (a VQA v2 file, per-image question records, JSONL lines with a question and no
caption) is a DataFormatError saying "pass --task vqa" (data/detect.py); anything else is a
DataFormatError that lists the accepted formats.

Image paths are found as data/files.py says (the data file's folder, its parents up to the
working directory, the working directory, each with its ``images/``; or ``image_root``). COCO
and Karpathy files also look in ``<dir>/<split>``, ``<dir>/../<split>`` and ``<dir>/..``, where
``<split>`` is what follows the last "_" of the file name (captions_val2017.json -> val2017, the
official COCO layout). Folder trees ignore hidden files (".DS_Store"). Captions are stripped of
surrounding whitespace; one of only invisible characters is empty. Samples come in file order
(folder trees: sorted names).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data import detect
from data.errors import BadEntry, DataFormatError, SkipReport, collect
from data.files import (
    ImagePaths,
    clean_text,
    jsonl_lines,
    one_of,
    read_json_file,
    read_jsonl,
    visible_entries,
    visible_text,
)
from data.images import image_problem, load_image

# Public names kept where callers (train.py, models/tasks.py, tests) import them from.
__all__ = ["ACCEPTED_FORMATS", "CaptionSample", "DataFormatError", "SkipReport", "collect",
           "jsonl_lines", "load_caption_samples", "load_image", "read_jsonl"]

ACCEPTED_FORMATS = (
    "a .jsonl file of {'image': ..., 'text': ...} lines, a .json captions map "
    "{'image': caption(s)}, a COCO captions .json, a Karpathy-split .json list "
    "[{'image': ..., 'caption': ...}], or a directory holding caption/<name>.txt and Image/<name>/"
)
TEXT_KEYS = detect.CAPTION_KEYS
IMAGE_KEYS = ("image", "file_name", "path")


@dataclass(frozen=True)
class CaptionSample:
    """One (image, caption) pair; an image with several captions gives several samples."""

    image: Path  # resolved path of the image file
    text: str
    source: str  # "file:line", "file#key" or "file#annotations[i]", for error messages
    split: str | None = None  # the JSONL "split" field, if any


# An entry's samples, or the message saying why the entry is bad.
_Entry = list[CaptionSample] | str


def load_caption_samples(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    skip_bad_samples: bool = False,
    check_images: bool = True,
) -> tuple[list[CaptionSample], SkipReport]:
    """Load every (image, caption) sample of a dataset in any accepted format (module docstring).

    Missing images are always errors; check_images also decodes each image once, exactly as
    training will. Bad entries raise one DataFormatError listing the first few, or with
    skip_bad_samples are skipped and counted in the SkipReport. A dataset left with no samples
    raises either way.
    """
    path = Path(path)
    check = functools.cache(functools.partial(image_problem, decode=check_images))
    if path.is_dir():
        if image_root is not None:
            raise DataFormatError(f"{path}: image_root applies to JSON/JSONL files, not folders")
        entries = _read_folder(path, check)
    elif not path.exists():
        raise DataFormatError(f"{path}: no such file or directory")
    elif path.suffix.lower() == ".jsonl":
        entries = _read_jsonl(path, ImagePaths(path, image_root, check))
    elif path.suffix.lower() == ".json":
        entries = _read_json(path, image_root, check)
    else:
        raise DataFormatError(f"{path}: unknown dataset format; expected {ACCEPTED_FORMATS}")
    return collect(path, entries, skip_bad_samples)


def _captions(value: Any) -> list[str]:
    """A caption or a non-empty list of captions, as stripped non-empty strings."""
    captions = value if isinstance(value, list) else [value]
    if not captions:
        raise BadEntry("empty list of captions")
    return [clean_text(c, "caption") for c in captions]


def _read_jsonl(path: Path, images: ImagePaths) -> Iterator[_Entry]:
    """Caption entries of a JSONL file: each line's captions of one image."""

    def make(record: dict[str, Any], source: str, split: str | None) -> list[CaptionSample]:
        why = detect.vqa_record(record)
        if why:  # fatal: every other line is VQA too
            raise DataFormatError(detect.vqa_message(source, why))
        captions = _captions(one_of(record, TEXT_KEYS, "caption"))
        image = images.image(one_of(record, IMAGE_KEYS, "image"))
        return [CaptionSample(image, c, source, split) for c in captions]

    return read_jsonl(path, make)


def _extra_dirs(path: Path) -> tuple[Path, ...]:
    """COCO / Karpathy image folders beside the annotations (captions_val2017.json -> val2017/)."""
    d, split = path.parent, path.stem.rsplit("_", 1)[-1]
    return (d / split, d.parent / split, d.parent, d.parent / "images")


def _read_json(
    path: Path, image_root: str | Path | None, check: Callable[[Path], str | None]
) -> Iterator[_Entry]:
    """Entries of a COCO file, a Karpathy list or a captions map, told apart by their shape."""
    data = read_json_file(path)
    why = detect.vqa_json(data)
    if why:
        raise DataFormatError(detect.vqa_message(path, why))
    if isinstance(data, list):
        yield from _read_karpathy(path, data, ImagePaths(path, image_root, check,
                                                         _extra_dirs(path)))
        return
    if not isinstance(data, dict):
        raise DataFormatError(
            f"{path}: expected a JSON object (captions map or COCO) or a list of "
            f"{{'image', 'caption'}} records, got {type(data).__name__}"
        )
    if "images" in data and "annotations" in data:
        yield from _read_coco(path, data, image_root, check)
        return
    images = ImagePaths(path, image_root, check)
    for key, value in data.items():
        source = f"{path}#{key}"
        try:
            captions = _captions(value)
            image = images.image(key)
            yield [CaptionSample(image, c, source) for c in captions]
        except BadEntry as e:
            yield f"{source}: {e}"


def _read_karpathy(path: Path, data: list[Any], images: ImagePaths) -> Iterator[_Entry]:
    """Entries of a LAVIS / BLIP Karpathy-split list, one per record (``file#[i]``)."""
    for i, record in enumerate(data):
        source = f"{path}#[{i}]"
        try:
            if not isinstance(record, dict):
                raise BadEntry(f"expected a JSON object, got {type(record).__name__}")
            captions = _captions(one_of(record, TEXT_KEYS, "caption"))
            image = images.image(one_of(record, IMAGE_KEYS, "image"))
            yield [CaptionSample(image, c, source) for c in captions]
        except BadEntry as e:
            yield f"{source}: {e}"


def _read_coco(
    path: Path,
    data: dict[str, Any],
    image_root: str | Path | None,
    check: Callable[[Path], str | None],
) -> Iterator[_Entry]:
    """Entries of a COCO captions file, one per annotation."""
    images, annotations = data["images"], data["annotations"]
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DataFormatError(f"{path}: COCO 'images' and 'annotations' must be lists")
    file_names: dict[int | str, str] = {}
    for i, entry in enumerate(images):
        # A broken image table breaks every annotation pointing at it: fatal, never skipped.
        ok = isinstance(entry, dict) and isinstance(entry.get("file_name"), str)
        if not ok or not isinstance(entry.get("id"), int | str):
            raise DataFormatError(f"{path}#images[{i}]: expected {{'id': int, 'file_name': str}}")
        if entry["id"] in file_names:
            raise DataFormatError(f"{path}#images[{i}]: duplicate image id {entry['id']!r}")
        file_names[entry["id"]] = entry["file_name"]
    images = ImagePaths(path, image_root, check, _extra_dirs(path))
    for i, ann in enumerate(annotations):
        source = f"{path}#annotations[{i}]"
        try:
            if not isinstance(ann, dict):
                raise BadEntry(f"expected a JSON object, got {type(ann).__name__}")
            if "image_id" not in ann or "caption" not in ann:
                raise BadEntry("expected the keys 'image_id' and 'caption'")
            image_id = ann["image_id"]
            if not isinstance(image_id, int | str) or image_id not in file_names:
                raise BadEntry(f"image_id {image_id!r} is not in 'images'")
            captions = _captions(ann["caption"])
            image = images.image(file_names[image_id])
            yield [CaptionSample(image, c, source) for c in captions]
        except BadEntry as e:
            yield f"{source}: {e}"


def _read_folder(root: Path, check: Callable[[Path], str | None]) -> Iterator[_Entry]:
    """Entries of a caption/<name>.txt + Image/<name>/ tree: one per image, per caption file."""
    caption_dir, image_dir = root / "caption", root / "Image"
    if not (caption_dir.is_dir() and image_dir.is_dir()):
        why = detect.vqa_folder(root)
        if why:
            raise DataFormatError(detect.vqa_message(root, why))
        hints = sorted(p.name for p in root.glob("*.json*") if p.suffix in (".json", ".jsonl"))
        hint = f" (did you mean one of its files: {', '.join(hints)}?)" if hints else ""
        raise DataFormatError(
            f"{root}: a directory dataset needs caption/ and Image/ subdirectories{hint}; "
            f"accepted: {ACCEPTED_FORMATS}"
        )
    names = set()
    for txt in visible_entries(caption_dir):
        try:
            if txt.suffix.lower() != ".txt" or not txt.is_file():
                raise BadEntry("not a .txt caption file")
            names.add(txt.stem)
            try:
                lines = txt.read_text(encoding="utf-8-sig").split("\n")
            except (OSError, UnicodeDecodeError) as e:
                raise BadEntry(f"cannot read ({e})") from e
            # A line of only invisible characters is as empty as a blank one.
            captions = [(n, c.strip()) for n, c in enumerate(lines, start=1) if visible_text(c)]
            folder = image_dir / txt.stem
            if not captions:
                raise BadEntry("no captions (no non-empty line)")
            if not folder.is_dir() or not visible_entries(folder):
                raise BadEntry(f"no images: {folder} is missing or empty")
        except BadEntry as e:
            yield f"{txt}: {e}"
            continue
        for image in visible_entries(folder):
            resolved = image.resolve()
            problem = check(resolved)
            if problem:
                yield f"{folder}: image '{image.name}' {problem}"
            else:
                yield [CaptionSample(resolved, c, f"{txt}:{n}") for n, c in captions]
    # Images no caption file points at would otherwise be dropped without a word.
    for entry in visible_entries(image_dir):
        if not entry.is_dir():
            yield f"{entry}: not inside an Image/<name>/ folder, so it has no caption file"
        elif entry.name not in names:
            yield f"{entry}: no caption file {caption_dir / entry.name}.txt for its images"
