"""Telling caption data from VQA data, so each loader can say "pass --task vqa" (or the
reverse) instead of failing on the first field it does not expect.

Data is never silently loaded as the other task: the model decides the task (train.py --task
auto reads it from the checkpoint), and a caption model cannot learn from questions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CAPTION_KEYS = ("text", "caption", "captions")


def vqa_message(path: Path | str, why: str) -> str:
    """The error of VQA data given to the caption loader."""
    return f"{path}: this looks like VQA data ({why}): pass --task vqa (with a VQA model)"


def caption_message(path: Path | str, why: str) -> str:
    """The error of caption data given to the VQA loader."""
    return (f"{path}: this looks like caption data ({why}), not VQA: pass --task caption "
            "(with a captioning model)")


def vqa_record(record: dict[str, Any]) -> str | None:
    """Why one JSON object (a JSONL line, a per-image record) looks like VQA, or None."""
    if any(k in record for k in CAPTION_KEYS):
        return None
    if "question" in record:
        return "a 'question' field and no caption"
    if "questions" in record:
        return "a 'questions' list and no caption"
    return None


def caption_record(record: dict[str, Any]) -> str | None:
    """Why one JSON object looks like caption data, or None."""
    if "question" in record or "questions" in record:
        return None
    found = [k for k in CAPTION_KEYS if k in record]
    return f"a '{found[0]}' field and no question" if found else None


def vqa_json(data: Any) -> str | None:
    """Why a whole .json file looks like VQA data, or None."""
    if isinstance(data, dict):
        if isinstance(data.get("questions"), list) and "data_subtype" in data:
            return "a VQA v2 questions file"
        anns = data.get("annotations")
        if "images" not in data and isinstance(anns, list) and anns and \
                isinstance(anns[0], dict) and "question_id" in anns[0]:
            return "a VQA v2 annotations file"
        return vqa_record(data)
    if isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
        why = next((vqa_record(d) for d in data if vqa_record(d)), None)
        return f"per-image records with {why}" if why else None
    return None


def caption_json(data: Any) -> str | None:
    """Why a whole .json file looks like caption data, or None."""
    if isinstance(data, dict):
        if "images" in data and "annotations" in data:
            return "a COCO captions file"
        captions = all(isinstance(v, str) or (isinstance(v, list) and
                       all(isinstance(c, str) for c in v)) for v in data.values())
        if data and captions and not {"questions", "annotations"} & data.keys():
            return "a captions map {image: caption}"
        return None
    records = isinstance(data, list) and data and all(isinstance(d, dict) for d in data)
    if records and all(caption_record(d) for d in data[:10]):
        return "a list of {image, caption} records (Karpathy split)"
    return None


def vqa_folder(root: Path) -> str | None:
    """Why a folder looks like per-image VQA records, or None."""
    if any(root.glob("*.json")) or any(root.glob("*/*.json")):
        return "a folder of per-image .json files"
    return None


def caption_folder(root: Path) -> str | None:
    """Why a folder looks like a caption/ + Image/ tree, or None."""
    if (root / "caption").is_dir() and (root / "Image").is_dir():
        return "a caption/ + Image/ folder tree"
    return None
