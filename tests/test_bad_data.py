"""Data that is subtly wrong (issue 13, points 3 and 10): each is one bad entry naming file:line,
skipped and counted with skip_bad_samples, else one DataFormatError; through the real CLI, exit
status 2 with no traceback. Also what decoding images costs (validation decodes every image)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_model_dir
from PIL import Image

from data.formats import DataFormatError, load_caption_samples, load_image
from data.vqa_formats import load_vqa_samples

ROOT = Path(__file__).resolve().parents[1]


def png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def good_line(name: str = "ok.png") -> str:
    return json.dumps({"image": name, "text": "a red cube"})


def truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def bad_idat_png(path: Path) -> None:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 4
    data[start + 10:start + 60] = bytes(50)  # zlib stream broken, header and CRC layout intact
    path.write_bytes(bytes(data))


def symlink_loop(path: Path) -> None:
    os.symlink(path.name, path)


# name -> (how to write the bad line's image or the line itself, expected message part)
def bad_jsonl(tmp_path: Path, kind: str) -> Path:
    """data.jsonl: a good line, then the bad one on line 2, then a good line."""
    png(tmp_path / "ok.png")
    bad = good_line("bad.png")
    raw: bytes | None = None
    if kind == "truncated_jpeg":
        truncated_jpeg(tmp_path / "bad.png")
    elif kind == "bad_png_idat":
        bad_idat_png(tmp_path / "bad.png")
    elif kind == "symlink_loop":
        symlink_loop(tmp_path / "bad.png")
    elif kind == "non_utf8":
        raw = b'{"image": "ok.png", "text": "caf\xe9"}'
    elif kind == "deep_nesting":
        bad = '{"image": "ok.png", "text": "t", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    elif kind == "huge_int":
        bad = '{"image": "ok.png", "text": "t", "id": ' + "7" * 5000 + "}"
    elif kind == "zero_width_caption":
        bad = json.dumps({"image": "ok.png", "text": "\u200b\u00ad\u200d \ufeff"})
    elif kind == "duplicate_key":
        bad = '{"image": "ok.png", "text": "one", "text": "two"}'
    lines = [good_line().encode(), raw if raw is not None else bad.encode(), good_line().encode()]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


KINDS = ["truncated_jpeg", "bad_png_idat", "symlink_loop", "non_utf8", "deep_nesting",
         "huge_int", "zero_width_caption", "duplicate_key"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_line_is_one_entry_naming_file_and_line(tmp_path, kind):
    path = bad_jsonl(tmp_path, kind)
    with pytest.raises(DataFormatError, match=r"(?s)1 bad entries in .*data\.jsonl:2: ") as e:
        load_caption_samples(path)
    assert "--skip-bad-samples" in str(e.value)
    samples, report = load_caption_samples(path, skip_bad_samples=True)
    assert len(samples) == 2 and report.count == 1
    assert "data.jsonl:2:" in report.messages[0]


def test_duplicate_key_in_captions_map_names_the_line(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "captions.json").write_text('{\n "a.png": "one",\n "a.png": "two"\n}\n')
    with pytest.raises(DataFormatError, match=r"captions\.json:3: key 'a\.png' given twice"):
        load_caption_samples(tmp_path / "captions.json")


def test_duplicate_key_in_per_image_vqa_file_is_a_bad_entry(tmp_path):
    png(tmp_path / "a/img.png")
    png(tmp_path / "b/img.png")
    good = '{"image": "img.png", "questions": [{"question": "q", "answer": "a"}]}'
    (tmp_path / "a/data.json").write_text(good)
    (tmp_path / "b/data.json").write_text(good[:-1] + ', "image": "img.png"}')
    with pytest.raises(DataFormatError, match=r"b/data\.json:1: key 'image' given twice"):
        load_vqa_samples(tmp_path)
    samples, report = load_vqa_samples(tmp_path, skip_bad_samples=True)
    assert len(samples) == 1 and report.count == 1


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(values).save(tmp_path / "deep.png")  # mode I;16
    pixels = np.asarray(load_image(tmp_path / "deep.png"))
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 8, 3)
    np.testing.assert_allclose(pixels[..., 0], values / 257, atol=1)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 10))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    shown = load_image(tmp_path / "rot.jpg")
    assert shown.size == (10, 20)
    top = np.asarray(shown)[2, 5]
    assert top[2] > 200 and top[0] < 60  # the blue half is on top once turned


def vqa_questions_file(tmp_path: Path) -> Path:
    png(tmp_path / "COCO_train2014_000000000001.jpg")
    (tmp_path / "v2_mscoco_train2014_annotations.json").write_text(json.dumps(
        {"annotations": [{"question_id": 1, "image_id": 1, "answers": [{"answer": "red"}]}]}))
    path = tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json"
    path.write_text(json.dumps({"data_subtype": "train2014", "questions": [
        {"image_id": 1, "question": "what colour?", "question_id": 1}]}))
    return path


def vqa_folder(tmp_path: Path) -> Path:
    png(tmp_path / "set/001/image.png")
    (tmp_path / "set/001/data.json").write_text(json.dumps(
        {"image": "image.png", "questions": [{"question": "what colour?", "answer": "red"}]}))
    return tmp_path / "set"


def vqa_jsonl(tmp_path: Path) -> Path:
    png(tmp_path / "a.png")
    path = tmp_path / "vqa.jsonl"
    path.write_text(json.dumps({"image": "a.png", "question": "q?", "answer": "red"}) + "\n")
    return path


@pytest.mark.parametrize("make", [vqa_questions_file, vqa_folder, vqa_jsonl])
def test_vqa_data_given_to_the_caption_loader_says_pass_task_vqa(tmp_path, make):
    with pytest.raises(DataFormatError, match=r"this looks like VQA data \(.*\): pass --task vqa"):
        load_caption_samples(make(tmp_path))


def test_caption_data_given_to_the_vqa_loader_says_so(tmp_path):
    path = bad_jsonl(tmp_path, "none")
    with pytest.raises(DataFormatError, match=r"data\.jsonl:1: this looks like caption data"):
        load_vqa_samples(path)
    png(tmp_path / "b.png")
    (tmp_path / "captions.json").write_text(json.dumps({"b.png": "a cube"}))
    with pytest.raises(DataFormatError, match=r"captions\.json: this looks like caption data"):
        load_vqa_samples(tmp_path / "captions.json")


def test_missing_image_lists_every_place_tried_and_suggests_image_root(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data/mine.jsonl").write_text(good_line("pics/x.png") + "\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataFormatError) as e:
        load_caption_samples("data/mine.jsonl")
    message = str(e.value)
    assert "data/mine.jsonl:1: image 'pics/x.png' not found" in message
    for tried in ["data/pics/x.png", "data/images/pics/x.png", f"{tmp_path}/pics/x.png",
                  f"{tmp_path}/images/pics/x.png"]:
        assert tried in message
    assert "--image-root" in message


@pytest.fixture(scope="module")
def caption_model(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("m") / "caption")


def run_train(model: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    out = data.parent / "run"
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--model", str(model), "--train-file", str(data),
         "--stop-after-steps", "1", "--eval-file", "none", "--val-fraction", "0",
         "--batch-size", "2", "--output-dir", str(out), "--threads", "1", *extra],
        capture_output=True, text=True, cwd=data.parent, timeout=300)


@pytest.mark.parametrize("kind", ["truncated_jpeg", "symlink_loop", "non_utf8", "deep_nesting",
                                  "huge_int", "zero_width_caption", "duplicate_key"])
def test_cli_bad_line_exits_2_naming_file_line_and_flag(tmp_path, caption_model, kind):
    data = bad_jsonl(tmp_path, kind)
    done = run_train(caption_model, data)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "data.jsonl:2:" in done.stderr and "--skip-bad-samples" in done.stderr


def test_cli_skip_bad_samples_trains_and_names_the_skipped_line(tmp_path, caption_model):
    done = run_train(caption_model, bad_jsonl(tmp_path, "bad_png_idat"), "--skip-bad-samples")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped 1 bad entries" in done.stderr + done.stdout
    assert "data.jsonl:2:" in done.stderr + done.stdout


@pytest.mark.parametrize("make", [vqa_questions_file, vqa_folder])
def test_cli_vqa_data_without_task_vqa_exits_2(tmp_path, caption_model, make):
    data = make(tmp_path)
    done = run_train(caption_model, data)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "looks like VQA data" in done.stderr and "--task vqa" in done.stderr
    assert data.name in done.stderr
