"""A candidate answer list for rank-based VQA decoding (--answer-list): read and checked.

Two layouts: a ``.json`` file holding a JSON list of strings (BLIP's ``answer_list.json``), or
any other file with one answer per line (blank lines ignored). Answers are stripped; a repeated
answer is kept once, at its first place, so every candidate is distinct.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from data.errors import DataFormatError

log = logging.getLogger(__name__)


def _json_answers(path: Path, text: str) -> list[tuple[str, str]]:
    """(where, answer) of a JSON list of strings."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); an answer list is "
                              "a JSON list of strings, or a text file with one answer per "
                              "line") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of answer strings, got "
                              f"{type(data).__name__}")
    for i, answer in enumerate(data):
        if not isinstance(answer, str):
            raise DataFormatError(f"{path}[{i}]: answers must be strings, got {answer!r:.40}")
    return [(f"{path}[{i}]", a) for i, a in enumerate(data)]


def read_answer_list(path: str | Path) -> list[str]:
    """The distinct, stripped answers of an answer-list file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"answer list {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"answer list {path}: not UTF-8 text ({e.reason})") from None
    if path.suffix.lower() == ".json":
        entries = _json_answers(path, text)
    else:
        entries = [(f"{path}:{n}", line) for n, line in enumerate(text.splitlines(), 1)
                   if line.strip()]
    answers: dict[str, None] = {}
    for where, answer in entries:
        if not answer.strip():
            raise DataFormatError(f"{where}: empty answer")
        answers.setdefault(answer.strip())
    if not answers:
        raise DataFormatError(f"answer list {path}: no answers")
    if len(answers) < len(entries):
        log.info("answer list %s: %d repeated answers kept once", path,
                 len(entries) - len(answers))
    return list(answers)
