"""Forward time of one batch whose samples use different adapters: mixed vs one adapter vs loops.

A small random BLIP captioning model (no download), rank-16 adapters on every vision and text
Linear, one batch of ``--batch`` images with their captions, forward only (no_grad, eval mode).
Timed in one process, the settings interleaved in each round so machine noise hits all alike:
  * one:        every sample uses adapter 0 (the ordinary hooks; the reference, 1.00×);
  * mixed:      ``injection.per_sample``: the samples spread evenly over ``--adapters`` adapters,
                interleaved (sample i uses adapter i mod n: every adapter's rows are gathered);
  * mixed-sorted: the same batch ordered by adapter (each adapter's rows are one slice);
  * loop-rows:  the naive loop: for each adapter, set_active and forward its own samples;
  * loop-batch: the naive loop that runs the whole batch once per adapter and keeps that
                adapter's rows (what a model with one active adapter at a time costs).
The medians of ``--repeats`` rounds and their ratios to "one" are printed as a Markdown table.

    python bench/bench_mixed_adapters.py --threads 1 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import BlipConfig, BlipForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora import LoRAConfig, LoRAInjection, inject_lora


def build_model(hidden: int, layers: int, image: int, vocab: int) -> BlipForConditionalGeneration:
    """A random BLIP with text and vision of width ``hidden`` (init 1/sqrt(hidden))."""
    init = hidden**-0.5
    text = dict(vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=hidden,
                intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=hidden // 64, bos_token_id=1, sep_token_id=2,
                eos_token_id=2, pad_token_id=0, initializer_range=init)
    vision = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                  num_attention_heads=hidden // 64, image_size=image, patch_size=16,
                  initializer_range=init)
    config = BlipConfig(text_config=text, vision_config=vision, initializer_range=init)
    return BlipForConditionalGeneration(config).eval()


def add_adapters(model: BlipForConditionalGeneration, n: int, r: int) -> LoRAInjection:
    """``n`` adapters named a0, a1, ... with random non-zero A and B."""
    inj = inject_lora(model, LoRAConfig(r=r, alpha=2 * r, targets=("vision", "text")), name="a0")
    for i in range(1, n):
        inj.add_adapter(f"a{i}", LoRAConfig(r=r, alpha=2 * r, targets=("vision", "text")))
    with torch.no_grad():
        for p in inj.parameters():
            p.normal_(0, 0.02)
    return inj


def settings(model: BlipForConditionalGeneration, inj: LoRAInjection, batch: dict,
             names: list[str]) -> dict[str, Callable[[], None]]:
    """The forwards to time, by setting name."""
    order = sorted(range(len(names)), key=lambda i: names[i])
    sorted_batch = {k: v[order] for k, v in batch.items()}
    sorted_names = [names[i] for i in order]

    def one() -> None:
        inj.set_active(["a0"])
        model(**batch)

    def mixed() -> None:
        with inj.per_sample(names):
            model(**batch)

    def mixed_sorted() -> None:
        with inj.per_sample(sorted_names):
            model(**sorted_batch)

    def loop_rows() -> None:
        for name in dict.fromkeys(names):
            inj.set_active([name])
            rows = torch.tensor([i for i, n in enumerate(names) if n == name],
                                device=batch["input_ids"].device)
            model(**{k: v[rows] for k, v in batch.items()})

    def loop_batch() -> None:
        for name in dict.fromkeys(names):
            inj.set_active([name])
            model(**batch)

    return {"one": one, "mixed": mixed, "mixed-sorted": mixed_sorted,
            "loop-rows": loop_rows, "loop-batch": loop_batch}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="samples in the batch")
    ap.add_argument("--adapters", type=int, default=4, help="adapters mixed in the batch")
    ap.add_argument("--hidden", type=int, default=256, help="width of the vision and text models")
    ap.add_argument("--layers", type=int, default=4, help="layers of each tower")
    ap.add_argument("--image", type=int, default=96, help="image side in pixels (16 px patches)")
    ap.add_argument("--seq", type=int, default=16, help="caption tokens per sample")
    ap.add_argument("--r", type=int, default=16, help="adapter rank")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds (medians reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model, adapters and batch")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timed with a synchronize)")
    args = ap.parse_args()
    if args.batch % args.adapters:
        ap.error("--batch must be a multiple of --adapters (each adapter gets as many samples)")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vocab = 1000
    model = build_model(args.hidden, args.layers, args.image, vocab)
    inj = add_adapters(model, args.adapters, args.r)
    device = torch.device(args.device)
    model.to(device)
    inj.to(device)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=g)
    batch = {"pixel_values": torch.randn(args.batch, 3, args.image, args.image, generator=g),
             "input_ids": ids}
    batch = {k: v.to(device) for k, v in batch.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    names = [f"a{i % args.adapters}" for i in range(args.batch)]  # interleaved, not sorted
    runs = settings(model, inj, batch, names)
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up: allocator, kernels, row plans
            fn()
        for _ in range(args.repeats):
            for key, fn in runs.items():
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[key].append(time.perf_counter() - t)
    median = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"BLIP {params:.1f}M params (hidden {args.hidden}, {args.layers}+{args.layers} layers, "
          f"{args.image} px, {args.seq} tokens), batch {args.batch}, {args.adapters} adapters of "
          f"rank {args.r}, {args.device}, {args.threads} thread(s), median of {args.repeats}, "
          f"torch {torch.__version__}")
    print("| setting | forward s | × one adapter |\n|---|---:|---:|")
    for key, t in median.items():
        print(f"| {key} | {t:.4f} | {t / median['one']:.2f} |")


if __name__ == "__main__":
    main()
