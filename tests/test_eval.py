"""eval.py: base and adapters scored on the same set, deltas, JSON and Markdown outputs."""

import hashlib
import json
from html.parser import HTMLParser

import pytest
import torch
from conftest import write_tiny_dataset, write_tiny_model_dir, write_tiny_vqa_dataset
from PIL import Image
from safetensors.torch import load_file

import eval as evaluate
import train
from evaluation.caption_metrics import meteor_available
from evaluation.report import Row


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
    assert page.count("data:image/png;base64,") == 6  # one per test image
    summary, *groups = ReportParser(page).tables  # eval.py's scores on top; every query below
    assert summary[1][-1] == [m := list(table["base"])[-1], f"{table['base'][m]:.4f}",
                              f"{table['run'][m]:.4f}",
                              f"{table['run'][m] - table['base'][m]:+.4f}"]
    assert sum(len(body) - 1 for _, body in groups) == 6
    assert (tmp_path / "e/contact_sheet.png").stat().st_size > 0


class ReportParser(HTMLParser):
    """The parts of report.html a reader sees: h2 headings (id, text), tables (class, rows of
    cell texts; an image cell holds its CSS classes), and the <style> text."""

    def __init__(self, page: str):
        super().__init__()
        self.headings, self.tables, self.style = [], [], ""
        self._where: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._where.append(tag)
        if tag == "h2":
            self.headings.append([attrs.get("id"), ""])
        elif tag == "table":
            self.tables.append((attrs.get("class"), []))
        elif tag == "tr":
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][1][-1].append("")
        elif tag == "span" and "thumb" in attrs.get("class", ""):
            self.tables[-1][1][-1][-1] = attrs["class"]

    def handle_endtag(self, tag):
        self._where.pop()

    def handle_data(self, data):
        if "style" in self._where:
            self.style += data
        elif "h2" in self._where:
            self.headings[-1][1] += data
        elif {"td", "th"} & set(self._where):
            self.tables[-1][1][-1][-1] += data


def test_report_groups_summary_and_images_once(tmp_path):
    """Regressions, failures, fixed, correct in that order with their counts, the metrics table
    first, and each image's PNG in the page once, however many questions it has."""
    import base64
    import io
    import re

    from evaluation.report import write_html

    colours = {"a": (200, 0, 0), "b": (0, 200, 0), "c": (0, 0, 200)}
    for name, colour in colours.items():
        Image.new("RGB", (20, 20), colour).save(tmp_path / f"{name}.png")
    Image.new("RGB", (200, 100), "white").save(tmp_path / "wide.png")
    right, wrong = ("y", True), ("n", False)
    rows = [  # (image, question, base, adapter x, adapter y): x and y are two adapters
        ("a", "q1", right, right, right), ("a", "q2", right, right, wrong),
        ("a", "q3", wrong, wrong, right), ("b", "q4", wrong, right, right),
        ("b", "q5", right, wrong, wrong), ("c", "q6", wrong, wrong, wrong),
        ("wide", "q7", right, right, right)]
    rows = [Row(tmp_path / f"{i}.png", q, ["y"], {"base": b, "x": x, "y": y})
            for i, q, b, x, y in rows]
    scores = {"base": {"exact_match": 0.25, "BLEU-1": 0.5}, "x": {"exact_match": 0.75,
              "BLEU-1": 0.5}, "y": {"exact_match": 0.5, "BLEU-1": 0.125}}
    page = write_html(rows, tmp_path / "r.html", "t <&>", scores).read_text()
    parsed = ReportParser(page)
    assert "<title>t &lt;&amp;&gt;</title>" in page

    # Headings: the summary, then the groups in order, each with its count.
    ids = [i for i, _ in parsed.headings]
    assert ids == ["summary", "regressions", "failures", "fixed", "correct"]
    counts = [int(re.fullmatch(r".*\((\d+)\)", text)[1]) for _, text in parsed.headings[1:]]
    assert counts == [2, 2, 1, 2]
    # The summary table comes first: per metric each system, then each adapter minus the base.
    summary, *groups = parsed.tables
    assert summary == ("scores", [["metric", "base", "x", "y", "Δ x", "Δ y"],
                                  ["exact_match", "0.2500", "0.7500", "0.5000", "+0.5000",
                                   "+0.2500"],
                                  ["BLEU-1", "0.5000", "0.5000", "0.1250", "+0.0000",
                                   "-0.3750"]])
    questions = {cls: [r[1] for r in body[1:]] for cls, body in groups}
    assert questions == {"regressions": ["q2", "q5"], "failures": ["q3", "q6"],
                         "fixed": ["q4"], "correct": ["q1", "q7"]}
    assert groups[0][1][0] == ["image", "query", "reference", "base", "x", "y"]
    # Without adapters the base alone is judged: a failure or correct.
    assert [Row(tmp_path / "a.png", "", ["y"], {"base": v}).group() for v in (wrong, right)] \
        == ["failures", "correct"]
    assert groups[0][1][1][3:] == ["✓ y", "✓ y", "✗ n"]

    # Each image's data URI appears once; every row's image class decodes to its own picture.
    uris = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(uris) == len(set(uris)) == 4
    css = dict(re.findall(r"\.(i\d+)\{background-image:url\(data:image/png;base64,"
                          r"([A-Za-z0-9+/=]+)\)\}", parsed.style))
    image_of = {r.query: r.image for r in rows}
    for image_cell, question, *_ in (r for _, body in groups for r in body[1:]):
        shown = Image.open(io.BytesIO(base64.b64decode(css[image_cell.split()[1]])))
        source = Image.open(image_of[question]).convert("RGB")
        if source.size == (200, 100):  # shrunk to fit 96 x 96, aspect kept
            assert shown.size == (96, 48)
        else:
            assert shown.mode == "RGB" and shown.tobytes() == source.tobytes()


def test_contact_sheet_leads_with_what_went_wrong(tmp_path):
    """With room for two tiles, the sheet shows the regression and the failure even though they
    come last among the rows; the size follows the tile layout."""
    from evaluation.report import write_contact_sheet

    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (20, 20), colour).save(tmp_path / f"{i}.png")
    verdicts = [(True, True), (False, True), (True, False), (False, False)]
    rows = [Row(tmp_path / f"{i}.png", "", ["r"], {"base": ("r", b), "a": ("r", a)})
            for i, (b, a) in enumerate(verdicts)]  # correct, fixed, regression, failure
    sheet = Image.open(write_contact_sheet(rows, tmp_path / "s.png", columns=2, image_px=20,
                                           max_rows=2)).convert("RGB")
    tile_w, tile_h = 2 * 20 + 16, 20 + 12 * 3 + 8
    assert sheet.size == (2 * tile_w, tile_h)
    assert [sheet.getpixel((x * tile_w + 14, 14)) for x in range(2)] == [colours[2], colours[3]]


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
