"""Speed of LoRA vs its bounds on a mid-size random BLIP, all measured in one run.

Forward (no grad): base vs hooked (unmerged) vs merged.
Training step (forward + backward + AdamW), same batch:
  * bound: frozen base, backward to the inputs only (no weight gradients) — what a LoRA step
    can at best cost, since gradients must still flow through every layer to reach the adapters;
  * LoRA: adapters on every vision + text Linear;
  * full fine-tuning: every parameter trained.

    python bench/bench_lora.py --threads 2
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
from lora import LoRAConfig, inject_lora


def mid_blip(hidden: int, layers: int, image: int) -> BlipForConditionalGeneration:
    """A BERT-small-sized BLIP (random init): big enough that matmuls dominate."""
    text = dict(vocab_size=8000, hidden_size=hidden, encoder_hidden_size=hidden,
                intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=6,
                max_position_embeddings=64, bos_token_id=1, sep_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                  num_attention_heads=6, image_size=image, patch_size=16, initializer_range=0.02)
    return BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))


def timed(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall seconds of ``fn`` after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_step(model, batch, params, opt) -> Callable[[], None]:
    """One forward + backward + optimizer step over ``params``."""

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hidden", type=int, default=384, help="hidden size of both towers")
    ap.add_argument("--layers", type=int, default=4, help="layers in each tower")
    ap.add_argument("--image-size", type=int, default=224, help="image side in pixels (patch 16)")
    ap.add_argument("--batch", type=int, default=4, help="images (and captions) per step")
    ap.add_argument("--seq", type=int, default=24, help="caption length in tokens")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = mid_blip(args.hidden, args.layers, args.image_size).train()
    ids = torch.randint(3, 8000, (args.batch, args.seq))
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size)
    batch = {"pixel_values": pixels, "input_ids": ids, "labels": ids}
    n_params = sum(p.numel() for p in model.parameters())
    t = {}
    rep = dict(warmup=2, repeats=args.repeats)

    # Full fine-tuning first, while the model is still trainable.
    full_opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    t["step_full"] = timed(train_step(model, batch, list(model.parameters()), full_opt), **rep)
    del full_opt

    model.requires_grad_(False)
    with torch.no_grad():
        t["fwd_base"] = timed(lambda: model(**batch), **rep)
    bound_batch = {**batch, "pixel_values": pixels.clone().requires_grad_()}
    t["step_bound"] = timed(lambda: model(**bound_batch).loss.backward(), **rep)

    inj = inject_lora(model, LoRAConfig(r=args.r, alpha=2 * args.r, targets=("vision", "text")))
    trainable, n_lora = inj.parameter_counts()[0], len(inj.adapters["default"].paths)
    lora_opt = torch.optim.AdamW(inj.adapter_parameters(), lr=1e-4)
    t["step_lora"] = timed(train_step(model, batch, inj.adapter_parameters(), lora_opt), **rep)
    with torch.no_grad():
        for p in inj.parameters():
            p.normal_(0, 0.01)
        t["fwd_hooked"] = timed(lambda: model(**batch), **rep)
        inj.merge(exact_unmerge=False)
        t["fwd_merged"] = timed(lambda: model(**batch), **rep)
        inj.remove()  # base again, last: the first measurement pays warm-up the others do not
        t["fwd_base"] = min(t["fwd_base"], timed(lambda: model(**batch), **rep))

    print(f"BLIP hidden {args.hidden}, {args.layers}+{args.layers} layers, image "
          f"{args.image_size}, batch {args.batch}x{args.seq} tokens, {n_params / 1e6:.1f}M params; "
          f"LoRA r={args.r} on {n_lora} Linears, "
          f"{trainable / 1e6:.2f}M trainable; torch {torch.__version__}, {args.threads} threads")
    rows = [
        ("forward, base", "fwd_base", "fwd_base"),
        ("forward, LoRA hooked (unmerged)", "fwd_hooked", "fwd_base"),
        ("forward, LoRA merged", "fwd_merged", "fwd_base"),
        ("step, bound: frozen fwd + input-bwd", "step_bound", "step_bound"),
        ("step, LoRA (fwd + bwd + AdamW)", "step_lora", "step_bound"),
        ("step, full fine-tuning", "step_full", "step_bound"),
    ]
    print("| measurement | median ms | ratio |\n|---|---:|---:|")
    for label, key, ref in rows:
        print(f"| {label} | {1e3 * t[key]:.1f} | {t[key] / t[ref]:.2f}x {ref} |")
    print(f"| LoRA step / full fine-tuning step | | {t['step_lora'] / t['step_full']:.2f}x |")


if __name__ == "__main__":
    main()
