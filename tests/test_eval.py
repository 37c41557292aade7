"""eval.py: base and adapters scored on the same set, deltas, JSON and Markdown outputs."""

import json

import pytest
from conftest import write_tiny_dataset, write_tiny_model_dir, write_tiny_vqa_dataset

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
