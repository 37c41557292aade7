"""train.py's command line: its flags and their checks.

Here rather than in train.py so that other tools (sweep.py) can check a training command without
importing an entry point; this module loads no model code.
"""

from __future__ import annotations

import argparse

from cli import HelpFormatter
from cli.flags import (
    add_data_location_flags,
    add_debug_flag,
    add_device_flags,
    add_generation_flags,
    add_quantize_flags,
)
from data.vqa_targets import TARGET_MODES
from lora.config import INIT_METHODS
from training import selection
from training.adamw8bit import OPTIMIZERS
from training.optimizer import check_lr_ratio

BASE_DTYPES = ["bf16", "fp16", "fp32"]  # train.py maps them to torch dtypes


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """train.py's flags; every one has help and a sensible default."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="hub id or local directory of a BLIP / BLIP-2 checkpoint (default: the "
                        "embedded tiny pretrained stand-in of the task: models/tiny_blip, or "
                        "models/tiny_blip_vqa with --task vqa)")
    g.add_argument("--task", choices=["auto", "caption", "vqa"], default="auto",
                   help="what to train; auto reads it from the checkpoint's architecture "
                        "(BLIP-2 checkpoints do both: caption by default)")
    g.add_argument("--base-dtype", choices=BASE_DTYPES, default="fp32",
                   help="dtype of the frozen base weights (fp16/bf16 halve their memory on a "
                        "GPU; adapters always stay fp32)")
    add_quantize_flags(g)
    g.add_argument("--train-file", default=None,
                   help="training data (default: the shipped set of the task). Captions: "
                        ".jsonl, captions .json, COCO .json or caption/+Image/ dir; VQA: .jsonl, "
                        "per-image .json (or a dir of them) or VQA v2 questions .json")
    g.add_argument("--val-file", default=None,
                   help="validation data (same formats); default: hold out --val-fraction")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of training images held out for validation when no "
                        "--val-file is given (0 disables validation)")
    g.add_argument("--eval-file", default=None,
                   help="test data for the exact-match report after training (default: the "
                        "shipped test set with the shipped training data; with your own "
                        "--train-file, its validation split; 'none' skips it)")
    g.add_argument("--skip-bad-samples", action="store_true",
                   help="skip (and count) malformed lines and unreadable images instead of failing")
    add_data_location_flags(g, "--train-file")
    g.add_argument("--prompt", default="",
                   help="text prefix before every caption, masked out of the loss "
                        "(default: none; LAVIS uses 'a picture of ')")
    g.add_argument("--max-length", type=int, default=None,
                   help="max tokens of prompt + caption (VQA: of the question, and of the "
                        "answer); longer texts are cut with a warning naming their file and line "
                        "(default: 64, or the model's limit if lower)")
    g.add_argument("--vqa-targets", choices=TARGET_MODES, default="auto",
                   help="VQA: train on each question's majority answer, or (weighted, BLIP's "
                        "protocol) on each of its answers weighted by the share of annotators "
                        "who gave it (default: auto, weighted when questions have VQA v2's 10 "
                        "answers; BLIP-2 always majority)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--r", type=int, default=16, help="adapter rank")
    g.add_argument("--alpha", type=float, default=32.0, help="scale numerator: delta × alpha/r")
    g.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapter input")
    g.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) (rank-stabilised)")
    g.add_argument("--init", choices=INIT_METHODS, default="default",
                   help="adapter start: default (A random, B zero); pissa (top-r SVD of W) or "
                        "olora (QR of W), training on the residual W - s·BA; saved converted "
                        "to a plain rank-2r LoRA for the original base (no --quantize)")
    g.add_argument("--dora", action="store_true",
                   help="DoRA: also train a magnitude per output feature of each adapted Linear "
                        "(Liu et al. 2024); slower per step, as each forward renormalises W + sBA")
    g.add_argument("--targets", default="auto",
                   help="comma list of presets (vision, text, qformer, language), module "
                        "suffixes (attention.self.query) or 're:<regex>' on full module paths; "
                        "auto: vision,text for BLIP, qformer,language for BLIP-2 (combine: "
                        "auto,vision)")
    g.add_argument("--rank-pattern", action="append", default=[], metavar="PATTERN=R",
                   help="rank override for Linears a pattern matches (repeatable)")
    g.add_argument("--alpha-pattern", action="append", default=[], metavar="PATTERN=ALPHA",
                   help="alpha override for Linears a pattern matches (repeatable)")
    g.add_argument("--trainable-tokens", default=None, metavar="auto|IDS|TOKENS",
                   help="also train these rows of the token embedding (and of the LM head tied "
                        "to it; only those rows are saved): 'auto' = every token of the "
                        "training targets, or a comma list of ids (101,2023) and vocabulary "
                        "tokens (red,##s)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30, help="passes over the training data")
    g.add_argument("--batch-size", type=int, default=16,
                   help="samples per micro-batch of each process")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (global batch = batch × accum × "
                        "processes)")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    g.add_argument("--warmup-ratio", type=float, default=0.1,
                   help="fraction of optimizer steps spent in linear warm-up")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw",
                   help="adamw: torch's AdamW (fp32 moments: 8 bytes per adapter parameter); "
                        "adamw8bit: the same update with both moments stored blockwise-quantized "
                        "to 8 bits (~2 bytes per parameter; tensors under 4096 elements stay "
                        "fp32), as bitsandbytes' AdamW8bit (training/adamw8bit.py)")
    g.add_argument("--loraplus-lr-ratio", type=float, default=1.0, metavar="RATIO",
                   help="LoRA+ (Hayou et al. 2024): B learns at RATIO × --lr, A and the rest at "
                        "--lr; the paper suggests 16 (1: plain AdamW)")
    g.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the adapter gradient norm to this (0 disables)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy smoothing")
    g.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="autocast dtype: auto = fp16 + GradScaler on CUDA, fp32 on CPU (bf16 "
                        "autocast is slower than fp32 on CPUs without native bf16)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward to save memory (non-reentrant)")
    g.add_argument("--seed", type=int, default=0, help="seed for init, data order and dropout")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None,
                   help="where adapters, checkpoints and logs go (default: runs/<task>-lora, "
                        "numbered if taken)")
    g.add_argument("--save-every", type=int, default=0,
                   help="also checkpoint every N optimizer steps (0: only each epoch)")
    g.add_argument("--keep-checkpoints", type=int, default=2,
                   help="how many step checkpoints to keep")
    g.add_argument("--resume", default=None,
                   help="checkpoint folder to continue from, or 'auto' for the newest in "
                        "--output-dir")
    g.add_argument("--stop-after-steps", type=int, default=0,
                   help="checkpoint and stop after this many optimizer steps, leaving the "
                        "schedule unchanged (a planned interruption; 0: run to the end)")
    add_device_flags(g)
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--eval-batch-size", type=int, default=32, help="images per generate call")
    add_generation_flags(g, max_new_tokens=False)  # --num-beams of the report and --select-best
    g.add_argument("--select-best", choices=list(selection.METRICS), default=None,
                   help="what picks best.safetensors, computed on the validation split each "
                        "epoch and logged in metrics.jsonl: val_loss (the default, no "
                        "generation), or by generating (--eval-batch-size, --num-beams): "
                        "exact_match, cider (CIDEr-D, captions), vqa_acc (VQA accuracy, VQA "
                        "with 10 answers per question). Higher is better except val_loss; a "
                        "tie keeps the earlier epoch")
    g.add_argument("--log-to", choices=["jsonl", "tensorboard"], default="jsonl",
                   help="tensorboard: also write the train loss, lr and grad norm per step and "
                        "the validation numbers per epoch as TensorBoard scalars under "
                        "<output-dir>/tensorboard (needs: pip install tensorboard); "
                        "metrics.jsonl is always written")
    g.add_argument("--eval-base", action=argparse.BooleanOptionalAction, default=True,
                   help="also report the base model (adapters off) in the final report")
    add_debug_flag(p)
    return p


def parse_args(argv: list[str] | None = None, description: str | None = None
               ) -> argparse.Namespace:
    """train.py's flags, checked (a bad value is argparse's one-line error, exit 2)."""
    p = build_parser(description)
    args = p.parse_args(argv)
    for flag in ("r", "epochs", "batch_size", "grad_accum"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    try:
        check_lr_ratio(args.loraplus_lr_ratio)
    except ValueError as e:
        p.error(str(e))
    if args.init != "default" and args.quantize != "none":
        p.error(f"--init {args.init} replaces each base weight by its residual, which "
                f"--quantize {args.quantize} would round again: drop --quantize, or use the "
                "default init with --quantize (QLoRA)")
    if args.dora and args.init != "default":
        p.error(f"--dora with --init {args.init} is not supported: the conversion of a "
                "PiSSA/OLoRA adapter for the original base is defined for plain LoRA only")
    return args
