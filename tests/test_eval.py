"""eval.py: base and adapters scored on the same set, deltas, JSON and Markdown outputs."""

import json

import pytest
import torch
from conftest import write_tiny_dataset, write_tiny_model_dir, write_tiny_vqa_dataset
from safetensors.torch import load_file

import eval as evaluate
import train


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
    assert list(table) == ["base", "0-adapter"]
    expected = ({"exact_match", "token_F1"} if task == "vqa" else
                {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D", "exact_match"})
    assert set(table["base"]) == expected == set(table["0-adapter"])
    saved = json.loads((tmp_path / "e/eval.json").read_text())["scores"]
    assert saved == table
    md = (tmp_path / "e/eval.md").read_text().splitlines()
    row = next(line for line in md if line.startswith("| exact_match |"))
    delta = table["0-adapter"]["exact_match"] - table["base"]["exact_match"]
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
    assert trained["adapter"]["all"] == table["0-adapter"]["exact_match"] == pytest.approx(4 / 6)
    assert trained["base"]["all"] == table["base"]["exact_match"]
