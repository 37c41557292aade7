"""eval.py: base and adapters scored on the same set, deltas, JSON and Markdown outputs."""

import hashlib
import json

import pytest
import torch
from conftest import write_tiny_dataset, write_tiny_model_dir, write_tiny_vqa_dataset
from PIL import Image
from safetensors.torch import load_file

import eval as evaluate
import train
from evaluation.caption_metrics import meteor_available


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_eval_table_base_vs_adapter(tmp_path, task):
    model_dir = write_tiny_model_dir(tmp_path / "m", vqa=task == "vqa")
    make = write_tiny_vqa_dataset if task == "vqa" else write_tiny_dataset
    data = make(tmp_path / "d", n=6)
    adapter = train.main(["--model", str(model_dir), "--train-file", str(data), "--eval-file",
                          "none", "--epochs", "1", "--batch-size", "3", "--val-fraction", "0",
                          "--output-dir", str(tmp_path / "run")])
    table = evaluate.main(["--adapter", str(adapter), "--eval-file", str(data),
                           "--out-dir", str(tmp_path / "e")])
    assert list(table) == ["base", "run"]  # the run folder names the column
    expected = ({"exact_match", "token_F1"} if task == "vqa" else
                {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L",
                 "CIDEr-D", "exact_match"} | ({"METEOR"} if meteor_available() else set()))
    assert set(table["base"]) == expected == set(table["run"])
    saved = json.loads((tmp_path / "e/eval.json").read_text())["scores"]
    assert saved == table
    md = (tmp_path / "e/eval.md").read_text().splitlines()
    row = next(line for line in md if line.startswith("| exact_match |"))
    delta = table["run"]["exact_match"] - table["base"]["exact_match"]
    assert row.split("|")[-2].strip() == f"{delta:+.4f}"
    page = (tmp_path / "e/report.html").read_text()
    assert page.count("data:image/png;base64,") == 6  # one row per test image / question
    assert (tmp_path / "e/contact_sheet.png").stat().st_size > 0


def test_report_rows_grouped_and_embedded(tmp_path):
    from PIL import Image

    from evaluation.report import GROUPS, Row, write_contact_sheet, write_html

    for i in range(3):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    rows = [Row(tmp_path / "0.png", "", ["a red cube"], {"base": ("x", False), "a": ("y", True)}),
            Row(tmp_path / "1.png", "", ["b"], {"base": ("b", True), "a": ("b", True)}),
            Row(tmp_path / "2.png", "q?", ["c"], {"base": ("c", True), "a": ("z", False)})]
    assert [r.group() for r in rows] == list(GROUPS)
    page = write_html(rows, tmp_path / "r.html", "t <&>").read_text()
    assert page.count("src='data:image/png;base64,") == 3 and "t &lt;&amp;&gt;" in page
    assert [page.index(g) for g in GROUPS] == sorted(page.index(g) for g in GROUPS)
    assert page.count("class='ok'") == 4 and page.count("class='bad'") == 2  # per output
    sheet = Image.open(write_contact_sheet(rows, tmp_path / "s.png", columns=2, image_px=20))
    assert sheet.size == (2 * (2 * 20 + 16), 2 * (20 + 12 * 3 + 8))


def test_train_exact_match_equals_eval_exact_match(tmp_path):
    """One run: train.py's eval.json and eval.py's table score the same adapter the same way.

    The references are written from the adapter's own answers, in forms the two old definitions
    judged differently: "the <answer>" (articles), and the answer as a minority reference.
    """
    from models.api import Pipeline

    model_dir = write_tiny_model_dir(tmp_path / "m", vqa=True)
    data = write_tiny_vqa_dataset(tmp_path / "d", n=6)
    args = ["--model", str(model_dir), "--train-file", str(data), "--epochs", "1",
            "--batch-size", "3", "--val-fraction", "0", "--threads", "1"]
    first = train.main([*args, "--eval-file", "none", "--output-dir", str(tmp_path / "r1")])
    pipe = Pipeline(adapters=[first])
    samples = pipe.task.load_samples(data)[0]
    answers = pipe.task.predict_units(pipe.task.eval_units(samples), 32)
    # i % 3 == 0: right by its articles; 1: right as a minority answer; 2: wrong.
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    for i, (line, answer) in enumerate(zip(lines, answers, strict=True)):
        line.pop("answer")
        line["answers"] = [[f"the {answer}"], ["xyzzy", "xyzzy", answer], ["xyzzy"]][i % 3]
    variants = tmp_path / "d/variants.jsonl"
    variants.write_text("".join(json.dumps(x) + "\n" for x in lines))

    # The same seeded run again, now reporting on the variants at its end.
    adapter = train.main([*args, "--eval-file", str(variants), "--output-dir",
                          str(tmp_path / "r2")])
    again, before = load_file(adapter), load_file(first)  # (metadata may differ: paths)
    assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in again)
    trained = json.loads((tmp_path / "r2/eval.json").read_text())
    table = evaluate.main(["--adapter", str(adapter), "--eval-file", str(variants),
                           "--out-dir", str(tmp_path / "e")])
    assert trained["adapter"]["all"] == table["r2"]["exact_match"] == pytest.approx(4 / 6)
    assert trained["base"]["all"] == table["base"]["exact_match"]


def _eval(tmp_path, *args: str) -> dict:
    """eval.py on one thread, without the HTML report, captions of at most 4 tokens."""
    return evaluate.main([*args, "--threads", "1", "--device", "cpu", "--no-report",
                          "--max-new-tokens", "4"])


def _save_adapters(model_dir, paths_settings: dict) -> list:
    """A zero-delta adapter of the tiny model saved at each path with {"task", "prompt"}."""
    from transformers import BlipForConditionalGeneration

    from lora import LoRAConfig, inject_lora, save_adapter

    injection = inject_lora(BlipForConditionalGeneration.from_pretrained(model_dir),
                            LoRAConfig(r=2, alpha=4, targets=("attention.self.query",)))
    for path, extra in paths_settings.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_adapter(injection, path, base_model=str(model_dir), extra=extra)
    return list(paths_settings)


def test_eval_official_vqa_v2_layout(tmp_path):
    """COCO's layout: v2_OpenEnded_mscoco_val2014_questions.json beside its annotations file,
    images in val2014/: read with --task vqa --image-root; --annotations reaches the loader."""
    model_dir = write_tiny_model_dir(tmp_path / "m", vqa=True)
    (tmp_path / "coco/val2014").mkdir(parents=True)
    questions, annotations = [], []
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (32, 32), colour).save(
            tmp_path / f"coco/val2014/COCO_val2014_{i:012d}.jpg")
        questions.append({"image_id": i, "question": "what colour?", "question_id": 10 + i})
        annotations.append({"question_id": 10 + i, "image_id": i,
                            "answers": [{"answer": colour, "answer_id": k} for k in range(10)]})
    q = tmp_path / "coco/v2_OpenEnded_mscoco_val2014_questions.json"
    q.write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    (tmp_path / "coco/v2_mscoco_val2014_annotations.json").write_text(
        json.dumps({"annotations": annotations}))
    args = ["--model", str(model_dir), "--task", "vqa", "--eval-file", str(q),
            "--image-root", str(tmp_path / "coco/val2014")]
    table = _eval(tmp_path, *args, "--quantize", "int8", "--out-dir", str(tmp_path / "e"))
    assert set(table["base"]) == {"exact_match", "token_F1", "VQA-acc"}
    with pytest.raises(SystemExit) as e:  # --annotations is the file read, not the sibling
        _eval(tmp_path, *args, "--annotations", str(tmp_path / "nope.json"),
              "--out-dir", str(tmp_path / "e2"))
    assert e.value.code == 2


def test_each_adapter_uses_its_own_prompt(tmp_path):
    from models.api import Pipeline

    model_dir = write_tiny_model_dir(tmp_path / "m")
    a, b = _save_adapters(model_dir, {
        tmp_path / "plain/adapter.safetensors": {"task": "caption", "prompt": "a photo of"},
        tmp_path / "fancy/adapter.safetensors": {"task": "caption", "prompt": "an image of"}})
    pipe = Pipeline(adapters=[a, b], device="cpu")
    first, second = pipe.adapter_names
    assert pipe.activate(first).prompt == "a photo of"
    assert pipe.activate(second).prompt == "an image of"
    assert pipe.activate(None).prompt == ""  # the base: no adapter's prompt
    assert pipe.injection.active == []
    assert Pipeline(adapters=[a, b], prompt="a cube", device="cpu").activate(None).prompt \
        == "a cube"

    data = write_tiny_dataset(tmp_path / "d", n=3)
    _eval(tmp_path, "--adapter", str(a), "--adapter", str(b), "--eval-file", str(data),
          "--prompt", "a cube", "--out-dir", str(tmp_path / "e"))
    systems = json.loads((tmp_path / "e/eval.json").read_text())["systems"]
    assert {k: v["prompt"] for k, v in systems.items()} == {
        "base": "a cube", "plain": "a photo of", "fancy": "an image of"}


def test_adapters_of_different_tasks_are_one_error(tmp_path, capsys):
    model_dir = write_tiny_model_dir(tmp_path / "m")
    a, b = _save_adapters(model_dir, {tmp_path / "c.safetensors": {"task": "caption"},
                                      tmp_path / "v.safetensors": {"task": "vqa"}})
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _eval(tmp_path, "--adapter", str(a), "--adapter", str(b), "--out-dir",
              str(tmp_path / "e"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "c.safetensors" in err[0] and "v.safetensors" in err[0]
    assert not (tmp_path / "e").exists()


def test_eval_columns_records_and_output_folders(tmp_path, monkeypatch, capsys):
    model_dir = write_tiny_model_dir(tmp_path / "m")
    paths = _save_adapters(model_dir, {
        tmp_path / "x/caption-lora/adapter.safetensors": {"task": "caption"},
        tmp_path / "y/caption-lora/adapter.safetensors": {"task": "caption", "prompt": "a"},
        tmp_path / "mine.safetensors": {"task": "caption"}})
    data = write_tiny_dataset(tmp_path / "d", n=2)
    monkeypatch.setattr(evaluate, "DEFAULT_OUT_DIR", tmp_path / "runs/eval")
    args = [a for p in paths for a in ("--adapter", str(p))] + ["--eval-file", str(data)]
    table = _eval(tmp_path, *args)
    assert list(table) == ["base", "caption-lora", "caption-lora-2", "mine"]
    record = json.loads((tmp_path / "runs/eval/eval.json").read_text())
    assert record["base_model"] == str(model_dir)
    for column, path in zip(list(table)[1:], paths, strict=True):
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        assert record["systems"][column] | {"prompt": ""} == {
            "adapter": str(path), "sha256": sha, "task": "caption", "prompt": ""}
    out = capsys.readouterr().out
    assert str(tmp_path / "runs/eval/eval.json") in out and \
        str(tmp_path / "runs/eval/eval.md") in out
    _eval(tmp_path, *args)  # the default folder is taken: the next number
    assert (tmp_path / "runs/eval-2/eval.json").is_file()
    assert str(tmp_path / "runs/eval-2/eval.md") in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # an explicit folder is never mixed into
        _eval(tmp_path, *args, "--out-dir", str(tmp_path / "runs/eval"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out-dir" in err[0] and "not empty" in err[0]
