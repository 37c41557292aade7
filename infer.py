"""Caption images, or answer questions about them, with a BLIP / BLIP-2 model and adapters.

    python infer.py image_test/                                   # the base model
    python infer.py image_test/ --adapter runs/caption-lora/adapter.safetensors --merge
    python infer.py a.jpg b.jpg --model Salesforce/blip-image-captioning-large --num-beams 3
    python infer.py a.jpg --model Salesforce/blip-vqa-base --question "how many dogs?"
    python infer.py a.jpg --adapter runs/caption-peft/          # a PEFT adapter directory
    python infer.py a.jpg --adapter a.safetensors:0.7 --adapter b.safetensors:0.3  # weighted

Each adapter's settings (rank, alpha, targets, base model, prompt) come from its file's
metadata, or from a PEFT directory's adapter_config.json (task and prompt from the
lora_vlm.json that export.py --peft writes beside it). --merge folds the adapters into the
weights: inference then costs exactly the base.
Prints "<image>\t<caption>" (or "<image>\t<question>\t<answer>") lines, or writes JSON /
JSONL with --output.
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

import torch
from tqdm import tqdm

from cli import HelpFormatter
from cli.flags import (
    add_answer_list_flags,
    add_base_flags,
    add_debug_flag,
    add_device_flags,
    add_generation_flags,
    add_quantize_flags,
    answer_list_kwargs,
    generation_kwargs,
)
from data.formats import load_image
from models.api import Pipeline
from training.errors import RunError, exit_on_user_errors
from training.threads import choose_threads

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    add_base_flags(p)  # --model, --task (vqa also when --question is given)
    p.add_argument("--adapter", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="adapter .safetensors file or PEFT adapter directory "
                        "(adapter_config.json + adapter_model.safetensors); repeatable: their "
                        "deltas add up; PATH:0.7 scales its delta by 0.7 (set_scale)")
    p.add_argument("--merge", action="store_true",
                   help="merge adapters into the weights (no per-layer hook cost); with "
                        "--quantize the merge happens in full precision, then W + BA is quantized")
    add_quantize_flags(p)  # adapters hook on top of the quantized base unless --merge
    p.add_argument("--question", action="append", default=None,
                   help="answer this question about every image (repeatable; VQA models and "
                        "BLIP-2)")
    p.add_argument("--prompt", default=None,
                   help="caption prefix (default: the adapter's training prompt, else none)")
    add_generation_flags(p)
    add_answer_list_flags(p)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--batch-size", type=int, default=16, help="images per generate call")
    p.add_argument("--output", default=None,
                   help="write results to this file instead of stdout, by extension: .txt "
                        "(tab-separated lines), .jsonl or .json")
    p.add_argument("--fp16", action="store_true", help="load the model in float16 (GPU)")
    add_device_flags(p)
    add_debug_flag(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    return build_parser().parse_args(argv)


def find_images(inputs: list[str]) -> list[Path]:
    """Image files named directly or found (sorted) under the named folders."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            found.append(item)
        else:
            raise SystemExit(f"{item}: no such file or folder")
    if not found:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {inputs}")
    return found


def as_lines(results: list[dict]) -> str:
    """Tab-separated lines: image, caption (or image, question, answer)."""
    return "".join("\t".join(r.values()) + "\n" for r in results)


# --output's format, by the file's extension.
OUTPUT_FORMATS = {".txt": as_lines,
                  ".jsonl": lambda results: "".join(json.dumps(r) + "\n" for r in results),
                  ".json": lambda results: json.dumps(results, indent=2) + "\n"}


def check_output(output: str | None) -> None:
    """Refuse an --output whose extension names no format, before any work is done."""
    if output is not None and Path(output).suffix.lower() not in OUTPUT_FORMATS:
        raise RunError(f"--output {output}: unknown extension; use one of "
                       f"{', '.join(OUTPUT_FORMATS)} (tab-separated lines, JSON lines, a JSON "
                       "list)")


def write_results(results: list[dict], output: str | None) -> None:
    """Tab-separated lines on stdout, or --output in the format its extension names."""
    if output is None:
        sys.stdout.write(as_lines(results))
        return
    Path(output).write_text(OUTPUT_FORMATS[Path(output).suffix.lower()](results))
    logging.getLogger("infer").info("%d results written to %s", len(results), output)


def main(argv: list[str] | None = None) -> list[dict]:
    """Caption every input image; returns [{"image", "caption"}]. A bad adapter or model
    ends in one error line and exit status 2."""
    args = parse_args(argv)
    with exit_on_user_errors("infer.py", debug=args.debug):
        return run(args)


def run(args: argparse.Namespace) -> list[dict]:
    """main's work, once the flags are parsed."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    choose_threads(args.threads)
    torch.manual_seed(args.seed)
    check_output(args.output)
    images = find_images(args.inputs)
    task = args.task or ("vqa" if args.question else None)
    try:
        pipe = Pipeline(args.model, args.adapter, merge=args.merge, task=task,
                        device=args.device, dtype=torch.float16 if args.fp16 else torch.float32,
                        prompt=args.prompt, quantize=args.quantize,
                        double_quant=args.double_quant)
    # a model or task these adapters / this architecture cannot take; a checkpoint that
    # needs a package not installed here (bitsandbytes NF4: transformers says which)
    except (ValueError, ImportError) as e:
        raise RunError(str(e)) from None
    if pipe.task.name == "vqa" and not args.question:
        raise RunError(f"{' + '.join(args.adapter) or args.model or 'this model'} answers "
                       "questions (task vqa): pass --question \"...\" (repeatable) to ask it "
                       "about every image")
    gen = dict(**generation_kwargs(args), do_sample=args.do_sample, top_p=args.top_p,
               temperature=args.temperature, **answer_list_kwargs(args, pipe.task))
    # One query per (image, question) pair, or per image when captioning.
    queries = [(p, q) for p in images for q in (args.question or [None])]
    results = []
    for i in tqdm(range(0, len(queries), args.batch_size), desc="predict",
                  disable=len(queries) < 50):
        chunk = queries[i : i + args.batch_size]
        pil = [load_image(p) for p, _ in chunk]
        if args.question:
            answers = pipe.answer(pil, [q for _, q in chunk], **gen)
            results += [{"image": str(p), "question": q, "answer": a}
                        for (p, q), a in zip(chunk, answers, strict=True)]
        else:
            captions = pipe.caption(pil, **gen)
            results += [{"image": str(p), "caption": c}
                        for (p, _), c in zip(chunk, captions, strict=True)]
    write_results(results, args.output)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
