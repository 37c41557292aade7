"""Tests for data/vqa_formats.py: every format, path resolution, and each kind of bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from data.formats import DataFormatError, SkipReport
from data.vqa_formats import VQASample, load_vqa_samples


def image(path: Path) -> Path:
    """Write a tiny PNG or JPEG (by suffix, creating parent folders) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (255, 0, 0)).save(path)
    return path


def write_jsonl(path: Path, lines: list[object]) -> Path:
    """Write one line per item: dicts as JSON, strings verbatim (for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def triples(samples: list[VQASample]) -> list[tuple[Path, str, tuple[str, ...]]]:
    return [(s.image, s.question, s.answers) for s in samples]


# ---- JSONL ----------------------------------------------------------------------------------


def test_jsonl_answers_aliases_and_split(tmp_path):
    a, b = image(tmp_path / "img/a.png"), image(tmp_path / "b.jpg")
    ann = write_jsonl(tmp_path / "vqa.jsonl", [
        {"image": "img/a.png", "question": " What color? ", "answer": "red", "split": "train"},
        "",
        {"file_name": "b.jpg", "question": "How many?", "answer": ["one", " 1 "]},
        {"path": str(b), "question": "Shape?", "answers": ["square", "box"]},
        {"image": "img/a.png", "question": "Is it red?", "answers": [{"answer": "yes"},
                                                                      {"answer": "yeah"}]},
    ])
    samples, report = load_vqa_samples(ann)
    a, b = a.resolve(), b.resolve()
    assert triples(samples) == [
        (a, "What color?", ("red",)),
        (b, "How many?", ("one", "1")),
        (b, "Shape?", ("square", "box")),
        (a, "Is it red?", ("yes", "yeah")),
    ]
    assert [s.split for s in samples] == ["train", None, None, None]
    assert [s.source for s in samples] == [f"{ann}:{n}" for n in (1, 3, 4, 5)]
    assert report == SkipReport()


def test_jsonl_paths_relative_to_file_and_image_root(tmp_path, monkeypatch):
    image(tmp_path / "ds/images/x.png")
    image(tmp_path / "pics/x.png")
    ann = write_jsonl(tmp_path / "ds/vqa.jsonl", [{"image": "images/x.png", "question": "q",
                                                   "answer": "a"}])
    monkeypatch.chdir(tmp_path)
    samples, _ = load_vqa_samples("ds/vqa.jsonl")
    assert samples[0].image == (tmp_path / "ds/images/x.png").resolve()
    write_jsonl(ann, [{"image": "x.png", "question": "q", "answer": "a"}])
    samples, _ = load_vqa_samples(ann, image_root=tmp_path / "pics")
    assert samples[0].image == (tmp_path / "pics/x.png").resolve()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"image": "a.png", "question": "q", "answer": "a"', "invalid JSON"),
        ('["a.png", "q", "a"]', "expected a JSON object"),
        ('{"image": "a.png", "answer": "a"}', "no question"),
        ('{"image": "a.png", "question": "  ", "answer": "a"}', "empty question"),
        ('{"image": "a.png", "question": "q"}', "no answer"),
        ('{"image": "a.png", "question": "q", "answer": "x", "answers": ["y"]}', "ambiguous"),
        ('{"image": "a.png", "question": "q", "answer": " "}', "empty answer"),
        ('{"image": "a.png", "question": "q", "answers": []}', "empty list of answers"),
        ('{"image": "a.png", "question": "q", "answers": [{"ans": "x"}]}', "answer must be"),
        ('{"image": "a.png", "question": "q", "answer": 3}', "answer must be a string"),
        ('{"question": "q", "answer": "a"}', "no image"),
        ('{"image": "a.png", "question": "q", "answer": "a", "split": 1}', "split must be"),
        ('{"image": "gone.png", "question": "q", "answer": "a"}', "image 'gone.png' not found"),
        ('{"image": "bad.png", "question": "q", "answer": "a"}', "image 'bad.png' cannot be read"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, expected):
    image(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    ok = {"image": "a.png", "question": "q", "answer": "a"}
    ann = write_jsonl(tmp_path / "vqa.jsonl", [ok, "", line])
    with pytest.raises(DataFormatError) as e:
        load_vqa_samples(ann)
    assert f"vqa.jsonl:3: {expected}" in str(e.value)


def test_skip_bad_samples_counts_exactly(tmp_path, caplog):
    image(tmp_path / "a.png")
    ann = write_jsonl(tmp_path / "vqa.jsonl", [
        {"image": "a.png", "question": "q1", "answer": ["x", "y"]},
        "{broken",
        {"image": "gone.png", "question": "q2", "answer": "z"},
        {"image": "a.png", "question": "q3", "answer": ""},
        {"image": "a.png", "question": "q4", "answer": "w"},
    ])
    with caplog.at_level(logging.WARNING):
        samples, report = load_vqa_samples(ann, skip_bad_samples=True)
    assert [s.question for s in samples] == ["q1", "q4"]
    assert report.count == 3
    assert [m.split(": ")[0] for m in report.messages] == [f"{ann}:{n}" for n in (2, 3, 4)]
    assert "skipped 3 bad entries" in caplog.text  # never a silent drop


def test_empty_dataset_is_an_error(tmp_path):
    ann = tmp_path / "vqa.jsonl"
    ann.write_text("\n\n")
    with pytest.raises(DataFormatError, match="no samples"):
        load_vqa_samples(ann)
    write_jsonl(ann, [{"image": "gone.png", "question": "q", "answer": "a"}])
    with pytest.raises(DataFormatError, match=r"no samples.*skipped 1 bad entries"):
        load_vqa_samples(ann, skip_bad_samples=True)


# ---- per-image JSON -------------------------------------------------------------------------


def per_image(path: Path, img: str, questions: list[object]) -> Path:
    return write_json(path, [{"path": img}, {"questions": questions}])


def test_per_image_file(tmp_path):
    a = image(tmp_path / "ds/pics/a.png")
    f = per_image(tmp_path / "ds/a.json", "pics/a.png", [
        {"question": "Color?", "answer": "red"},
        {"question": "Count?", "answer": ["one", "1"]},
    ])
    samples, _ = load_vqa_samples(f)
    assert triples(samples) == [(a.resolve(), "Color?", ("red",)),
                                (a.resolve(), "Count?", ("one", "1"))]
    assert [s.source for s in samples] == [f"{f}#questions[0]", f"{f}#questions[1]"]


def test_per_image_directory_sorted_each_file_relative_to_itself(tmp_path):
    b, a = image(tmp_path / "b.png"), image(tmp_path / "sub/a.png")
    per_image(tmp_path / "2.json", "b.png", [{"question": "qb", "answer": "ab"}])
    per_image(tmp_path / "1.json", "sub/a.png", [{"question": "qa", "answer": ["x", "y"]}])
    (tmp_path / "notes.txt").write_text("ignored, like the images")
    samples, _ = load_vqa_samples(tmp_path)
    assert triples(samples) == [(a.resolve(), "qa", ("x", "y")), (b.resolve(), "qb", ("ab",))]


def test_per_image_bad_files_and_questions(tmp_path):
    image(tmp_path / "a.png")
    per_image(tmp_path / "1.json", "a.png", [{"question": "ok", "answer": "a"},
                                              {"question": "q"}, "text", {"answer": "a"}])
    (tmp_path / "2.json").write_text('[{"path": "a.png"},\n {"questions" []}]')
    per_image(tmp_path / "3.json", "gone.png", [{"question": "q", "answer": "a"}] * 3)
    write_json(tmp_path / "4.json", [{"path": "a.png"}, {"path": "a.png", "questions": []}])
    write_json(tmp_path / "5.json", {"path": "a.png"})
    with pytest.raises(DataFormatError) as e:
        load_vqa_samples(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"7 bad entries in {tmp_path}")
    for expected in [
        "1.json#questions[1]: no answer",
        "1.json#questions[2]: expected a JSON object",
        "1.json#questions[3]: no question",
        "2.json:2: invalid JSON",
        "3.json: image 'gone.png' not found",  # one entry for all its questions
        "4.json: key 'path' given twice",
        "5.json: expected a non-empty 'questions' list",
    ]:
        assert f"{tmp_path}/{expected}" in msg
    samples, report = load_vqa_samples(tmp_path, skip_bad_samples=True)
    assert [s.question for s in samples] == ["ok"] and report.count == 7


def test_directory_without_json_files(tmp_path):
    image(tmp_path / "a.png")
    with pytest.raises(DataFormatError, match=r"no \.json files"):
        load_vqa_samples(tmp_path)


# ---- VQA v2 ---------------------------------------------------------------------------------

TEN = ["yes", "yes", "yeah", "yes", "no", "yes", "yes", "yep", "yes", "sure"]


def vqa_v2(root: Path, questions: list[dict], annotations: list[dict],
           q_name: str = "v2_OpenEnded_mscoco_val2014_questions.json",
           a_name: str = "v2_mscoco_val2014_annotations.json") -> Path:
    """Write a VQA v2 questions + annotations pair (official names) and return the questions."""
    write_json(root / a_name, {"annotations": annotations})
    return write_json(root / q_name, {"data_subtype": "val2014", "questions": questions})


def answered(question_id: int, image_id: int, answers: list[str]) -> dict:
    return {"question_id": question_id, "image_id": image_id, "multiple_choice_answer": "yes",
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(answers)]}


def test_vqa_v2_ten_answers_in_order_with_sibling_annotations_and_image_root(tmp_path):
    img = image(tmp_path / "val2014/COCO_val2014_000000000042.jpg")
    q = vqa_v2(tmp_path / "meta", [
        {"image_id": 42, "question": "Is it red?", "question_id": 420},
        {"image_id": 42, "question": "What shape?", "question_id": 421},
    ], [answered(421, 42, ["square"]), answered(420, 42, TEN)])
    samples, _ = load_vqa_samples(q, image_root=tmp_path / "val2014")
    assert triples(samples) == [(img.resolve(), "Is it red?", tuple(TEN)),
                                (img.resolve(), "What shape?", ("square",))]
    assert samples[0].source == f"{q}#questions[0]"


def test_vqa_v2_images_beside_explicit_annotations_and_no_subtype(tmp_path):
    img = image(tmp_path / "000000000007.jpg")  # COCO 2017 naming when no data_subtype
    write_json(tmp_path / "answers.json", {"annotations": [answered(1, 7, ["a"])]})
    q = write_json(tmp_path / "Questions.json",
                   {"questions": [{"image_id": 7, "question": "q", "question_id": 1}]})
    samples, _ = load_vqa_samples(q, annotations=tmp_path / "answers.json")
    assert triples(samples) == [(img.resolve(), "q", ("a",))]
    (tmp_path / "answers.json").rename(tmp_path / "Annotations.json")  # the plain sibling
    assert load_vqa_samples(q)[0] == samples


def test_vqa_v2_missing_annotations_or_images_are_explained(tmp_path):
    q = write_json(tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json", {
        "data_subtype": "test2015",
        "questions": [{"image_id": 1, "question": "q", "question_id": 1}]})
    with pytest.raises(DataFormatError, match=r"no VQA v2 annotations.*test splits") as e:
        load_vqa_samples(q)
    assert "v2_mscoco_test2015_annotations.json" in str(e.value)
    write_json(tmp_path / "v2_mscoco_test2015_annotations.json",
               {"annotations": [answered(1, 1, ["a"])]})
    missing = r"COCO_test2015_000000000001\.jpg not found \(looked for .*--image-root"
    with pytest.raises(DataFormatError, match=missing):
        load_vqa_samples(q)
    with pytest.raises(DataFormatError, match=r"image_root .* is not a directory"):
        load_vqa_samples(q, image_root=tmp_path / "nowhere")


def test_vqa_v2_bad_questions_name_their_index(tmp_path):
    image(tmp_path / "COCO_val2014_000000000001.jpg")
    (tmp_path / "COCO_val2014_000000000003.jpg").write_bytes(b"corrupt")
    q = vqa_v2(tmp_path, [
        {"image_id": 1, "question": "ok", "question_id": 1},
        {"image_id": 1, "question": "q", "question_id": 99},
        {"image_id": 1, "question_id": 2},
        {"image_id": 1, "question": "q", "question_id": 3},
        {"image_id": 2, "question": "q", "question_id": 4},
        {"image_id": 3, "question": "q", "question_id": 5},
        {"image_id": 1, "question": "q", "question_id": 6},
        {"image_id": "1", "question": "q", "question_id": 7},
    ], [answered(1, 1, ["a"]), answered(2, 1, ["a"]), answered(3, 1, ["a", " "]),
        answered(4, 2, ["a"]), answered(5, 3, ["a"]), answered(6, 5, ["a"]),
        answered(7, 1, ["a"])])
    with pytest.raises(DataFormatError) as e:
        load_vqa_samples(q)
    ann = tmp_path / "v2_mscoco_val2014_annotations.json"
    for expected in [
        f"#questions[1]: question_id 99 has no annotation in {ann}",
        "#questions[2]: missing key(s) question",
        f"#questions[3]: {ann}#annotations[2]: empty answer",
        "#questions[4]: image 'COCO_val2014_000000000002.jpg' not found",
        "#questions[5]: image 'COCO_val2014_000000000003.jpg' cannot be read",
        f"#questions[6]: image_id 1, but {ann}#annotations[5] has 5",
        "#questions[7]: image_id must be an integer",
    ]:
        assert f"{q}{expected}" in str(e.value)
    samples, report = load_vqa_samples(q, skip_bad_samples=True)
    assert [s.question for s in samples] == ["ok"] and report.count == 7


def test_vqa_v2_broken_annotation_table_is_fatal(tmp_path):
    image(tmp_path / "COCO_val2014_000000000001.jpg")
    question = {"image_id": 1, "question": "q", "question_id": 1}
    q = vqa_v2(tmp_path, [question], [answered(1, 1, ["a"]), answered(1, 1, ["b"])])
    with pytest.raises(DataFormatError, match=r"annotations\.json#annotations\[1\]: duplicate"):
        load_vqa_samples(q, skip_bad_samples=True)
    q = vqa_v2(tmp_path, [question], [{"question_id": 1}])
    with pytest.raises(DataFormatError, match=r"annotations\[0\]: expected"):
        load_vqa_samples(q, skip_bad_samples=True)


# ---- detection ------------------------------------------------------------------------------


def test_unknown_layouts_and_misplaced_arguments(tmp_path):
    with pytest.raises(DataFormatError, match="no such file"):
        load_vqa_samples(tmp_path / "gone.jsonl")
    with pytest.raises(DataFormatError, match="unknown dataset format"):
        load_vqa_samples(write_json(tmp_path / "a.csv", {}))
    with pytest.raises(DataFormatError, match=r"unknown VQA layout.*annotations file"):
        load_vqa_samples(write_json(tmp_path / "ann.json", {"annotations": []}))
    (tmp_path / "x.json").write_text('{"questions":\n ]')
    with pytest.raises(DataFormatError, match=r"x\.json:2: invalid JSON"):
        load_vqa_samples(tmp_path / "x.json")
    image(tmp_path / "a.png")
    ann = write_jsonl(tmp_path / "v.jsonl", [{"image": "a.png", "question": "q", "answer": "a"}])
    with pytest.raises(DataFormatError, match="applies to VQA v2"):
        load_vqa_samples(ann, annotations=tmp_path / "ann.json")
