"""Memory and speed of LoRA training on a quantized frozen base: none / int8 / nf4 × checkpointing.

Two kinds of model, each setting in a fresh process so its memory is its own:
  * ``--preset blip-base``: a random ``BlipConfig()`` captioning model (≈ blip-image-captioning-
    base, 224M parameters, 384 px), saved once as a checkpoint with a BERT-layout vocabulary and
    its processor, and loaded the way train.py loads it: ``load_model(quantize=...)``;
    rank-16 adapters on the vision and text Linears;
  * ``--preset mid`` / ``small``: a random BLIP-2 (mid: ViT-B/16 at 224 px, a 12-layer Q-Former,
    an OPT-350m-shaped language model, ~520M parameters) built in this process, then quantized
    on its way to the device (``place_model``); adapters on the vision, Q-Former and language
    Linears.
Reported per setting:
  * frozen bytes: the base's stored parameters and buffers as run ("as run": on CPU what is not
    quantized stays fp32), and against the same model in fp16 (2 bytes per parameter, what a
    GPU user would otherwise load) with the unquantized rest in fp16 too (--base-dtype fp16);
    "Linear" counts only the Linear weights that get quantized (embeddings, norms, biases and
    the tied LM head stay as they are);
  * the weight bytes quantization removes (those Linears as run minus their quantized form),
    and how much of it the resident memory (model loaded and quantized, every weight read once:
    a memory-mapped checkpoint is only read in on first use) and the training peak drop
    against "none" (the target: at least 80% of the removed bytes);
  * peak memory: while loading, and during the steps (CPU VmHWM, reset once the model is
    resident; torch.cuda.max_memory_allocated with --device cuda);
  * step time (forward + backward + AdamW on the adapters), median, and its ratio to "none";
  * the optimizer's state bytes, and per adapter parameter (``--optimizer``: AdamW 8 + the step
    counters; adamw8bit ~2.03 for tensors of at least 4096 elements, 8 for smaller ones).
On CPU the unquantized base and the compute are fp32 (fp16 matmuls are slow there); with
--device cuda the base is fp16 and the step runs under fp16 autocast.

    python bench/bench_memory.py --preset blip-base --threads 1 --batch 2 --malloc default
    python bench/bench_memory.py --threads 2 --batch 1 --repeats 2   # ~5 min on 2 quiet cores
    python bench/bench_memory.py --preset small                      # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import (
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora import (
    LoRAConfig,
    QuantizedLinear,
    frozen_bytes,
    inject_lora,
    quantizable_linears,
    weight_bytes,
)
from models.loading import (
    enable_activation_checkpointing,
    load_model,
    place_model,
    release_freed_memory,
)
from training.adamw8bit import OPTIMIZERS, state_bytes

QUERY_TOKENS = 32
IMAGE_TOKEN = 50265  # one past OPT's last real token, as in Salesforce/blip2-opt-*
PRESETS = {  # (vision hidden, vision layers, qformer layers, LM hidden, LM layers, image px)
    "mid": (768, 12, 12, 1024, 24, 224),
    "small": (256, 2, 2, 256, 2, 64),
}
CAPTION = "blip-base"  # BlipConfig() defaults: ViT-B/16 at 384 px, 12-layer BERT text decoder
BLIP_IMAGE = 384
BLIP_BOS = 30522  # [DEC], as in Salesforce/blip-image-captioning-*


def write_blip_base(folder: Path) -> Path:
    """A random BlipConfig() captioning checkpoint with its processor, saved in ``folder``.

    The vocabulary has bert-base-uncased's special-token layout and BLIP's [DEC]/[ENC] at
    30522/30523 (see ../shared/FIELD_NOTES.md); its words are filler, which memory ignores.
    """
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + [f"[filler{i}]" for i in range(BLIP_BOS - len(specials))]
    (folder / "vocab.txt").write_text("\n".join([*vocab, "[DEC]", "[ENC]"]) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]",
                              additional_special_tokens=["[ENC]"])
    image = BlipImageProcessor(size={"height": BLIP_IMAGE, "width": BLIP_IMAGE})
    BlipProcessor(image, tokenizer).save_pretrained(folder)
    config = BlipConfig()
    config.vision_config.initializer_range = 0.02  # the default 1e-10 is an all-zero tower
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    return folder


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


def make_caption_batch(batch: int, seq: int, device: torch.device) -> dict:
    """Random caption tokens after [DEC]; BLIP's loss covers them all."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    ids[:, 0] = BLIP_BOS
    pixels = torch.randn(batch, 3, BLIP_IMAGE, BLIP_IMAGE, generator=g)
    return {k: v.to(device) for k, v in
            {"pixel_values": pixels, "input_ids": ids, "labels": ids.clone()}.items()}


def read_every_weight(model: nn.Module) -> None:
    """Read each CPU tensor once: a memory-mapped checkpoint is only paged in on first use."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu" and t.numel():
            t.detach().reshape(-1).view(torch.uint8).max()


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


def load(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, tuple, dict]:
    """(model on ``device``, quantized as ``args.mode``; its adapter targets; a batch)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.preset == CAPTION:
        model = load_model(str(args.checkpoint), dtype=dtype, device=device,
                           quantize=args.mode)[0]
        return model, ("vision", "text"), make_caption_batch(args.batch, args.seq, device)
    model = build_blip2(args.preset).to(dtype)
    place_model(model, device, args.mode)
    batch = make_batch(args.batch, args.seq, PRESETS[args.preset][5], device)
    return model, ("vision", "qformer", "language"), batch


def worker(args: argparse.Namespace) -> dict:
    """One setting, in this process: load, quantize, attach adapters, time the steps."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model, targets, batch = load(args, device)
    # the same Linears in every setting: quantized, or the ones quantization would take
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)] or [
        model.get_submodule(p) for p in quantizable_linears(model)]
    dtype_bytes = next(model.parameters()).element_size()  # of the unquantized base as run
    read_every_weight(model)
    release_freed_memory()
    load_peak = peak_mb(device)
    resident = torch.cuda.memory_allocated() / 2**20 if cuda else status_kb("VmRSS") / 1024
    inj = inject_lora(model, LoRAConfig(r=16, alpha=32, targets=targets))
    if args.checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    opt = OPTIMIZERS[args.optimizer](inj.adapter_parameters(), lr=1e-4)
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
    trainable, total = inj.parameter_counts()
    linear_params = sum(m.out_features * m.in_features for m in linears)
    return {"mode": args.mode, "checkpointing": args.checkpointing, "params": total - trainable,
            "linear_params": linear_params, "stored_total": frozen_bytes(model),
            "linear_as_run": linear_params * dtype_bytes,
            "stored_linear": sum(weight_bytes(m) for m in linears),
            "load_peak_mb": load_peak, "resident_mb": resident,
            "peak_mb": peak_mb(device), "step_s": statistics.median(times),
            "optimizer": args.optimizer, "adapter_params": trainable,
            "optimizer_state": state_bytes(opt)}


def table(rows: list[dict], device: str) -> str:
    """Markdown table of all settings: bytes against an fp16 base, peak memory, step times."""
    mem = "peak CUDA MiB" if device.startswith("cuda") else "peak RSS MiB"
    base = {r["checkpointing"]: r["step_s"] for r in rows if r["mode"] == "none"}
    lines = [f"| base | checkpointing | frozen MB as run | frozen × fp16 base | Linear × fp16 "
             f"| {mem} | step s | × none step | optimizer state MB (B/param) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fp16_linear = 2 * r["linear_params"]
        rest = 2 * (r["params"] - r["linear_params"])  # embeddings, norms, biases, tied head
        linear = fp16_linear if r["mode"] == "none" else r["stored_linear"]
        lines.append(
            f"| {r['mode']} | {'on' if r['checkpointing'] else 'off'} "
            f"| {r['stored_total'] / 1e6:.0f} | {(linear + rest) / (fp16_linear + rest):.3f} "
            f"| {linear / fp16_linear:.3f} | {r['peak_mb']:.0f} | {r['step_s']:.2f} "
            f"| {r['step_s'] / base[r['checkpointing']]:.2f} | {optimizer_state(r)} |")
    return "\n".join(lines)


def optimizer_state(row: dict) -> str:
    """The optimizer's state bytes and bytes per adapter parameter (rows saved before it was
    measured: —)."""
    if "optimizer_state" not in row:
        return "—"
    per_param = row["optimizer_state"] / row["adapter_params"]
    return f"{row['optimizer_state'] / 1e6:.2f} ({per_param:.2f}, {row['optimizer']})"


def savings_table(rows: list[dict], device: str) -> str:
    """Markdown table: the Linear bytes quantization removes, and how much of them the resident
    memory and the training peak drop against "none" (target: at least 80% of them)."""
    mem = "CUDA MiB" if device.startswith("cuda") else "RSS MiB"
    none = {r["checkpointing"]: r for r in rows if r["mode"] == "none"}
    lines = [f"| base | checkpointing | Linear MiB as run → stored | removed MiB "
             f"| load peak {mem} | resident {mem} | resident drop | training peak {mem} "
             f"| peak drop | both drops ≥ 80% of removed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ref = none[r["checkpointing"]]
        removed = (ref["stored_linear"] - r["stored_linear"]) / 2**20
        drops = {k: ref[k] - r[k] for k in ("resident_mb", "peak_mb")}
        shown = {k: f"{d:.0f} ({d / removed:.0%})" if removed else "—" for k, d in drops.items()}
        meets = "—" if not removed else (
            "yes" if min(drops.values()) >= 0.8 * removed else "no")
        lines.append(
            f"| {r['mode']} | {'on' if r['checkpointing'] else 'off'} "
            f"| {r['linear_as_run'] / 2**20:.0f} → {r['stored_linear'] / 2**20:.0f} "
            f"| {removed:.0f} | {r['load_peak_mb']:.0f} | {r['resident_mb']:.0f} "
            f"| {shown['resident_mb']} | {r['peak_mb']:.0f} | {shown['peak_mb']} | {meets} |")
    return "\n".join(lines)


def describe(rows: list[dict], args: argparse.Namespace) -> str:
    """One line: the model and the step measured."""
    if args.preset == CAPTION:
        model = f"BLIP captioning (BlipConfig(), {BLIP_IMAGE} px)"
        tokens = f"{args.seq} text tokens"
    else:
        model = f"BLIP-2 ({args.preset})"
        tokens = f"{args.seq} text + {QUERY_TOKENS} image tokens"
    return (f"{rows[0]['params'] / 1e6:.0f}M-parameter {model}, batch {args.batch}, {tokens}, "
            f"{args.device}, {args.threads} threads, malloc {args.malloc}, "
            f"torch {torch.__version__}")


def run_setting(args: argparse.Namespace, mode: str, checkpointing: bool,
                checkpoint: Path | None) -> dict:
    """One worker process; its row, or exit with the worker's error."""
    cmd = [sys.executable, __file__, "--mode", mode, "--preset", args.preset,
           "--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--device", args.device, "--optimizer", args.optimizer]
    cmd += ["--checkpoint", str(checkpoint)] if checkpoint else []
    cmd += ["--checkpointing"] if checkpointing else []
    env = dict(os.environ)
    if args.malloc == "fixed":  # large tensors are mmapped, so freeing them really lowers RSS
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"bench_memory: {mode} (checkpointing {checkpointing}) failed:\n"
                 f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=[CAPTION, *sorted(PRESETS)], default="mid",
                    help=f"model: {CAPTION} (BlipConfig() captioning, loaded from a saved "
                         "checkpoint) or a BLIP-2 size")
    ap.add_argument("--batch", type=int, default=2, help="images per step")
    ap.add_argument("--seq", type=int, default=24, help="text tokens per image")
    ap.add_argument("--repeats", type=int, default=2, help="timed steps (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw",
                    help="optimizer of the adapters (as train.py --optimizer); its state bytes "
                         "are reported per setting")
    ap.add_argument("--malloc", choices=("fixed", "default"), default="default",
                    help="fixed: workers run with MALLOC_MMAP_THRESHOLD_=65536, so freed tensors "
                         "leave RSS at once; default: glibc's dynamic threshold, as train.py runs")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help=f"{CAPTION}: where its checkpoint is (written there if missing; "
                         "default: a temporary directory, removed afterwards)")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--table-from", type=Path, default=None,
                    help="print the table of rows saved earlier with --out, and exit")
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # set for the per-setting worker process
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args()


def print_tables(rows: list[dict], device: str) -> None:
    print(table(rows, device))
    if all("linear_as_run" in r for r in rows):  # rows saved before it was measured lack it
        print()
        print(savings_table(rows, device))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    args = parse_args()
    if args.table_from:  # re-print a saved run's tables
        print_tables(json.loads(args.table_from.read_text()), args.device)
        return
    if args.mode:
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if args.preset == CAPTION:
            checkpoint = args.checkpoint or Path(tmp) / CAPTION
            if not (checkpoint / "config.json").is_file():
                write_blip_base(checkpoint)
        rows = []
        for mode in ("none", "int8", "nf4"):
            for ckpt in (False, True):
                rows.append(run_setting(args, mode, ckpt, checkpoint))
                print(f"{mode:5} checkpointing={ckpt}: {rows[-1]}", file=sys.stderr)
    print(describe(rows, args))
    print_tables(rows, args.device)
    if args.out:
        write_atomic(args.out, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
