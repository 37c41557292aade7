"""Export a base model with its LoRA adapters merged, as a standalone transformers checkpoint,
and/or one adapter as a PEFT adapter directory.

    python export.py --adapter runs/caption-lora/adapter.safetensors --out exports/cubes
    python export.py --adapter runs/caption-lora/adapter.safetensors --peft exports/cubes-peft
    python export.py --adapter a.safetensors --adapter b.safetensors --out merged --dtype fp16

--out DIR holds what save_pretrained writes for the merged model and its processor, so
``BlipForConditionalGeneration.from_pretrained(DIR)`` (or Blip2..., BlipForQuestionAnswering)
loads it without lora-vlm or peft; plus README.md (a model card: base, each adapter's file,
sha256 and settings, the training run's eval numbers when its eval.json sits beside the
adapter) and lora_vlm.json (the same, with the task and caption prompt the model was trained
with: `python infer.py IMAGE --model DIR` reads them). --peft DIR writes lora.save_peft's PEFT
layout with the same two files; `python infer.py IMAGE --adapter DIR` loads it. --quantize nf4
stores the merged Linears in bitsandbytes' NF4 layout, which from_pretrained loads when
bitsandbytes and accelerate are installed.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP workers spin briefly, then sleep, so a process that
# starts on a busy core later costs ~3x instead of ~6x (training/threads.py has the numbers).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse
import logging
import sys
from pathlib import Path

from cli import HelpFormatter
from cli.flags import add_debug_flag, add_threads_flag
from lora import QUANT_MODES
from models.api import Pipeline
from models.export import (
    DTYPES,
    ExportError,
    check_destination,
    describe_source,
    export_merged,
    export_peft,
)
from models.loading import DEFAULT_MODELS
from training.errors import RunError, exit_on_user_errors
from training.threads import choose_threads


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--adapter", action="append", required=True,
                   help="adapter .safetensors file or PEFT adapter directory (repeatable: "
                        "their deltas add up in the merged model, as in infer.py)")
    p.add_argument("--model", default=None,
                   help="base model: hub id or local directory; when not given, the base "
                        "recorded in the first adapter that names one")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write the merged model here (a new or empty directory, or see "
                        "--overwrite)")
    p.add_argument("--peft", type=Path, default=None, metavar="DIR",
                   help="write the adapter here as a PEFT directory (one --adapter only); with "
                        "--out, both are written")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out / --peft directory (only once the new one "
                        "is completely written)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="dtype of the merged model's weights; the merge itself is computed in "
                        "fp32 (fp16/bf16 halve the size and round each weight once)")
    p.add_argument("--quantize", choices=QUANT_MODES, default="none",
                   help="nf4: store the merged model's Linear weights in bitsandbytes' NF4 "
                        "layout (0.28x their fp16 bytes), the weights infer.py --merge "
                        "--quantize nf4 --no-double-quant computes with; from_pretrained then "
                        "needs bitsandbytes and accelerate. int8 has no faithful "
                        "transformers-loadable form and is refused")
    add_threads_flag(p)
    add_debug_flag(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags, checked."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.out is None and args.peft is None:
        p.error("nothing to write: give --out DIR (merged model), --peft DIR, or both")
    if args.out is not None and args.peft is not None and \
            args.out.resolve() == args.peft.resolve():
        p.error("--out and --peft name the same directory")
    if args.quantize != "none" and args.out is None:
        p.error("--quantize applies to the merged model: give --out DIR")
    return args


def base_model_id(model: str | None, metadata: list[dict[str, str]]) -> str:
    """The base as Pipeline picks it: --model, else the first adapter's, else the default."""
    named = next((m["base_model"] for m in metadata if m.get("base_model")), None)
    task = next((m["task"] for m in metadata if m.get("task")), None)
    return model or named or DEFAULT_MODELS[task or "caption"]


def run(args: argparse.Namespace) -> None:
    """Load base + adapters, then write the PEFT directory and/or the merged model."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    choose_threads(args.threads)
    sources = [describe_source(a) for a in args.adapter]
    base = base_model_id(args.model, [s.metadata for s in sources])
    inputs = [Path(a) for a in [*args.adapter, base]]
    for out in (args.out, args.peft):
        if out is not None:
            check_destination(out, args.overwrite, inputs)
    if args.peft is not None and len(sources) != 1:
        raise ExportError(f"--peft writes one adapter, got {len(sources)}: export each alone")
    try:
        pipe = Pipeline(base, args.adapter, device="cpu")
    # a model or task these adapters / this architecture cannot take; a checkpoint that
    # needs a package not installed here (bitsandbytes NF4: transformers says which)
    except (ValueError, ImportError) as e:
        raise RunError(str(e)) from None
    if args.peft is not None:  # before merging: export_merged changes the model
        print(f"PEFT adapter: {export_peft(pipe, sources[0], args.peft, base)}")
    if args.out is not None:
        out = export_merged(pipe, sources, args.out, base, DTYPES[args.dtype], args.quantize)
        print(f"merged model: {out}")


def main(argv: list[str] | None = None) -> None:
    """Export; a bad adapter, model or destination ends in one error line and exit status 2."""
    args = parse_args(argv)
    with exit_on_user_errors("export.py", debug=args.debug):
        try:
            run(args)
        except ExportError as e:
            raise RunError(str(e)) from None


if __name__ == "__main__":
    main(sys.argv[1:])
