"""Tests for data/formats.py: every format, path resolution, and each kind of bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from data.formats import (
    CaptionSample,
    DataFormatError,
    SkipReport,
    load_caption_samples,
    load_image,
)


def png(path: Path, color: tuple[int, ...] = (255, 0, 0), mode: str = "RGB") -> Path:
    """Write a tiny PNG (creating parent folders) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (4, 4), color).save(path)
    return path


def write_jsonl(path: Path, lines: list[object]) -> Path:
    """Write one line per item: dicts as JSON, strings verbatim (for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def pairs(samples: list[CaptionSample]) -> list[tuple[Path, str]]:
    return [(s.image, s.text) for s in samples]


# ---- JSONL ----------------------------------------------------------------------------------


def test_jsonl_pairs_aliases_several_captions_and_split(tmp_path):
    a, b, c = png(tmp_path / "img/a.png"), png(tmp_path / "img/b.png"), png(tmp_path / "c.png")
    ann = write_jsonl(tmp_path / "annotations.jsonl", [
        {"image": "img/a.png", "text": "a red square", "split": "normal", "extra": 1},
        "",
        {"file_name": "img/b.png", "captions": ["first", "  second  ", "first"]},
        {"path": str(c), "caption": "absolute path"},
    ])
    samples, report = load_caption_samples(ann)
    assert pairs(samples) == [
        (a.resolve(), "a red square"),
        (b.resolve(), "first"), (b.resolve(), "second"), (b.resolve(), "first"),  # dups kept
        (c.resolve(), "absolute path"),
    ]
    assert [s.split for s in samples] == ["normal", None, None, None, None]
    assert [s.source for s in samples] == [f"{ann}:1"] + [f"{ann}:3"] * 3 + [f"{ann}:4"]
    assert report == SkipReport()


def test_jsonl_paths_relative_to_file_not_cwd(tmp_path, monkeypatch):
    png(tmp_path / "ds/image_train/x.png")
    write_jsonl(tmp_path / "ds/annotations.jsonl", [{"image": "image_train/x.png", "text": "t"}])
    monkeypatch.chdir(tmp_path)
    samples, _ = load_caption_samples("ds/annotations.jsonl")
    assert samples[0].image == (tmp_path / "ds/image_train/x.png").resolve()
    assert samples[0].image.is_absolute()


def test_image_root_overrides_the_base_directory(tmp_path):
    png(tmp_path / "pics/x.png")
    ann = write_jsonl(tmp_path / "meta/a.jsonl", [{"image": "x.png", "text": "t"}])
    (samples, _) = load_caption_samples(ann, image_root=tmp_path / "pics")
    assert samples[0].image == (tmp_path / "pics/x.png").resolve()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"image": "a.png", "text": "ok"', "invalid JSON"),
        ('["a.png", "cap"]', "expected a JSON object"),
        ('{"image": "a.png"}', "no caption"),
        ('{"text": "cap"}', "no image"),
        ('{"image": "a.png", "text": 3}', "caption must be a string"),
        ('{"image": "a.png", "text": "   "}', "empty caption"),
        ('{"image": "a.png", "text": []}', "empty list of captions"),
        ('{"image": "a.png", "text": ["ok", ""]}', "empty caption"),
        ('{"image": "a.png", "text": "x", "caption": "y"}', "ambiguous caption"),
        ('{"image": 5, "text": "cap"}', "image must be a non-empty string"),
        ('{"image": "a.png", "text": "cap", "split": 1}', "split must be a string"),
        ('{"image": "nope/x.png", "text": "cap"}', "image 'nope/x.png' not found"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, expected):
    png(tmp_path / "a.png")
    ann = write_jsonl(tmp_path / "annotations.jsonl", [{"image": "a.png", "text": "ok"}, "", line])
    with pytest.raises(DataFormatError, match=expected) as e:
        load_caption_samples(ann)
    assert f"annotations.jsonl:3: {expected}" in str(e.value)


def test_errors_are_collected_and_listed_up_to_a_limit(tmp_path):
    png(tmp_path / "a.png")
    bad = [{"image": f"missing{i}.png", "text": "t"} for i in range(12)]
    ann = write_jsonl(tmp_path / "a.jsonl", [{"image": "a.png", "text": "ok"}, *bad])
    with pytest.raises(DataFormatError) as e:
        load_caption_samples(ann)
    msg = str(e.value)
    assert msg.startswith(f"12 bad entries in {ann}")
    assert "a.jsonl:2: image 'missing0.png' not found" in msg
    assert "a.jsonl:11:" in msg and "a.jsonl:12:" not in msg
    assert "... and 2 more" in msg


def test_skip_bad_samples_skips_and_counts_exactly(tmp_path, caplog):
    png(tmp_path / "a.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    ann = write_jsonl(tmp_path / "a.jsonl", [
        {"image": "a.png", "text": ["one", "two"]},
        "{broken",
        {"image": "gone.png", "text": ["x", "y"]},  # one bad line = one skip, whatever its captions
        {"image": "corrupt.png", "text": "z"},
        {"image": "a.png", "text": "three"},
    ])
    with caplog.at_level(logging.WARNING):
        samples, report = load_caption_samples(ann, skip_bad_samples=True)
    assert [s.text for s in samples] == ["one", "two", "three"]
    assert report.count == 3
    assert [m.split(": ")[0] for m in report.messages] == [f"{ann}:{n}" for n in (2, 3, 4)]
    assert report.summary().startswith("skipped 3 bad entries:")
    assert "skipped 3 bad entries" in caplog.text  # never a silent drop


def test_skip_report_keeps_only_the_first_messages():
    report = SkipReport(max_messages=2)
    for i in range(5):
        report.add(f"m{i}")
    assert report.count == 5 and report.messages == ["m0", "m1"]
    assert report.summary() == "skipped 5 bad entries (first 2):\n  m0\n  m1"


def test_corrupt_image_detected_only_when_checking(tmp_path):
    (tmp_path / "x.png").write_bytes(bytes(range(256)) * 4)  # random bytes with a .png name
    ann = write_jsonl(tmp_path / "a.jsonl", [{"image": "x.png", "text": "t"}])
    with pytest.raises(DataFormatError, match=r"a\.jsonl:1: image 'x\.png' cannot be read"):
        load_caption_samples(ann)
    samples, _ = load_caption_samples(ann, check_images=False)
    assert len(samples) == 1
    with pytest.raises(DataFormatError, match=r"x\.png: cannot read image"):
        load_image(samples[0].image)


def test_truncated_png_detected(tmp_path):
    data = png(tmp_path / "x.png", mode="RGB").read_bytes()
    (tmp_path / "x.png").write_bytes(data[: len(data) - 20])  # IEND and part of IDAT gone
    ann = write_jsonl(tmp_path / "a.jsonl", [{"image": "x.png", "text": "t"}])
    with pytest.raises(DataFormatError, match="cannot be read"):
        load_caption_samples(ann)


def test_empty_dataset_is_an_error(tmp_path):
    ann = tmp_path / "a.jsonl"
    ann.write_text("\n\n")
    with pytest.raises(DataFormatError, match="no samples"):
        load_caption_samples(ann)
    write_jsonl(ann, [{"image": "gone.png", "text": "t"}])  # all skipped: still an error
    with pytest.raises(DataFormatError, match=r"no samples.*skipped 1 bad entries"):
        load_caption_samples(ann, skip_bad_samples=True)


# ---- captions.json map ----------------------------------------------------------------------


def test_captions_map(tmp_path):
    a, b = png(tmp_path / "a.png"), png(tmp_path / "images/b.png")
    cap = tmp_path / "captions.json"
    cap.write_text(json.dumps({"a.png": "one", "images/b.png": ["two", "three"]}))
    samples, _ = load_caption_samples(cap)
    assert pairs(samples) == [(a.resolve(), "one"), (b.resolve(), "two"), (b.resolve(), "three")]
    assert samples[1].source == f"{cap}#images/b.png"


def test_captions_map_bad_entries(tmp_path):
    png(tmp_path / "a.png")
    cap = tmp_path / "captions.json"
    cap.write_text(json.dumps({"a.png": "ok", "b.png": "gone", "a.png ": 7}))
    with pytest.raises(DataFormatError, match=r"captions\.json#b\.png: image 'b\.png' not found"):
        load_caption_samples(cap)
    samples, report = load_caption_samples(cap, skip_bad_samples=True)
    assert len(samples) == 1 and report.count == 2


def test_invalid_or_unrecognized_json_file(tmp_path):
    bad = tmp_path / "captions.json"
    bad.write_text('{"a.png": "x",\n "b.png" "y"}')
    with pytest.raises(DataFormatError, match=r"captions\.json:2: invalid JSON"):
        load_caption_samples(bad, skip_bad_samples=True)  # a broken file is never skippable
    bad.write_text('"a caption"')
    with pytest.raises(DataFormatError, match=r"captions\.json: expected a JSON object.*got str"):
        load_caption_samples(bad)


# ---- COCO -----------------------------------------------------------------------------------


def coco(path: Path, images: list[dict], annotations: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path


COCO_IMAGES = [{"id": 7, "file_name": "a.png"}, {"id": 3, "file_name": "b.png"},
               {"id": 9, "file_name": "unannotated.png"}]
COCO_ANNS = [{"id": 1, "image_id": 3, "caption": "b one"}, {"id": 2, "image_id": 7, "caption": "a"},
             {"id": 3, "image_id": 3, "caption": "b two "}]


def test_coco_images_next_to_json(tmp_path):
    a, b = png(tmp_path / "a.png"), png(tmp_path / "b.png")
    ann = coco(tmp_path / "captions.json", COCO_IMAGES, COCO_ANNS)
    samples, _ = load_caption_samples(ann)
    assert pairs(samples) == [(b.resolve(), "b one"), (a.resolve(), "a"), (b.resolve(), "b two")]
    assert samples[2].source == f"{ann}#annotations[2]"


def test_coco_official_layout_and_image_root(tmp_path):
    # annotations/captions_val2017.json with images in the sibling folder val2017/
    a, b = png(tmp_path / "val2017/a.png"), png(tmp_path / "val2017/b.png")
    ann = coco(tmp_path / "annotations/captions_val2017.json", COCO_IMAGES, COCO_ANNS)
    samples, _ = load_caption_samples(ann)
    assert pairs(samples)[:2] == [(b.resolve(), "b one"), (a.resolve(), "a")]
    png(tmp_path / "elsewhere/a.png"), png(tmp_path / "elsewhere/b.png")
    samples, _ = load_caption_samples(ann, image_root=tmp_path / "elsewhere")
    assert samples[1].image == (tmp_path / "elsewhere/a.png").resolve()
    with pytest.raises(DataFormatError, match=r"image_root .* is not a directory"):
        load_caption_samples(ann, image_root=tmp_path / "nowhere")


def test_coco_bad_annotations(tmp_path):
    png(tmp_path / "a.png")
    anns = [{"image_id": 7, "caption": "a"}, {"image_id": 42, "caption": "x"},
            {"image_id": 7}, {"image_id": 7, "caption": ""}, {"image_id": 3, "caption": "b"}]
    ann = coco(tmp_path / "c.json", COCO_IMAGES[:2], anns)
    with pytest.raises(DataFormatError) as e:
        load_caption_samples(ann)
    msg = str(e.value)
    assert "c.json#annotations[1]: image_id 42 is not in 'images'" in msg
    assert "c.json#annotations[2]: expected the keys 'image_id' and 'caption'" in msg
    assert "c.json#annotations[3]: empty caption" in msg
    assert "c.json#annotations[4]: image 'b.png' not found" in msg
    samples, report = load_caption_samples(ann, skip_bad_samples=True)
    assert [s.text for s in samples] == ["a"] and report.count == 4


def test_coco_broken_image_table_is_fatal(tmp_path):
    ann = coco(tmp_path / "c.json", [{"id": 1}], [])
    with pytest.raises(DataFormatError, match=r"c\.json#images\[0\]"):
        load_caption_samples(ann, skip_bad_samples=True)
    coco(ann, [{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}], [])
    with pytest.raises(DataFormatError, match="duplicate image id 1"):
        load_caption_samples(ann)


# ---- folder tree ----------------------------------------------------------------------------


def folder_tree(root: Path) -> Path:
    (root / "caption").mkdir(parents=True)
    (root / "caption/cat.txt").write_text("a cat\n\n  a small cat  \n")
    (root / "caption/dog.txt").write_text("a dog")
    for name in ("cat/2.png", "cat/1.png", "dog/x.jpg"):
        png(root / "Image" / name)
    (root / "Image/cat/.DS_Store").write_bytes(b"junk")  # hidden files are ignored
    return root


def test_folder_tree(tmp_path):
    root = folder_tree(tmp_path / "ds")
    samples, _ = load_caption_samples(root)
    img = (root / "Image").resolve()
    assert pairs(samples) == [
        (img / "cat/1.png", "a cat"), (img / "cat/1.png", "a small cat"),
        (img / "cat/2.png", "a cat"), (img / "cat/2.png", "a small cat"),
        (img / "dog/x.jpg", "a dog"),
    ]
    assert [s.source for s in samples[:2]] == [f"{root}/caption/cat.txt:1",
                                               f"{root}/caption/cat.txt:3"]


def test_folder_tree_problems(tmp_path):
    root = folder_tree(tmp_path / "ds")
    (root / "Image/cat/3.png").write_bytes(b"not a png")
    (root / "caption/bird.txt").write_text("a bird\n")  # no Image/bird/
    (root / "caption/empty.txt").write_text("\n \n")
    png(root / "Image/empty/e.png")
    png(root / "Image/fish/f.png")  # no caption/fish.txt
    png(root / "Image/loose.png")
    with pytest.raises(DataFormatError) as e:
        load_caption_samples(root)
    msg = str(e.value)
    assert msg.startswith("5 bad entries")  # Image/empty/ is reported as caption/empty.txt
    assert "caption/bird.txt: no images" in msg
    assert "caption/empty.txt: no captions" in msg
    assert "Image/cat: image '3.png' cannot be read" in msg
    assert "Image/fish: no caption file" in msg and "Image/loose.png: not inside" in msg
    samples, report = load_caption_samples(root, skip_bad_samples=True)
    assert len(samples) == 5 and report.count == 5


def test_folder_tree_lines_of_only_invisible_characters_are_not_captions(tmp_path):
    root = folder_tree(tmp_path / "ds")
    (root / "caption/dog.txt").write_text("\u200b\u00ad\n\ufeff\u200b\n")  # zero-width, soft hyphen
    with pytest.raises(DataFormatError, match=r"caption/dog.txt: no captions"):
        load_caption_samples(root)
    (root / "caption/dog.txt").write_text("\u200b\na dog\n")
    samples, _ = load_caption_samples(root)
    assert [(s.text, s.source.rsplit("/", 1)[1]) for s in samples if "dog" in s.source] == [
        ("a dog", "dog.txt:2")]


def test_directory_without_caption_and_image_is_rejected(tmp_path):
    png(tmp_path / "image_train/a.png")
    write_jsonl(tmp_path / "annotations.jsonl", [{"image": "image_train/a.png", "text": "t"}])
    (tmp_path / "caption").mkdir()  # caption/ alone is not enough
    with pytest.raises(DataFormatError, match=r"caption/ and Image/.*annotations\.jsonl.*accepted"):
        load_caption_samples(tmp_path)


# ---- detection and load_image ---------------------------------------------------------------


def test_unknown_format_and_missing_path(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("image,text\n")
    with pytest.raises(DataFormatError, match=r"data\.csv: unknown dataset format.*\.jsonl"):
        load_caption_samples(csv)
    with pytest.raises(DataFormatError, match="no such file"):
        load_caption_samples(tmp_path / "missing.jsonl")


def test_load_image_returns_rgb_with_transparency_on_white(tmp_path):
    gray = load_image(png(tmp_path / "g.png", color=128, mode="L"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (128, 128, 128)
    clear = load_image(png(tmp_path / "t.png", color=(255, 0, 0, 0), mode="RGBA"))
    assert clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(DataFormatError, match=r"nope\.png"):
        load_image(tmp_path / "nope.png")
