"""Score the base model and one or more adapters on the same test set, side by side.

    python eval.py --adapter runs/caption-lora/adapter.safetensors
    python eval.py --task vqa --adapter runs/vqa-lora/adapter.safetensors --eval-file my.jsonl

Captions: BLEU-1..4, ROUGE-L, CIDEr-D (COCO caption toolkit definitions) and exact match; VQA:
exact match, token F1 and, where every question has 10 answers, the official VQA accuracy.
Prints a table (per metric: base, each adapter, its delta) and writes it as JSON and Markdown,
plus report.html (each test image with references and every system's output, grouped by
right/wrong) and contact_sheet.png.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP workers spin briefly, then sleep, so a process that
# starts on a busy core later costs ~3x instead of ~6x (training/threads.py has the numbers).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse
import json
import logging
import sys
from pathlib import Path

from evaluation import caption_scores, exact_match, is_correct, vqa_scores
from evaluation.report import Row, write_contact_sheet, write_html
from models.api import Pipeline
from train import DEFAULT_DATA, ROOT, HelpFormatter
from training.errors import exit_on_user_errors
from training.threads import choose_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--adapter", action="append", default=[],
                   help="adapter file to compare with the base (repeatable)")
    p.add_argument("--model", default=None, help="base model (default: the adapters' base)")
    p.add_argument("--task", choices=["caption", "vqa"], default=None,
                   help="default: the adapters' task")
    p.add_argument("--eval-file", default=None, help="test data (default: the shipped test set)")
    p.add_argument("--num-beams", type=int, default=1, help="beam width")
    p.add_argument("--batch-size", type=int, default=32, help="queries per generate call")
    p.add_argument("--out-dir", default="runs/eval", help="where eval.json and eval.md go")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: one per core idle at start)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="also write report.html (images embedded) and contact_sheet.png")
    return p.parse_args(argv)


def score(task_name: str, units: list, preds: list[str]) -> dict[str, float]:
    """The task's metrics for predictions on ``units`` ((sample, references) pairs)."""
    if task_name == "vqa":
        return vqa_scores(preds, [refs for _, refs in units])
    refs = {str(s.image): r for s, r in units}
    cands = {str(s.image): p for (s, _), p in zip(units, preds, strict=True)}
    return {**caption_scores(cands, refs), "exact_match": exact_match(cands, refs)}


def report_rows(task_name: str, units: list, outputs: dict[str, list[str]]) -> list[Row]:
    """One report row per evaluation unit, with every system's output and its exact-match
    verdict (evaluation.is_correct: the definition the table's exact_match averages)."""
    return [Row(sample.image, sample.question if task_name == "vqa" else "", list(refs),
                {system: (preds[i], is_correct(task_name, preds[i], refs))
                 for system, preds in outputs.items()})
            for i, (sample, refs) in enumerate(units)]


def markdown(table: dict[str, dict[str, float]]) -> str:
    """Metric rows; a column per system, and a delta column per adapter."""
    systems = list(table)
    metrics = list(table["base"])
    head = ["metric", *systems, *(f"Δ {s}" for s in systems[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in metrics:
        row = [f"{table[s][m]:.4f}" for s in systems]
        row += [f"{table[s][m] - table['base'][m]:+.4f}" for s in systems[1:]]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Evaluate base and adapters; returns {system: {metric: value}}."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # which base model was used
    choose_threads(args.threads)
    with exit_on_user_errors("eval.py"):  # a bad adapter file, a base model not found
        pipe = Pipeline(args.model, args.adapter, task=args.task)
    eval_file = args.eval_file or str(ROOT / DEFAULT_DATA[pipe.task.name][1])
    samples = pipe.task.load_samples(eval_file)[0]
    units = pipe.task.eval_units(samples)
    names = list(pipe.injection.adapters) if pipe.injection else []
    table, outputs = {}, {}
    for system, active in [("base", []), *((n, [n]) for n in names)]:
        if pipe.injection:
            pipe.injection.set_active(active)
        outputs[system] = pipe.task.predict_units(units, args.batch_size, desc=system,
                                                  num_beams=args.num_beams)
        table[system] = score(pipe.task.name, units, outputs[system])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        rows = report_rows(pipe.task.name, units, outputs)
        write_html(rows, out / "report.html", f"{Path(eval_file).name}: base vs adapters")
        write_contact_sheet(rows, out / "contact_sheet.png")
    (out / "eval.json").write_text(json.dumps({"eval_file": eval_file, "scores": table},
                                              indent=2) + "\n")
    (out / "eval.md").write_text(markdown(table))
    print(markdown(table), end="")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
