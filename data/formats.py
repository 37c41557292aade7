"""Load image-caption datasets from the formats users bring into one flat list of CaptionSample.

Format detection, from the path alone:
  * a ``.jsonl`` file: one JSON object per line, ``{"image": "a.png", "text": "a caption"}``.
    ``text`` may be a list of captions; "caption"/"captions" are accepted for ``text`` and
    "file_name"/"path" for ``image`` (one of each, not two). Blank lines are ignored, extra
    fields allowed; a string ``split`` field is carried into the samples.
  * a ``.json`` file holding an object with both "images" and "annotations" keys: COCO captions,
    ``images = [{"id", "file_name"}]`` and ``annotations = [{"image_id", "caption"}]``.
    Images without annotations yield nothing (COCO test splits list such images).
  * any other ``.json`` file holding an object: a captions map ``{"a.png": caption or [captions]}``;
    keys may carry a relative sub-path ("images/a.png").
  * a directory holding ``caption/`` and ``Image/``: each ``caption/<name>.txt`` holds captions,
    one per non-empty line, for every image in ``Image/<name>/``. Every caption file needs a
    non-empty image folder and every image folder a caption file, so no image goes unused.
Anything else is a DataFormatError that lists the accepted formats.

Image paths in the JSON formats are relative to ``image_root`` when given, else to the JSON
file's directory; for COCO without ``image_root``, the first of ``<dir>``, ``<dir>/images``,
``<dir>/<split>``, ``<dir>/../<split>``, ``<dir>/../images`` holding the first listed image is
used, where ``<split>`` is what follows the last "_" of the file name (captions_val2017.json ->
val2017, the official COCO layout). Folder trees ignore hidden files (".DS_Store"). Captions
are stripped of surrounding whitespace. Samples come in file order (folder trees: sorted names).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = (
    "a .jsonl file of {'image': ..., 'text': ...} lines, a .json captions map "
    "{'image': caption(s)}, a COCO captions .json, or a directory holding caption/<name>.txt "
    "and Image/<name>/"
)
MAX_LISTED_ERRORS = 10  # in the message of the raised DataFormatError
TEXT_KEYS = ("text", "caption", "captions")
IMAGE_KEYS = ("image", "file_name", "path")


class DataFormatError(ValueError):
    """A dataset file or sample that cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class CaptionSample:
    """One (image, caption) pair; an image with several captions gives several samples."""

    image: Path  # resolved path of the image file
    text: str
    source: str  # "file:line", "file#key" or "file#annotations[i]", for error messages
    split: str | None = None  # the JSONL "split" field, if any


@dataclass
class SkipReport:
    """Bad entries skipped with skip_bad_samples=True: how many, and the first messages.

    An entry is a JSONL line, a captions-map key, a COCO annotation, or in a folder tree one
    image (with all its captions) or one caption file / image folder.
    """

    count: int = 0
    messages: list[str] = field(default_factory=list)
    max_messages: int = 20

    def add(self, message: str) -> None:
        """Count one skipped entry, keeping its message if fewer than max_messages are kept."""
        self.count += 1
        if len(self.messages) < self.max_messages:
            self.messages.append(message)

    def summary(self) -> str:
        """A human-readable account: the count, then the kept messages one per line."""
        if self.count == 0:
            return "skipped 0 bad entries"
        shown = "" if self.count <= len(self.messages) else f" (first {len(self.messages)})"
        return f"skipped {self.count} bad entries{shown}:\n  " + "\n  ".join(self.messages)


class _BadEntry(Exception):
    """One entry is unusable; the loader reports it (or skips it) and goes on."""


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

    Missing images are always errors; check_images also opens each image once and verifies it.
    Bad entries raise one DataFormatError listing the first few, or with skip_bad_samples are
    skipped and counted in the SkipReport. A dataset left with no samples raises either way.
    """
    path = Path(path)
    check = functools.cache(functools.partial(_image_problem, verify=check_images))
    if path.is_dir():
        if image_root is not None:
            raise DataFormatError(f"{path}: image_root applies to JSON/JSONL files, not folders")
        entries = _read_folder(path, check)
    elif not path.exists():
        raise DataFormatError(f"{path}: no such file or directory")
    elif path.suffix.lower() == ".jsonl":
        entries = _read_jsonl(path, _base_dir(path, image_root), check)
    elif path.suffix.lower() == ".json":
        entries = _read_json(path, image_root, check)
    else:
        raise DataFormatError(f"{path}: unknown dataset format; expected {ACCEPTED_FORMATS}")

    return collect(path, entries, skip_bad_samples)


def collect(path: Path, entries: Iterable[Any],
            skip_bad_samples: bool) -> tuple[list[Any], SkipReport]:
    """Samples of ``entries`` (each a sample, a list of samples, or an error message): errors
    raise together, or with skip_bad_samples are skipped, counted and logged."""
    samples: list[Any] = []
    errors: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            errors.append(entry)
        elif isinstance(entry, list):
            samples.extend(entry)
        else:
            samples.append(entry)
    report = SkipReport()
    if errors and not skip_bad_samples:
        listed = "\n  ".join(errors[:MAX_LISTED_ERRORS])
        more = len(errors) - MAX_LISTED_ERRORS
        listed += f"\n  ... and {more} more" if more > 0 else ""
        raise DataFormatError(
            f"{len(errors)} bad entries in {path} (skip_bad_samples=True skips them):\n  {listed}"
        )
    for message in errors:
        report.add(message)
    if report.count:
        logger.warning("%s: %s", path, report.summary())
    if not samples:
        why = f"; {report.summary()}" if report.count else ""
        raise DataFormatError(f"{path}: dataset has no samples{why}")
    return samples, report


def load_image(path: Path) -> Image.Image:
    """Read an image as RGB, transparency composited onto white; DataFormatError if unreadable."""
    try:
        with Image.open(path) as image:
            # Same as transformers.image_transforms.convert_to_rgb, so training sees the pixels
            # the BLIP processor would produce from the same file at inference.
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return image.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on corrupt files
        raise DataFormatError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def _image_problem(path: Path, verify: bool) -> str | None:
    """Why the image at path is unusable, or None; verify() checks integrity without decoding."""
    if not path.exists():
        return f"not found (looked for {path})"
    if not path.is_file():
        return f"is not a file ({path})"
    if verify:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as e:  # PIL raises OSError, SyntaxError, struct.error... on corrupt files
            return f"cannot be read ({type(e).__name__}: {e})"
    return None


def _read_text(path: Path) -> str:
    """The file as text (utf-8, BOM tolerated: Windows editors write one)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: cannot read ({e})") from e


def _base_dir(path: Path, image_root: str | Path | None) -> Path:
    """The directory that relative image paths of a JSON/JSONL file start from."""
    if image_root is None:
        return path.parent
    if not Path(image_root).is_dir():
        raise DataFormatError(f"image_root {image_root} is not a directory")
    return Path(image_root)


def _one_of(record: dict[str, Any], keys: tuple[str, ...], what: str) -> Any:
    """The value of the single key of record among keys; two of them would be ambiguous."""
    found = [k for k in keys if k in record]
    if not found:
        raise _BadEntry(f"no {what} (expected one of the keys {', '.join(keys)})")
    if len(found) > 1:
        raise _BadEntry(f"ambiguous {what}: both '{found[0]}' and '{found[1]}' given")
    return record[found[0]]


def _captions(value: Any) -> list[str]:
    """A caption or a non-empty list of captions, as stripped non-empty strings."""
    captions = value if isinstance(value, list) else [value]
    if not captions:
        raise _BadEntry("empty list of captions")
    for c in captions:
        if not isinstance(c, str):
            raise _BadEntry(f"caption must be a string, got {type(c).__name__}")
        if not c.strip():
            raise _BadEntry("empty caption")
    return [c.strip() for c in captions]


def _sample_image(value: Any, base: Path, check: Callable[[Path], str | None]) -> Path:
    """The resolved image path of an entry, after checking the image is usable."""
    if not isinstance(value, str) or not value.strip():
        raise _BadEntry(f"image must be a non-empty string, got {value!r}")
    image = (base / value).resolve()  # an absolute value replaces base
    problem = check(image)
    if problem:
        raise _BadEntry(f"image '{value}' {problem}")
    return image


def read_jsonl(path: Path, make: Callable[[dict[str, Any], str, str | None], Any]) -> Iterator:
    """Entries of a JSONL file, one per non-blank line: ``make(record, source, split)``, or the
    error message of a bad line (``make`` raises _BadEntry for bad fields)."""
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028, which would shift lines.
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise _BadEntry(f"invalid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict):
                raise _BadEntry(f"expected a JSON object, got {type(record).__name__}")
            split = record.get("split")
            if split is not None and not isinstance(split, str):
                raise _BadEntry(f"split must be a string, got {type(split).__name__}")
            yield make(record, source, split)
        except _BadEntry as e:
            yield f"{source}: {e}"


def _read_jsonl(path: Path, base: Path, check: Callable[[Path], str | None]) -> Iterator[_Entry]:
    """Caption entries of a JSONL file: each line's captions of one image."""

    def make(record: dict[str, Any], source: str, split: str | None) -> list[CaptionSample]:
        captions = _captions(_one_of(record, TEXT_KEYS, "caption"))
        image = _sample_image(_one_of(record, IMAGE_KEYS, "image"), base, check)
        return [CaptionSample(image, c, source, split) for c in captions]

    return read_jsonl(path, make)


def _read_json(
    path: Path, image_root: str | Path | None, check: Callable[[Path], str | None]
) -> Iterator[_Entry]:
    """Entries of a COCO captions file or of a captions map, told apart by their keys."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(data, dict):
        raise DataFormatError(
            f"{path}: expected a JSON object (captions map or COCO), got {type(data).__name__}; "
            "a list of records belongs in a .jsonl file, one per line"
        )
    if "images" in data and "annotations" in data:
        yield from _read_coco(path, data, image_root, check)
        return
    base = _base_dir(path, image_root)
    for key, value in data.items():
        source = f"{path}#{key}"
        try:
            captions = _captions(value)
            image = _sample_image(key, base, check)
            yield [CaptionSample(image, c, source) for c in captions]
        except _BadEntry as e:
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
    base = _coco_root(path, image_root, next(iter(file_names.values()), None))
    for i, ann in enumerate(annotations):
        source = f"{path}#annotations[{i}]"
        try:
            if not isinstance(ann, dict):
                raise _BadEntry(f"expected a JSON object, got {type(ann).__name__}")
            if "image_id" not in ann or "caption" not in ann:
                raise _BadEntry("expected the keys 'image_id' and 'caption'")
            image_id = ann["image_id"]
            if not isinstance(image_id, int | str) or image_id not in file_names:
                raise _BadEntry(f"image_id {image_id!r} is not in 'images'")
            captions = _captions(ann["caption"])
            image = _sample_image(file_names[image_id], base, check)
            yield [CaptionSample(image, c, source) for c in captions]
        except _BadEntry as e:
            yield f"{source}: {e}"


def _coco_root(path: Path, image_root: str | Path | None, first_file: str | None) -> Path:
    """The image directory of a COCO file: image_root, else the first candidate holding an image."""
    if image_root is not None or first_file is None:
        return _base_dir(path, image_root)
    d, split = path.parent, path.stem.rsplit("_", 1)[-1]
    for root in (d, d / "images", d / split, d.parent / split, d.parent / "images"):
        if (root / first_file).is_file():
            return root
    return d  # errors then say where the images were looked for


def _visible(directory: Path) -> list[Path]:
    """Sorted entries of a directory, without hidden files (.DS_Store, ._a.png)."""
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def _read_folder(root: Path, check: Callable[[Path], str | None]) -> Iterator[_Entry]:
    """Entries of a caption/<name>.txt + Image/<name>/ tree: one per image, per caption file."""
    caption_dir, image_dir = root / "caption", root / "Image"
    if not (caption_dir.is_dir() and image_dir.is_dir()):
        hints = sorted(p.name for p in root.glob("*.json*") if p.suffix in (".json", ".jsonl"))
        hint = f" (did you mean one of its files: {', '.join(hints)}?)" if hints else ""
        raise DataFormatError(
            f"{root}: a directory dataset needs caption/ and Image/ subdirectories{hint}; "
            f"accepted: {ACCEPTED_FORMATS}"
        )
    names = set()
    for txt in _visible(caption_dir):
        try:
            if txt.suffix.lower() != ".txt" or not txt.is_file():
                raise _BadEntry("not a .txt caption file")
            names.add(txt.stem)
            try:
                lines = txt.read_text(encoding="utf-8-sig").split("\n")
            except (OSError, UnicodeDecodeError) as e:
                raise _BadEntry(f"cannot read ({e})") from e
            captions = [(n, c.strip()) for n, c in enumerate(lines, start=1) if c.strip()]
            folder = image_dir / txt.stem
            if not captions:
                raise _BadEntry("no captions (no non-empty line)")
            if not folder.is_dir() or not _visible(folder):
                raise _BadEntry(f"no images: {folder} is missing or empty")
        except _BadEntry as e:
            yield f"{txt}: {e}"
            continue
        for image in _visible(folder):
            resolved = image.resolve()
            problem = check(resolved)
            if problem:
                yield f"{folder}: image '{image.name}' {problem}"
            else:
                yield [CaptionSample(resolved, c, f"{txt}:{n}") for n, c in captions]
    # Images no caption file points at would otherwise be dropped without a word.
    for entry in _visible(image_dir):
        if not entry.is_dir():
            yield f"{entry}: not inside an Image/<name>/ folder, so it has no caption file"
        elif entry.name not in names:
            yield f"{entry}: no caption file {caption_dir / entry.name}.txt for its images"
