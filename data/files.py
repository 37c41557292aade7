"""Reading dataset files safely and finding the images they name: the layer under both the
caption loaders (data/formats.py) and the VQA loaders (data/vqa_formats.py).

Every problem is reported with its place: ``file:line`` for JSON and JSONL. A JSON object with
a key given twice, a line that is not UTF-8, nested too deep (RecursionError) or holding an
integer beyond Python's digit limit (ValueError) is a bad entry, never a traceback.

Image paths: an absolute path is used as is. A relative one is looked up under ``image_root``
when given, else under, in order: the data file's folder, each parent folder up to the working
directory (when the file lies inside it), then the working directory, each of these folders
also through its ``images/`` subfolder, then the loader's own extra folders (COCO's
``<split>/``). The first existing file wins. When none exists, the first such entry lists every
place tried and suggests ``--image-root``.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from data.errors import BadEntry, DataFormatError

MAX_TRIED_SHOWN = 12  # places listed for the first image that is found nowhere


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook: json keeps the last of two equal keys, silently dropping the first."""
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


def parse_json(text: str) -> Any:
    """Parse JSON text; BadEntry (with a line number when known) for anything unusable."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise BadEntry(f"{e.lineno}:invalid JSON ({e.msg} at column {e.colno})") from e
    except _DuplicateKey as e:
        quoted = json.dumps(e.key)
        first = text.find(quoted)
        second = text.find(quoted, first + 1)
        line = text.count("\n", 0, second) + 1 if second >= 0 else 1
        raise BadEntry(f"{line}:key '{e.key}' given twice") from e
    except RecursionError as e:
        raise BadEntry("1:invalid JSON (nested too deeply)") from e
    except ValueError as e:  # int() digit limit (5,000-digit numbers), Python 3.11+
        raise BadEntry(f"1:invalid JSON ({e})") from e


def _split_location(path: Path, error: BadEntry, line_offset: int = 0) -> str:
    """'file:line: message' from a parse_json error ('line:message')."""
    line, _, message = str(error).partition(":")
    return f"{path}:{int(line) + line_offset}: {message}"


def read_json(path: Path) -> Any:
    """A whole JSON file, parsed; BadEntry whose message starts with ``file:line:``."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadEntry(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        text = data.decode("utf-8-sig")  # a BOM tolerated: Windows editors write one
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise BadEntry(f"{path}:{line}: not UTF-8 (byte {data[e.start]:#04x})") from e
    try:
        return parse_json(text)
    except BadEntry as e:
        raise BadEntry(_split_location(path, e)) from e


def read_json_file(path: Path) -> Any:
    """read_json for a file that is the whole dataset: any problem is a DataFormatError."""
    try:
        return read_json(path)
    except BadEntry as e:
        raise DataFormatError(str(e)) from e


def jsonl_lines(path: Path) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """(source 'file:line', record or error message) per non-blank line of a JSONL file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read ({e.strerror or e})") from e
    # Split on b"\n", not splitlines(): JSON strings may hold raw U+2028, which would shift lines.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if lineno == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # BOM
        if not raw.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield source, f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
            continue
        try:
            record = parse_json(line)
        except BadEntry as e:
            yield source, str(e).partition(":")[2]
            continue
        if not isinstance(record, dict):
            yield source, f"expected a JSON object, got {type(record).__name__}"
        else:
            yield source, record


def read_jsonl(path: Path, make: Callable[[dict[str, Any], str, str | None], Any]) -> Iterator:
    """Entries of a JSONL file, one per non-blank line: ``make(record, source, split)``, or the
    error message of a bad line (``make`` raises BadEntry for bad fields)."""
    for source, record in jsonl_lines(path):
        try:
            if isinstance(record, str):
                raise BadEntry(record)
            split = record.get("split")
            if split is not None and not isinstance(split, str):
                raise BadEntry(f"split must be a string, got {type(split).__name__}")
            yield make(record, source, split)
        except BadEntry as e:
            yield f"{source}: {e}"


def one_of(record: dict[str, Any], keys: tuple[str, ...], what: str) -> Any:
    """The value of the single key of record among keys; two of them would be ambiguous."""
    found = [k for k in keys if k in record]
    if not found:
        raise BadEntry(f"no {what} (expected one of the keys {', '.join(keys)})")
    if len(found) > 1:
        raise BadEntry(f"ambiguous {what}: both '{found[0]}' and '{found[1]}' given")
    return record[found[0]]


def visible_text(text: str) -> str:
    """``text`` without invisible characters (zero-width spaces, soft hyphens, BOMs: Unicode
    'Cf'), stripped: empty when nothing a reader would see is left."""
    return "".join(c for c in text if unicodedata.category(c) != "Cf").strip()


def clean_text(value: Any, what: str) -> str:
    """A caption, question or answer stripped; BadEntry if not a string or empty once
    invisible characters are removed (visible_text)."""
    if not isinstance(value, str):
        raise BadEntry(f"{what} must be a string, got {type(value).__name__}")
    text = value.strip()
    if not visible_text(text):
        raise BadEntry(f"empty {what}" + (" (only invisible characters)" if text else ""))
    return text


def visible_entries(directory: Path) -> list[Path]:
    """Sorted entries of a directory, without hidden files (.DS_Store, ._a.png)."""
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def search_dirs(folder: Path) -> list[Path]:
    """Folders a relative image path is looked up in, without image_root (module docstring)."""
    cwd = Path.cwd()
    folder = Path(os.path.abspath(folder))
    chain = [folder]
    if folder.is_relative_to(cwd):
        chain += [p for p in folder.parents if p.is_relative_to(cwd)]
    chain.append(cwd)
    return list(dict.fromkeys(d for f in chain for d in (f, f / "images")))


class ImagePaths:
    """Finds and checks the images a data file names (module docstring for where it looks)."""

    def __init__(self, data_file: Path, image_root: str | Path | None,
                 check: Callable[[Path], str | None], extra_dirs: tuple[Path, ...] = ()) -> None:
        if image_root is not None:
            if not Path(image_root).is_dir():
                raise DataFormatError(f"image_root {image_root} is not a directory "
                                      "(--image-root)")
            self.dirs = [Path(image_root)]
        else:
            self.dirs = list(dict.fromkeys([*search_dirs(data_file.parent), *extra_dirs]))
        self.check = check
        self.explained = False  # the first image found nowhere lists every place tried

    def find(self, value: str) -> Path | None:
        """The first existing candidate for a relative or absolute path, or None."""
        candidates = [Path(value)] if Path(value).is_absolute() else [d / value for d in self.dirs]
        for candidate in candidates:
            try:
                os.stat(candidate)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:  # a symlink loop (ELOOP), a name too long
                raise BadEntry(f"image '{value}' cannot be opened ({e.strerror}: "
                               f"{candidate})") from e
            return candidate.resolve()
        return None

    def image(self, value: Any) -> Path:
        """The resolved path of an entry's image, after checking it is usable."""
        if not isinstance(value, str) or not value.strip():
            raise BadEntry(f"image must be a non-empty string, got {value!r}")
        found = self.find(value)
        if found is None:
            raise BadEntry(f"image '{value}' not found {self.where(value)}")
        problem = self.check(found)
        if problem:
            raise BadEntry(f"image '{value}' {problem}")
        return found

    def where(self, value: str) -> str:
        """Every place tried the first time (with the way out), a short note afterwards."""
        if Path(value).is_absolute():
            return f"(looked for {value})"
        if self.explained:
            return f"(in any of the {len(self.dirs)} places listed for the first missing image)"
        self.explained = True
        tried = [str(d / value) for d in self.dirs]
        more = len(tried) - MAX_TRIED_SHOWN
        shown = ", ".join(tried[:MAX_TRIED_SHOWN]) + (f", ... {more} more" if more > 0 else "")
        return (f"(looked for {shown}); pass --image-root <the folder the image paths are "
                "relative to>")
