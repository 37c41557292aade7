"""Score the base model and one or more adapters on the same test set, side by side.

    python eval.py --adapter runs/caption-lora/adapter.safetensors
    python eval.py --task vqa --adapter runs/vqa-lora/adapter.safetensors --eval-file my.jsonl
    python eval.py --task vqa --eval-file v2_OpenEnded_mscoco_val2014_questions.json \
        --image-root val2014/ --adapter runs/vqa-lora/adapter.safetensors

Captions: BLEU-1..4, ROUGE-L, CIDEr-D (COCO caption toolkit definitions) and exact match; VQA:
exact match, token F1 and, where every question has 10 answers, the official VQA accuracy.
Each adapter predicts with its own settings (task, caption prompt) from its metadata; the base
with --prompt or none. Columns are named after each adapter's run folder
(runs/caption-lora/adapter.safetensors -> caption-lora), else its file name.
Prints a table (per metric: base, each adapter, its delta) and writes it as JSON (with each
adapter's path and sha256) and Markdown, plus report.html (the table, then each test query with
its image, references and every system's output, regressions and failures first) and
contact_sheet.png (the same order), then every path written.
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

from cli import DEFAULT_DATA, ROOT, HelpFormatter, numbered_dir
from cli.flags import (
    add_answer_list_flags,
    add_base_flags,
    add_data_location_flags,
    add_debug_flag,
    add_device_flags,
    add_generation_flags,
    add_quantize_flags,
    answer_list_kwargs,
    generation_kwargs,
)
from evaluation import caption_scores, exact_match, is_correct, vqa_scores
from evaluation.report import Row, score_table, write_contact_sheet, write_html
from lora.arithmetic import split_weight
from lora.peft_format import WEIGHTS_NAME
from models.api import Pipeline
from models.export import sha256_file
from training.errors import RunError, exit_on_user_errors
from training.threads import choose_threads

DEFAULT_OUT_DIR = ROOT / "runs" / "eval"


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--adapter", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="adapter file (or PEFT directory) to compare with the base (repeatable); "
                        "PATH:0.7 scales its delta by 0.7 (its column: NAME:0.7)")
    add_base_flags(g)
    g.add_argument("--eval-file", default=None,
                   help="test data, in any format train.py reads (default: the shipped test set "
                        "of the task)")
    add_data_location_flags(g, "--eval-file")
    g.add_argument("--prompt", default=None,
                   help="caption prefix of the base model (default: none); each adapter uses "
                        "the prompt it was trained with")
    add_quantize_flags(g)
    g = p.add_argument_group("generation and output")
    add_generation_flags(g)
    add_answer_list_flags(g)
    g.add_argument("--batch-size", type=int, default=32, help="queries per generate call")
    add_device_flags(g)
    g.add_argument("--out-dir", default=None,
                   help="where eval.json, eval.md and the report go; a new or empty folder "
                        "(default: runs/eval, numbered runs/eval-2, ... if taken)")
    g.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="also write report.html (metrics, then every query grouped: regressions, "
                        "failures, fixed, correct; images embedded) and contact_sheet.png "
                        "(the first 60 queries, in that order)")
    add_debug_flag(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    return build_parser().parse_args(argv)


def column_names(adapters: list[str]) -> list[str]:
    """A column name per adapter a reader recognises: the run folder of
    <run>/adapter.safetensors, else the file (or PEFT directory) name without suffix; a
    repeated name gets -2, -3, ..."""
    names: list[str] = []
    for spec in adapters:
        path, weight = split_weight(spec)
        adapter = Path(path)
        name = adapter.parent.name if adapter.stem == "adapter" and adapter.parent.name \
            else adapter.stem
        name += f":{weight:g}" if weight != 1.0 else ""
        unique, n = name, 1
        while unique in names or unique == "base":
            n += 1
            unique = f"{name}-{n}"
        names.append(unique)
    return names


def choose_out_dir(out_dir: str | None) -> Path:
    """--out-dir if new or empty (a folder never mixes two runs' files); by default runs/eval,
    numbered when taken."""
    if out_dir is None:
        return numbered_dir(DEFAULT_OUT_DIR)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"--out-dir {out} is not empty: name a new folder, or leave --out-dir "
                       "out to write to runs/eval (numbered if taken)")
    return out


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
    head, rows = score_table(table)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Evaluate base and adapters; returns {column: {metric: value}}. A bad flag, data file,
    adapter or output folder ends in one error line and exit status 2."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # which base model was used
    choose_threads(args.threads)
    with exit_on_user_errors("eval.py", debug=args.debug):
        return run(args)


def load_pipeline(args: argparse.Namespace) -> Pipeline:
    """Base + adapters as the flags say; adapters trained for another task than --task, or
    for different tasks, are refused."""
    try:
        pipe = Pipeline(args.model, args.adapter, task=args.task, device=args.device,
                        prompt=args.prompt, quantize=args.quantize,
                        double_quant=args.double_quant)
    # adapters of different tasks; a model or task these adapters / this architecture cannot
    # take; a checkpoint that needs a package not installed here
    except (ValueError, ImportError) as e:
        raise RunError(str(e)) from None
    other = [f"{a} ({t})" for a, t in zip(args.adapter, pipe.adapter_tasks.values(), strict=True)
             if t and t != pipe.task.name]
    if other:
        raise RunError(f"--task {pipe.task.name}, but adapters were trained for another task: "
                       f"{', '.join(other)}")
    if args.annotations and pipe.task.name != "vqa":
        raise RunError("--annotations names a VQA v2 annotations file: it needs --task vqa")
    return pipe


def systems(pipe: Pipeline, args: argparse.Namespace) -> dict[str, dict]:
    """Per column: the injection's adapter name (None: the base) and what eval.json records."""
    out = {"base": {"name": None, "prompt": pipe.base_prompt}}
    for column, name, spec in zip(column_names(args.adapter), pipe.adapter_names, args.adapter,
                                  strict=True):
        path, weight = split_weight(spec)
        weights = Path(path) / WEIGHTS_NAME if Path(path).is_dir() else Path(path)
        out[column] = {"name": name, "adapter": str(path), "sha256": sha256_file(weights),
                       "task": pipe.adapter_tasks[name] or pipe.task.name,
                       "prompt": pipe.adapter_prompts[name],
                       **({"weight": weight} if weight != 1.0 else {})}  # PATH:WEIGHT given
    return out


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """main's work, once the flags are parsed."""
    out = choose_out_dir(args.out_dir)  # before minutes of loading and predicting
    pipe = load_pipeline(args)
    eval_file = args.eval_file or str(ROOT / DEFAULT_DATA[pipe.task.name][1])
    samples = pipe.task.load_samples(eval_file, image_root=args.image_root,
                                     annotations=args.annotations)[0]
    units = pipe.task.eval_units(samples)
    ranking = answer_list_kwargs(args, pipe.task)  # {} unless --answer-list
    columns = systems(pipe, args)
    table, outputs = {}, {}
    for column, info in columns.items():
        task = pipe.activate(info.pop("name"))  # this adapter alone, with its own prompt
        outputs[column] = task.predict_units(units, args.batch_size, desc=column,
                                             **generation_kwargs(args), **ranking)
        table[column] = score(pipe.task.name, units, outputs[column])
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "eval.json", out / "eval.md"]
    record = {"eval_file": eval_file, "task": pipe.task.name, "base_model": pipe.model_id,
              "systems": columns, "scores": table,
              **({"answer_list": args.answer_list, "answer_top_k": args.answer_top_k}
                 if ranking else {})}
    written[0].write_text(json.dumps(record, indent=2) + "\n")
    written[1].write_text(markdown(table))
    if args.report:
        rows = report_rows(pipe.task.name, units, outputs)
        written.append(write_html(rows, out / "report.html",
                                  f"{Path(eval_file).name}: base vs adapters", table))
        written.append(write_contact_sheet(rows, out / "contact_sheet.png"))
    print(markdown(table), end="")
    print("\nwritten:\n" + "".join(f"  {path}\n" for path in written), end="")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
