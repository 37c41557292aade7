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
