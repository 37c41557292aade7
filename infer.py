"""Caption images, or answer questions about them, with a BLIP / BLIP-2 model and adapters.

    python infer.py image_test/                                   # the base model
    python infer.py image_test/ --adapter runs/caption-lora/adapter.safetensors --merge
    python infer.py a.jpg b.jpg --model Salesforce/blip-image-captioning-large --num-beams 3
    python infer.py a.jpg --model Salesforce/blip-vqa-base --question "how many dogs?"
    python infer.py a.jpg --adapter runs/caption-peft/          # a PEFT adapter directory

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

from data.formats import load_image
from lora import QUANT_MODES
from models.api import Pipeline
from train import HelpFormatter
from training.errors import RunError, exit_on_user_errors
from training.threads import choose_threads

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--model", default=None,
                   help="hub id or local BLIP directory (default: the adapters' base model, "
                        "else the embedded tiny BLIP)")
    p.add_argument("--adapter", action="append", default=[],
                   help="adapter .safetensors file or PEFT adapter directory "
                        "(adapter_config.json + adapter_model.safetensors); repeatable: their "
                        "deltas add up")
    p.add_argument("--merge", action="store_true",
                   help="merge adapters into the weights (no per-layer hook cost); with "
                        "--quantize the merge happens in full precision, then W + BA is quantized")
    p.add_argument("--quantize", choices=QUANT_MODES, default="none",
                   help="store the base's Linear weights as int8 or NF4 (dequantized on the fly; "
                        "adapters hook on top unless --merge)")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="NF4 only: also quantize the per-block scales")
    p.add_argument("--question", action="append", default=None,
                   help="answer this question about every image (repeatable; VQA models and "
                        "BLIP-2)")
    p.add_argument("--task", choices=["caption", "vqa"], default=None,
                   help="default: the adapters' task, else the model's (vqa if --question)")
    p.add_argument("--prompt", default=None,
                   help="caption prefix (default: the adapter's training prompt, else none)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width")
    p.add_argument("--max-new-tokens", type=int, default=30, help="longest caption in tokens")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--batch-size", type=int, default=16, help="images per generate call")
    p.add_argument("--output", default=None,
                   help="write results to this .json or .jsonl file instead of stdout")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... or auto")
    p.add_argument("--fp16", action="store_true", help="load the model in float16 (GPU)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: one per core idle at start)")
    return p.parse_args(argv)


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


def write_results(results: list[dict], output: str | None) -> None:
    """JSON list, JSONL lines, or tab-separated lines on stdout."""
    if output is None:
        for r in results:
            print("\t".join(r.values()))
    elif output.endswith(".jsonl"):
        Path(output).write_text("".join(json.dumps(r) + "\n" for r in results))
    else:
        Path(output).write_text(json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    """Caption every input image; returns [{"image", "caption"}]. A bad adapter or model
    ends in one error line and exit status 2."""
    args = parse_args(argv)
    with exit_on_user_errors("infer.py"):
        return run(args)


def run(args: argparse.Namespace) -> list[dict]:
    """main's work, once the flags are parsed."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    choose_threads(args.threads)
    torch.manual_seed(args.seed)
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
    gen = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
               do_sample=args.do_sample, top_p=args.top_p, temperature=args.temperature)
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
