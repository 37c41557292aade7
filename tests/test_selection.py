"""--select-best: best.safetensors is the epoch with the best validation metric (exact match
here), recomputed in the test from each epoch's adapter; the metrics' formulas; bad choices
refused before training; resume stays bit-identical."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_model_dir, write_tiny_vqa_dataset
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_runs import records_without_time, train_args, write_tiny_run

import train
from cli import train_flags
from data.dataset import split_by_image
from data.formats import load_caption_samples, load_image
from evaluation import caption_scores
from models.api import Pipeline
from training import selection


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("select"))


def epoch_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" not in r]


def normalise(caption: str) -> str:
    return " ".join(caption.lower().split()).rstrip(" .")


def exact_match_of(adapter: Path, val: list) -> float:
    """Greedy captions of the validation images by ``adapter``, against their captions."""
    pipe = Pipeline(adapters=[adapter])
    with torch.no_grad():
        captions = pipe.caption([load_image(s.image) for s in val])
    return sum(normalise(c) == normalise(s.text) for c, s in zip(captions, val, strict=True)) / len(
        val)


def test_best_is_the_epoch_of_highest_exact_match_not_of_lowest_loss(setup, tmp_path):
    out = tmp_path / "run"
    # 6 epochs of 2 steps; every epoch's checkpoint kept (step 2, 4, ..., 12).
    train.main(train_args(setup, out, "--epochs", "6", "--lr", "1e-2", "--keep-checkpoints", "0",
                          "--select-best", "exact_match"))
    # The validation split train.py holds out (--val-fraction 0.25, --seed 0): one caption each.
    val = split_by_image(load_caption_samples(setup[1])[0], 0.25, 0)[1]
    adapters = [out / f"checkpoints/step-{2 * (e + 1):06d}/adapter.safetensors" for e in range(6)]
    matches = [exact_match_of(a, val) for a in adapters]
    records = epoch_records(out)
    assert [r["val_exact_match"] for r in records] == matches
    best = matches.index(max(matches))  # the first epoch with the highest: ties keep the earlier
    lowest_loss = min(range(6), key=lambda e: records[e]["val_loss"])
    # The run this test needs: exact match peaks before the loss bottoms out.
    assert max(matches) > 0 and best != lowest_loss, (matches, records)
    chosen, expected = load_file(out / "best.safetensors"), load_file(adapters[best])
    assert chosen.keys() == expected.keys()
    assert all(torch.equal(chosen[k], expected[k]) for k in chosen)
    with safe_open(out / "best.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["best_metric"] == "exact_match" and meta["best_epoch"] == str(best)
    assert float(meta["best_value"]) == matches[best]


def test_resume_with_a_generation_metric_is_bit_identical(setup, tmp_path):
    flags = ("--lr", "1e-2", "--select-best", "exact_match")
    full = load_file(train.main(train_args(setup, tmp_path / "a", *flags)))
    train.main(train_args(setup, tmp_path / "b", *flags, "--stop-after-steps", "3"))
    resumed = load_file(train.main(train_args(setup, tmp_path / "b", *flags, "--resume", "auto")))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    best_a, best_b = (load_file(tmp_path / d / "best.safetensors") for d in "ab")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)

    assert records_without_time(tmp_path / "a") == records_without_time(tmp_path / "b")
    assert all("val_exact_match" in r for r in epoch_records(tmp_path / "a"))
    # Another metric (or beam width) would pick another best.safetensors: refused on resume.
    with pytest.raises(SystemExit, match="select_best"):
        train.main(train_args(setup, tmp_path / "b", "--lr", "1e-2", "--select-best", "cider",
                              "--resume", str(tmp_path / "b/checkpoints/step-000006")))
    assert {"select_best", "num_beams"} <= set(vars(train_flags.parse_args([]))) - \
        train.MAY_CHANGE_ON_RESUME


@pytest.fixture(scope="module")
def vqa_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("select_vqa")
    return write_tiny_model_dir(root / "model", vqa=True), write_tiny_vqa_dataset(root / "data")


@pytest.mark.parametrize(("task", "extra", "message"), [
    ("caption", ["--select-best", "vqa_acc"],
     "--select-best vqa_acc (VQA accuracy) scores vqa runs, this one trains caption: choose one "
     "of val_loss, exact_match, cider"),
    ("vqa", ["--select-best", "cider"],
     "--select-best cider (CIDEr-D) scores caption runs, this one trains vqa: choose one of "
     "val_loss, exact_match, vqa_acc"),
    ("vqa", ["--select-best", "vqa_acc"],
     "--select-best vqa_acc needs 10 answers per question (VQA v2's human answers); 3 of 3 "
     "validation questions have another number: select by exact_match instead"),
    ("caption", ["--select-best", "exact_match", "--val-fraction", "0"],
     "--select-best exact_match needs a validation split: pass --val-file, or --val-fraction "
     "above 0"),
    ("caption", ["--select-best", "val_loss", "--val-fraction", "0"],
     "--select-best val_loss needs a validation split"),
], ids=["vqa_acc-on-captions", "cider-on-vqa", "vqa_acc-without-10-answers", "no-split",
        "val_loss-no-split"])
def test_a_metric_that_cannot_be_scored_stops_before_training(setup, vqa_setup, tmp_path, capsys,
                                                              task, extra, message):
    model, data = setup if task == "caption" else vqa_setup
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(train_args((model, data), out, *extra))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"train.py: error: {message}"), err[-1]
    assert not (out / "metrics.jsonl").exists()  # nothing trained, nothing written


def test_cider_is_the_caption_toolkits_cider_d():
    units = [(None, ["a red cube", "one red cube"]), (None, ["a blue cube"]),
             (None, ["a green cube on a block"])]
    preds = ["a red cube", "a green cube", "a green cube on a block"]
    expected = caption_scores({i: p for i, p in enumerate(preds)},
                              {i: r for i, (_, r) in enumerate(units)})["CIDEr-D"]
    assert selection.score("cider", "caption", units, preds) == pytest.approx(expected, abs=1e-12)
    assert expected > 0


def test_vqa_accuracy_is_min_one_matches_over_three_left_one_out():
    answers = ["two"] * 4 + ["three"] * 2 + ["four"] * 4  # 10 human answers
    units = [(None, answers)] * 3
    preds = ["2", "three", "five"]  # "2" normalises to "two"

    def official(m: int) -> float:  # m of the 10 answers match; each left out in turn
        return (m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)) / 10

    expected = (official(4) + official(2) + official(0)) / 3
    assert selection.score("vqa_acc", "vqa", units, preds) == pytest.approx(expected)
    assert selection.score("exact_match", "vqa", units, preds) == pytest.approx(2 / 3)


def test_selection_key_minimises_losses_and_maximises_scores():
    assert selection.selection_key("val_loss", 1.5) == 1.5
    assert selection.selection_key("exact_match", 0.5) == -0.5
    assert selection.selection_key("cider", math.nan) == math.inf  # never best
    with pytest.raises(ValueError, match="not a generation metric"):
        selection.score("val_loss", "caption", [(None, ["a"])], ["a"])


def test_three_processes_select_as_one(setup, tmp_path):
    # Each rank captions every third validation image; the gathered captions, scored against
    # the right references, give one process's numbers. Ranks 1, 2 writing anything fail the run.
    from test_distributed import launch

    def args(out, batch):
        return train_args(setup, out, "--batch-size", batch, "--dropout", "0", "--lr", "1e-2",
                          "--epochs", "6", "--select-best", "exact_match")

    # 3 processes × batch 1 against 1 × 3: the same global batches; one validation image each.
    assert launch(args(tmp_path / "three", "1"), world=3) == [0, 0, 0]
    train.main(args(tmp_path / "one", "3"))
    one, three = epoch_records(tmp_path / "one"), epoch_records(tmp_path / "three")
    assert [r["val_exact_match"] for r in three] == [r["val_exact_match"] for r in one]
    assert len({r["val_exact_match"] for r in one}) > 1  # it learnt: the epochs differ
    metas = []
    for run in ("one", "three"):
        with safe_open(tmp_path / run / "best.safetensors", "pt") as f:
            metas.append({k: v for k, v in f.metadata().items() if k.startswith("best_")})
    assert metas[0] == metas[1]
