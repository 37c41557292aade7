"""Flag groups defined once, for the entry points where a flag means the same thing.

train.py and eval.py read data the same way (``add_data_location_flags``) and load the base the
same way (``add_quantize_flags``, ``add_device_flags``); infer.py and eval.py also pick the base
and task from the adapters (``add_base_flags``) and generate the same way
(``add_generation_flags``). Flags whose meaning differs per entry point (train.py's --task has
``auto``; --prompt trains in train.py, prefixes the base's captions in eval.py) stay where they
are.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from data.answer_list import read_answer_list
from lora import QUANT_MODES
from models.answer_ranking import DEFAULT_TOP_K
from training.errors import RunError

if TYPE_CHECKING:
    from models.tasks import Task

# argparse's parser and its argument groups both take add_argument.
Group = argparse.ArgumentParser | argparse._ArgumentGroup


def add_debug_flag(p: Group) -> None:
    """--debug: a user error shows its traceback above the one-line message."""
    p.add_argument("--debug", action="store_true",
                   help="on a user error (bad data, missing file, busy folder), also print the "
                        "traceback (for bug reports)")


def add_data_location_flags(g: Group, data_flag: str) -> None:
    """--image-root and --annotations: where the images and VQA v2 answers of ``data_flag``'s
    files are."""
    g.add_argument("--image-root", default=None,
                   help="folder the data files' image paths are relative to (default: looked "
                        "up in the data file's folder, its parents up to the working directory, "
                        "the working directory, and their images/ subfolders)")
    g.add_argument("--annotations", default=None,
                   help=f"VQA v2: the annotations file of {data_flag} (default: the sibling "
                        "named like the questions file, v2_mscoco_<split>_annotations.json)")


def add_quantize_flags(g: Group) -> None:
    """--quantize and --double-quant: how the frozen base's Linear weights are stored."""
    g.add_argument("--quantize", choices=QUANT_MODES, default="none",
                   help="store the frozen base's Linear weights as int8 (per-row absmax) or NF4 "
                        "(QLoRA, blocks of 64); dequantized on the fly, adapters stay fp32. The "
                        "LM head / tied output layer is not quantized")
    g.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="NF4 only: also quantize the per-block scales (8 instead of 32 bits "
                        "per 64 weights)")


def add_threads_flag(g: Group) -> None:
    """--threads: torch's CPU threads."""
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: one per core idle at start, at most torch's "
                        "default: a busy core shared by two threads slows torch several-fold)")


def add_device_flags(g: Group) -> None:
    """--device and --threads."""
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto")
    add_threads_flag(g)


def add_base_flags(g: Group) -> None:
    """--model and --task, both read from the adapters unless given."""
    g.add_argument("--model", default=None,
                   help="hub id or local BLIP / BLIP-2 directory (default: the adapters' base "
                        "model, else the embedded tiny BLIP of the task)")
    g.add_argument("--task", choices=["caption", "vqa"], default=None,
                   help="default: the adapters' task, else the model's")


def add_generation_flags(g: Group, max_new_tokens: bool = True) -> None:
    """--num-beams (and --max-new-tokens): how captions and answers are generated."""
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy)")
    if max_new_tokens:
        g.add_argument("--max-new-tokens", type=int, default=None,
                       help="most tokens generated per caption or answer (default: 30, and 10 "
                            "for BLIP VQA answers, as train.py's report generates)")


def generation_kwargs(args: argparse.Namespace) -> dict[str, int]:
    """num_beams, and max_new_tokens only when given: each task keeps its own default."""
    given = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}
    return {"num_beams": args.num_beams, **given}


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_answer_list_flags(g: Group) -> None:
    """--answer-list and --answer-top-k: BLIP VQA answers ranked from a candidate list."""
    g.add_argument("--answer-list", default=None, metavar="FILE",
                   help="BLIP VQA: answer with one of these candidates instead of generating "
                        "freely (a .json list of strings, or one answer per line), by BLIP's "
                        "rank decoding: the --answer-top-k candidates whose first token is most "
                        "likely are scored by their whole log-likelihood and the best is the "
                        "answer (--num-beams and --max-new-tokens then do not apply)")
    g.add_argument("--answer-top-k", type=positive_int, default=DEFAULT_TOP_K,
                   help="with --answer-list: candidates scored in full per question (BLIP's "
                        "k_test; the whole list when it is shorter: exact argmax)")


def answer_list_kwargs(args: argparse.Namespace, task: Task) -> dict[str, Any]:
    """answer_list / answer_top_k for ``task``'s predict when --answer-list is given (the file
    read and checked); a RunError where the task does not rank answers."""
    if args.answer_list is None:
        return {}
    if (task.family, task.name) != ("blip", "vqa"):
        raise RunError(f"--answer-list ranks BLIP VQA answers; this is {task.family} "
                       f"{task.name}")
    return {"answer_list": read_answer_list(args.answer_list), "answer_top_k": args.answer_top_k}
