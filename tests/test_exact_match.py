"""One exact-match definition per task: train.py's report, eval.py's table and the HTML report
rows give every prediction the same verdict."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import eval as evaluate
import train
from models.tasks import Task

# (prediction, reference answers, right?) under the VQA definition: official normalisation,
# equal to any reference.
VQA_CASES = [
    ("2", ["two"], True),  # number words become digits
    ("Two", ["2"], True),
    ("Yes.", ["yes"], True),  # case and the full stop
    ("the cube", ["cube"], True),  # articles dropped
    ("red!", ["red"], True),  # punctuation
    ("blue", ["red", "red", "blue"], True),  # any reference, not only the majority answer
    ("green", ["red"], False),
    ("two cubes", ["2"], False),
]
# Captions: lower case, single spaces, no trailing full stop; equal to any caption of the image.
CAPTION_CASES = [
    ("A red  cube.", ["a red cube"], True),
    ("a blue cube", ["a green cube", "A blue cube"], True),
    ("2 cubes", ["two cubes"], False),  # no number or article rewriting for captions
    ("the red cube", ["a red cube"], False),
]


def test_is_correct_per_task():
    from evaluation import is_correct

    for pred, refs, right in VQA_CASES:
        assert is_correct("vqa", pred, refs) is right, (pred, refs)
    for pred, refs, right in CAPTION_CASES:
        assert is_correct("caption", pred, refs) is right, (pred, refs)
    with pytest.raises(ValueError):
        is_correct("vqa", "red", [])


def _write_cases(tmp_path, task: str, cases) -> tuple:
    """An eval file with one query per case (solid-colour image i), and {colour: prediction}."""
    lines, predictions = [], {}
    for i, (pred, refs, _) in enumerate(cases):
        colour = (10 * i, 200, 30)
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{i}.png")
        predictions[colour] = pred
        if task == "vqa":
            lines.append({"image": f"{i}.png", "question": f"question {i}?", "answers": refs})
        else:
            lines += [{"image": f"{i}.png", "text": r} for r in refs]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path, predictions


def _stub_task(task: str, predictions: dict) -> Task:
    """A Task whose model 'predicts' the case's prediction for each image (by its colour)."""
    def predict(images, questions, **kw):
        return [predictions[image.getpixel((0, 0))] for image in images]

    return Task(task, "blip", collate=None, loss_sum=None, _predict=predict)


@pytest.mark.parametrize("task_name", ["vqa", "caption"])
def test_train_report_eval_table_and_report_rows_agree(tmp_path, monkeypatch, task_name):
    cases = VQA_CASES if task_name == "vqa" else CAPTION_CASES
    data, predictions = _write_cases(tmp_path, task_name, cases)
    task = _stub_task(task_name, predictions)
    expected = sum(right for *_, right in cases) / len(cases)

    samples = task.load_samples(data)[0]
    args = SimpleNamespace(eval_batch_size=3, num_beams=1)
    trained = train.exact_match_report(task, samples, args, None, torch.device("cpu"))
    assert trained["all"] == pytest.approx(expected)

    stub = SimpleNamespace(task=task, injection=None, adapter_tasks={}, adapter_names=[],
                           adapter_prompts={}, base_prompt="", model_id="stub",
                           activate=lambda name: task)
    monkeypatch.setattr(evaluate, "Pipeline", lambda *a, **kw: stub)
    table = evaluate.main(["--task", task_name, "--eval-file", str(data), "--out-dir",
                           str(tmp_path / "e"), "--batch-size", "3"])
    assert table["base"]["exact_match"] == pytest.approx(expected)

    # The HTML report: each row's ✓/✗ is the verdict the table averaged.
    page = (tmp_path / "e/report.html").read_text()
    marks = {html.unescape(text): cls
             for cls, text in re.findall(r"<td class='(ok|bad)'>[✓✗] ([^<]*)</td>", page)}
    assert len(marks) == len(cases)  # predictions are distinct: one mark per case
    for pred, refs, right in cases:
        assert marks[pred] == ("ok" if right else "bad"), (pred, refs)


def test_evaluation_needs_neither_models_nor_transformers():
    import subprocess
    import sys

    code = ("import sys, evaluation, evaluation.report, evaluation.curves; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'models', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
