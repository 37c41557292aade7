"""Each data layout users bring, built in a temp dir in its real shape, read by train.py (2 steps)
and eval.py without --image-root: JSONL relative to the project root, captions.json + images/,
COCO, the LAVIS/BLIP Karpathy list, per-image VQA folders and official VQA v2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import COLOURS, write_tiny_model_dir
from PIL import Image

import eval as evaluate
import train
from data.formats import load_caption_samples
from data.vqa_formats import load_vqa_samples

N = 6


def colour(i: int) -> str:
    return list(COLOURS)[i % len(COLOURS)]


def picture(path: Path, i: int, suffix: str = ".png") -> Path:
    """A solid-colour image of sample i (creating parent folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), COLOURS[colour(i)]).save(path)
    return path


def dump(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def jsonl_from_project_root(root: Path) -> Path:
    """data/mine.jsonl naming images relative to the project root (image_train/x.png)."""
    rows = [{"image": str(picture(root / f"image_train/{i}.png", i).relative_to(root)),
             "caption": f"a {colour(i)} cube"} for i in range(N)]
    path = root / "data/mine.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def captions_json_with_sibling_images(root: Path) -> Path:
    """my_set/captions.json {"0.png": caption} with the images in my_set/images/."""
    for i in range(N):
        picture(root / f"my_set/images/{i}.png", i)
    captions = {f"{i}.png": f"a {colour(i)} cube" for i in range(N)}
    return dump(root / "my_set/captions.json", captions)


def coco(root: Path) -> Path:
    """coco/annotations/captions_train2017.json with the images in coco/train2017/."""
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(N)]
    for i in range(N):
        picture(root / f"coco/train2017/{i:012d}.jpg", i)
    anns = [{"id": 10 + i, "image_id": i, "caption": f"a {colour(i)} cube"} for i in range(N)]
    return dump(root / "coco/annotations/captions_train2017.json",
                {"images": images, "annotations": anns})


def karpathy(root: Path) -> Path:
    """LAVIS coco_karpathy_train.json: a list of {"image": "val2014/..", "caption", "image_id"}
    in coco/annotations/, the images under coco/images/val2014/ (captions: string or list)."""
    rows = []
    for i in range(N):
        name = f"val2014/COCO_val2014_{i:012d}.jpg"
        picture(root / "coco/images" / name, i)
        text = f"a {colour(i)} cube"
        rows.append({"image": name, "caption": [text, text] if i % 2 else text,
                     "image_id": f"coco_{i}"})
    return dump(root / "coco/annotations/coco_karpathy_train.json", rows)


def vqa_folders(root: Path) -> Path:
    """vqa_set/<id>/data.json + vqa_set/<id>/image.png, one folder per image."""
    for i in range(N):
        picture(root / f"vqa_set/{i:03d}/image.png", i)
        dump(root / f"vqa_set/{i:03d}/data.json",
             {"image": "image.png",
              "questions": [{"question": "what colour is the cube?", "answer": colour(i)}]})
    return root / "vqa_set"


def vqa_v2(root: Path) -> Path:
    """vqa/v2_OpenEnded_mscoco_train2014_questions.json + v2_mscoco_train2014_annotations.json,
    the images in vqa/train2014/ (the official download unpacked side by side)."""
    questions, anns = [], []
    for i in range(N):
        picture(root / f"vqa/train2014/COCO_train2014_{i:012d}.jpg", i)
        questions.append({"image_id": i, "question": "what colour is the cube?",
                          "question_id": 100 + i})
        anns.append({"question_id": 100 + i, "image_id": i,
                     "answers": [{"answer": colour(i)}] * 10})
    dump(root / "vqa/v2_mscoco_train2014_annotations.json", {"annotations": anns})
    return dump(root / "vqa/v2_OpenEnded_mscoco_train2014_questions.json",
                {"data_subtype": "train2014", "questions": questions})


LAYOUTS: dict[str, tuple[Callable[[Path], Path], str, int]] = {
    # name: (builder, task, samples it yields)
    "jsonl_from_project_root": (jsonl_from_project_root, "caption", N),
    "captions_json_sibling_images": (captions_json_with_sibling_images, "caption", N),
    "coco": (coco, "caption", N),
    "karpathy": (karpathy, "caption", N + N // 2),
    "vqa_folders": (vqa_folders, "vqa", N),
    "vqa_v2": (vqa_v2, "vqa", N),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    return {"caption": write_tiny_model_dir(base / "caption"),
            "vqa": write_tiny_model_dir(base / "vqa", vqa=True)}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_loader_reads_layout_from_project_root(tmp_path, monkeypatch, name):
    build, task, count = LAYOUTS[name]
    path = build(tmp_path)
    monkeypatch.chdir(tmp_path)
    load = load_vqa_samples if task == "vqa" else load_caption_samples
    samples, report = load(path.relative_to(tmp_path))
    assert len(samples) == count and report.count == 0
    assert all(s.image.is_file() and s.image.is_relative_to(tmp_path) for s in samples)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_train_and_eval_read_layout(tmp_path, monkeypatch, model_dirs, name):
    build, task, _ = LAYOUTS[name]
    path = build(tmp_path).relative_to(tmp_path)
    monkeypatch.chdir(tmp_path)
    adapter = train.main(["--model", str(model_dirs[task]), "--train-file", str(path),
                          "--stop-after-steps", "2", "--eval-file", "none", "--batch-size", "2",
                          "--val-fraction", "0", "--output-dir", "run"])
    assert Path(adapter).is_file()
    table = evaluate.main(["--adapter", str(adapter), "--eval-file", str(path),
                           "--out-dir", "e", "--no-report"])
    assert "base" in table and len(table) == 2
