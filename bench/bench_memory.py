"""Memory and speed of LoRA training on a quantized frozen base: none / int8 / nf4 × checkpointing.

A mid-size random BLIP-2 (ViT-B/16 at 224 px, a 12-layer Q-Former, an OPT-350m-shaped language
model: ~520M parameters) trains rank-16 adapters on the vision, Q-Former and language Linears.
Each of the six settings runs in a fresh process, so peak memory is its own:
  * frozen bytes: the base's stored parameters and buffers as run ("as run": on CPU what is not
    quantized stays fp32), and against the same model in fp16 (2 bytes per parameter, what a
    GPU user would otherwise load) with the unquantized rest in fp16 too (--base-dtype fp16);
    "Linear" counts only the Linear weights that get quantized (embeddings, norms, biases and
    the tied LM head stay as they are);
  * peak memory during the timed steps: CPU peak RSS (VmHWM, reset after the model is built and
    quantized), or torch.cuda.max_memory_allocated with --device cuda;
  * step time (forward + backward + AdamW on the adapters), median, and its ratio to "none".
On CPU the unquantized base and the compute are fp32 (fp16 matmuls are slow there); with
--device cuda the base is fp16 and the step runs under fp16 autocast.

    python bench/bench_memory.py --threads 2 --batch 1 --repeats 2   # ~5 min on 2 quiet cores
    python bench/bench_memory.py --preset small                      # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora import (
    LoRAConfig,
    frozen_bytes,
    inject_lora,
    quantizable_linears,
    quantize_model,
    weight_bytes,
)
from models.loading import enable_activation_checkpointing

QUERY_TOKENS = 32
IMAGE_TOKEN = 50265  # one past OPT's last real token, as in Salesforce/blip2-opt-*
PRESETS = {  # (vision hidden, vision layers, qformer layers, LM hidden, LM layers, image px)
    "mid": (768, 12, 12, 1024, 24, 224),
    "small": (256, 2, 2, 256, 2, 64),
}


def build_blip2(preset: str) -> Blip2ForConditionalGeneration:
    """A random-init BLIP-2 with an OPT language model of the preset's size."""
    v_hidden, v_layers, q_layers, lm_hidden, lm_layers, image = PRESETS[preset]
    vision = dict(hidden_size=v_hidden, intermediate_size=4 * v_hidden,
                  num_hidden_layers=v_layers, num_attention_heads=v_hidden // 64,
                  image_size=image, patch_size=16)
    qformer = dict(hidden_size=768, num_hidden_layers=q_layers, num_attention_heads=12,
                   intermediate_size=3072, encoder_hidden_size=v_hidden)
    text = dict(model_type="opt", vocab_size=50272 + 1, hidden_size=lm_hidden,
                ffn_dim=4 * lm_hidden, num_hidden_layers=lm_layers,
                num_attention_heads=lm_hidden // 64, word_embed_proj_dim=min(512, lm_hidden),
                max_position_embeddings=2048)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                         num_query_tokens=QUERY_TOKENS, image_token_index=IMAGE_TOKEN)
    return Blip2ForConditionalGeneration(config)


def make_batch(batch: int, seq: int, image: int, device: torch.device) -> dict:
    """Image tokens then random text; the loss covers the text."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 50000, (batch, seq), generator=g)
    ids = torch.cat([torch.full((batch, QUERY_TOKENS), IMAGE_TOKEN), text], dim=1)
    labels = ids.clone()
    labels[:, :QUERY_TOKENS] = -100
    pixels = torch.randn(batch, 3, image, image, generator=g)
    return {k: v.to(device) for k, v in
            {"pixel_values": pixels, "input_ids": ids, "labels": labels}.items()}


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS so RSS shows what is live (glibc only)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return status_kb("VmHWM") / 1024


def worker(args: argparse.Namespace) -> dict:
    """One setting, in this process: build, quantize, attach adapters, time the steps."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = build_blip2(args.preset).to(torch.float16 if cuda else torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    linears = quantizable_linears(model)  # the same set in every setting, quantized or not
    linear_params = sum(model.get_submodule(p).weight.numel() for p in linears)
    quantize_model(model, args.mode, double_quant=True)
    model.to(device)
    stored_linear = sum(weight_bytes(model.get_submodule(p)) for p in linears)
    inj = inject_lora(model, LoRAConfig(r=16, alpha=32, targets=("vision", "qformer", "language")))
    if args.checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW(inj.adapter_parameters(), lr=1e-4)
    batch = make_batch(args.batch, args.seq, PRESETS[args.preset][5], device)
    release_freed_memory()
    resident = peak_mb(device) if cuda else status_kb("VmRSS") / 1024
    reset_peak(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up (also allocates AdamW state)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"mode": args.mode, "checkpointing": args.checkpointing, "params": n_params,
            "linear_params": linear_params, "stored_total": frozen_bytes(model),
            "stored_linear": stored_linear, "resident_mb": resident,
            "peak_mb": peak_mb(device), "step_s": statistics.median(times)}


def table(rows: list[dict], device: str) -> str:
    """Markdown table of all settings: bytes against an fp16 base, peak memory, step times."""
    mem = "peak CUDA MiB" if device.startswith("cuda") else "peak RSS MiB"
    base = {r["checkpointing"]: r["step_s"] for r in rows if r["mode"] == "none"}
    lines = [f"| base | checkpointing | frozen MB as run | frozen × fp16 base | Linear × fp16 "
             f"| {mem} | step s | × none step |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fp16_linear = 2 * r["linear_params"]
        rest = 2 * (r["params"] - r["linear_params"])  # embeddings, norms, biases, tied head
        linear = fp16_linear if r["mode"] == "none" else r["stored_linear"]
        lines.append(
            f"| {r['mode']} | {'on' if r['checkpointing'] else 'off'} "
            f"| {r['stored_total'] / 1e6:.0f} | {(linear + rest) / (fp16_linear + rest):.3f} "
            f"| {linear / fp16_linear:.3f} | {r['peak_mb']:.0f} | {r['step_s']:.2f} "
            f"| {r['step_s'] / base[r['checkpointing']]:.2f} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="mid", help="model size")
    ap.add_argument("--batch", type=int, default=2, help="images per step")
    ap.add_argument("--seq", type=int, default=24, help="text tokens per image")
    ap.add_argument("--repeats", type=int, default=2, help="timed steps (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--table-from", type=Path, default=None,
                    help="print the table of rows saved earlier with --out, and exit")
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # set for the per-setting worker process
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.table_from:  # re-print a saved run's table
        print(table(json.loads(args.table_from.read_text()), args.device))
        return
    if args.mode:
        print(json.dumps(worker(args)))
        return
    rows = []
    common = ["--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq),
              "--repeats", str(args.repeats), "--threads", str(args.threads),
              "--device", args.device]
    # fixed mmap threshold: large tensors are mmapped, so freeing them really lowers RSS
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for mode in ("none", "int8", "nf4"):
        for ckpt in (False, True):
            cmd = [sys.executable, __file__, "--mode", mode, *common]
            out = subprocess.run(cmd + (["--checkpointing"] if ckpt else []), env=env,
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{mode:5} checkpointing={ckpt}: {rows[-1]}", file=sys.stderr)
    print(f"{rows[0]['params'] / 1e6:.0f}M-parameter BLIP-2 ({args.preset}), batch {args.batch},"
          f" {args.seq} text + {QUERY_TOKENS} image tokens, {args.device}, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(table(rows, args.device))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
