"""Train LoRA adapters on a frozen BLIP model; only the adapters are trained and saved.

    python train.py --r 16 --alpha 32                       # embedded tiny BLIP, shipped cubes
    python train.py --model Salesforce/blip-image-captioning-large --r 16 --alpha 32 ...
    torchrun --nproc_per_node=8 train.py ...                 # data parallel, one GPU per process

The loop reads top to bottom: AdamW over adapter parameters, linear warm-up then cosine decay
per optimizer step, exact gradient accumulation, clipping, autocast (fp16 + GradScaler on CUDA;
fp32 on CPU unless --precision bf16), a validation loss (and --select-best metric) each epoch,
resumable checkpoints, a JSONL metrics log (and TensorBoard scalars). --task vqa trains BLIP VQA
(or prompted BLIP-2 VQA) the same way. Under torchrun every process trains on its share of each
batch (DDP over the adapters), rank 0 alone writes.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP workers spin briefly, then sleep, so a process that
# starts on a busy core later costs ~3x instead of ~6x (training/threads.py has the numbers).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers.utils import logging as hf_logging

from cli import DEFAULT_DATA, ROOT, numbered_dir
from cli.train_flags import parse_args
from data.dataset import split_by_image
from evaluation import is_correct
from evaluation.curves import plot_curves
from lora import (
    LoRAConfig,
    LoRAInjection,
    inject_lora,
    load_adapter,
    read_metadata,
    save_adapter,
)
from lora.adapter_file import library_versions
from lora.init_methods import to_plain, to_training_form
from lora.targets import model_family, resolve_targets, select_targets
from lora.token_rows import resolve_trainable_tokens, task_target_labels
from models.base_model import base_model_metadata
from models.loading import (
    DEFAULT_MODELS,
    enable_activation_checkpointing,
    load_model,
    pick_device,
)
from models.tasks import Task, TaskDataset, make_task
from training import distributed, selection
from training.accumulation import steps_per_epoch, windows
from training.checkpoint import (
    ADAPTER,
    Position,
    latest_checkpoint,
    load_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.errors import RunError, exit_on_user_errors
from training.metrics_log import MetricsLog, truncate_to
from training.optimizer import make_optimizer
from training.run_dir import LOCK_NAME, clean_stale_temporaries, lock_run_dir
from training.schedule import make_scheduler
from training.signals import graceful_interrupts
from training.tensorboard_log import TensorBoardLog, require_tensorboard
from training.threads import choose_threads

log = logging.getLogger("train")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Settings a resumed run may change: where and how fast it runs, what it reports at the end.
# Every other flag, and the derived settings below, change the adapters the run ends with and
# must match the checkpoint's (a flag added later is compared without anyone listing it).
# --num-beams is compared: --select-best may generate with it to pick best.safetensors.
MAY_CHANGE_ON_RESUME = frozenset({
    "device", "threads", "num_workers", "output_dir", "resume", "stop_after_steps", "save_every",
    "keep_checkpoints", "eval_file", "eval_base", "log_to", "debug"})
DERIVED_SETTINGS = ("amp_dtype", "grad_scaler", "world_size", "train_samples", "val_samples")


def parse_patterns(items: list[str], kind: type) -> dict[str, Any]:
    """['qkv=8', 're:.*fc1=4'] -> {'qkv': 8, 're:.*fc1': 4}."""
    out = {}
    for item in items:
        pattern, sep, value = item.rpartition("=")
        if not sep or not pattern:
            raise RunError(f"bad pattern override {item!r}: expected PATTERN=VALUE")
        out[pattern] = kind(value)
    return out


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether to use a GradScaler).

    auto: bf16 on GPUs that support it natively (fp16 overflows in T5's activations, which
    GradScaler cannot catch, and needs the scaler at all), fp16 + GradScaler on older GPUs, fp32
    on CPU (bf16 autocast ran 8x slower than fp32 on a 2-core x86 without native bf16)."""
    if precision == "auto" and device.type == "cuda":
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        precision = "bf16" if native_bf16 else "fp16"
    elif precision == "auto":
        precision = "fp32"
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return dtype, dtype == torch.float16


def git_commit() -> str:
    """The checkout's commit, or '' outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def load_samples(task: Task, path: str, args: argparse.Namespace) -> list:
    """Samples of one data file (the loader logs what --skip-bad-samples skipped)."""
    annotations = args.annotations if path == args.train_file else None
    return task.load_samples(path, skip_bad_samples=args.skip_bad_samples,
                             image_root=args.image_root, annotations=annotations)[0]


def quiet_rng() -> torch.Generator:
    """A DataLoader generator: without one, each new iterator draws a seed from the global RNG,
    which would shift dropout masks after a mid-epoch resume."""
    return torch.Generator().manual_seed(0)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled micro-batches of one epoch: a function of (seed, epoch) only."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]


def rank_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's share of each of the epoch's micro-batches (``batch_size`` per process).

    The epoch's permutation is cut into global micro-batches of batch_size × world samples, and
    rank r takes every world-th index of each from the r-th on. Where the epoch divides evenly
    this is DistributedSampler's layout (same permutation, tested); its last, short micro-batch
    is shared out as it is (a rank may get fewer samples, or none) instead of being padded with
    repeated samples or cut, so every global batch is exactly the one a single process with
    batch_size × world would see. In one process: epoch_batches.
    """
    rank, world = distributed.rank_and_world()
    return [b[rank::world] for b in epoch_batches(n, batch_size * world, seed, epoch)]


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> torch.autocast:
    """torch.autocast for ``amp_dtype``, disabled when it is None (fp32)."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                          enabled=amp_dtype is not None)


def forward_loss(task: Task, model, batch: dict, device, amp_dtype, label_smoothing: float):
    """(summed token loss, token count) of one micro-batch under autocast."""
    # Float inputs (pixels) follow the base's dtype, so an fp16 base also runs without autocast.
    batch = {k: v.to(device, model.dtype if v.is_floating_point() else v.dtype, non_blocking=True)
             for k, v in batch.items()}
    with autocast(device, amp_dtype):
        return task.loss_sum(model, batch, label_smoothing)


@torch.no_grad()
def validation_loss(task: Task, model, loader, device, amp_dtype) -> float:
    """Token-mean loss over a loader (each rank's share, summed over ranks), in eval mode."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        loss, n = forward_loss(task, model, batch, device, amp_dtype, 0.0)
        total, count = total + loss.item(), count + n
    model.train()
    total, count = distributed.sum_across_ranks([total, count], device)
    return total / count if count else math.nan  # NaN: never the best, never 0/0


def exact_match_report(task: Task, samples, args, amp_dtype, device) -> dict[str, float]:
    """Exact-match accuracy overall and per ``split`` field (evaluation.is_correct: eval.py's
    definition, so eval.json agrees with eval.py's exact_match)."""
    units = task.eval_units(samples)
    with autocast(device, amp_dtype):
        preds = task.predict_units(units, args.eval_batch_size, desc="eval",
                                   num_beams=args.num_beams)
    hits: dict[str, list[bool]] = {}
    for (sample, refs), pred in zip(units, preds, strict=True):
        ok = is_correct(task.name, pred, refs)
        hits.setdefault("all", []).append(ok)
        if sample.split:
            hits.setdefault(sample.split, []).append(ok)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def main(argv: list[str] | None = None) -> Path:
    """Train; returns the path of the final adapter file (under torchrun, rank 0 writes it)."""
    args = parse_args(argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    choose_threads(args.threads)
    # One stream for the run's log: records go to stderr above the progress bar (also stderr)
    # instead of being glued to it; stdout carries only the final "adapter: <path>" line.
    with exit_on_user_errors("train.py", debug=args.debug), logging_redirect_tqdm(), \
            distributed.process_group(pick_device(args.device)) as device:  # no-op outside torchrun
        return run(args, device)


@dataclasses.dataclass
class Run:
    """What the training loop needs, built once by ``build_run``; ``pos`` moves on as it trains."""

    args: argparse.Namespace
    device: torch.device
    task: Task
    injection: LoRAInjection
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    adapter_loss: torch.nn.Module  # one micro-batch -> (summed token loss, targets); DDP-wrapped
    train_set: TaskDataset
    val_loader: DataLoader | None
    out_dir: Path
    config: dict[str, Any]  # run_config.json
    adapter_meta: dict[str, str]
    amp_dtype: torch.dtype | None
    pos: Position
    metrics: MetricsLog
    bar: tqdm
    val_samples: list = dataclasses.field(default_factory=list)  # scored at the end if no
    # --eval-file was given for a user's data
    start_step: int = 0  # the step this process started at (0, or where it resumed)
    window_rng: dict[str, Any] = dataclasses.field(default_factory=rng_state)
    t0: float = dataclasses.field(default_factory=time.time)
    main_rank: bool = True  # the one process that logs and writes files
    world: int = 1

    @functools.cached_property
    def params(self) -> list[torch.nn.Parameter]:
        """The adapter parameters being trained (fixed for the run: collected once)."""
        return self.injection.adapter_parameters("default")

    def checkpoint(self, rng: dict[str, Any], sync: bool = True) -> Path:
        """Save the adapters and the training state at ``pos`` (rank 0); returns the folder."""
        folder = self.out_dir / "checkpoints" / f"step-{self.pos.step:06d}"
        if self.main_rank:  # every rank holds the same adapters and optimizer state after a step
            state = {"optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(), "rng": rng, "run": self.config}
            save_checkpoint(folder, self.injection, state, self.pos, self.adapter_meta,
                            keep=self.args.keep_checkpoints)
        if sync:
            distributed.barrier()  # no rank runs ahead, or exits, while rank 0 writes
        return folder


def run(args: argparse.Namespace, device: torch.device) -> Path:
    """main()'s training run on ``device``: this process's share when several run."""
    main_rank = distributed.rank_and_world()[0] == 0
    if not main_rank:  # errors only, and no progress bars (transformers' included)
        logging.getLogger().setLevel(logging.WARNING)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if args.log_to == "tensorboard":
        require_tensorboard()  # before minutes of loading and training
    torch.manual_seed(args.seed)
    args.model = args.model or DEFAULT_MODELS["vqa" if args.task == "vqa" else "caption"]
    model, processor, task_name = load_model(  # quantized on the way to the device
        args.model, None if args.task == "auto" else args.task, dtype=DTYPES[args.base_dtype],
        device=device, quantize=args.quantize, double_quant=args.double_quant)
    try:
        task = make_task(model, processor, task_name, prompt=args.prompt,
                         max_length=args.max_length)
    except ValueError as e:  # a --max-length or --prompt this model cannot take
        raise RunError(str(e)) from None
    args.max_length = task.max_length  # the value used, recorded and compared on resume
    train_file, eval_file = (str(ROOT / f) for f in DEFAULT_DATA[task_name])
    # The shipped test set scores the shipped data only: a user's --train-file without an
    # --eval-file is scored on its own validation split (finish), never on the cubes.
    if args.eval_file is None and args.train_file is None:
        args.eval_file = eval_file
    args.train_file = args.train_file or train_file
    out_dir = choose_output_dir(args, task_name)
    with contextlib.ExitStack() as stack:
        if main_rank:  # held until the run ends; a second run on out_dir stops with a message
            stack.enter_context(lock_run_dir(out_dir))
            for path in clean_stale_temporaries(out_dir):
                log.info("removed %s, left by an interrupted write", path)
        resume_dir = find_resume_dir(args, out_dir)
        distributed.barrier()  # every rank has looked at out_dir before rank 0 writes to it
        state = build_run(args, device, model, task, out_dir, resume_dir, processor.tokenizer)
        stack.callback(state.metrics.close)
        stack.callback(state.bar.close)
        stopped = train_epochs(state)
        if stopped:
            return stopped / ADAPTER
        return finish(state)


def choose_output_dir(args: argparse.Namespace, task: str) -> Path:
    """--output-dir; the run folder of an explicit --resume checkpoint; else runs/<task>-lora,
    numbered past non-empty ones (unnumbered with --resume auto)."""
    if args.output_dir:
        return Path(args.output_dir)
    if args.resume and args.resume != "auto":
        return Path(args.resume).resolve().parent.parent  # <run>/checkpoints/step-NNNNNN
    base = ROOT / "runs" / f"{task}-lora"
    return base if args.resume == "auto" else numbered_dir(base)


def find_resume_dir(args: argparse.Namespace, out_dir: Path) -> Path | None:
    """The checkpoint to continue from, None to start afresh; refuses to overwrite a run."""
    if args.resume == "auto":
        found = latest_checkpoint(out_dir)
        if found is None and distributed.is_main():
            log.warning("--resume auto: no checkpoint under %s yet: starting from scratch",
                        out_dir / "checkpoints")
        return found
    if args.resume:
        return Path(args.resume)
    if out_dir.exists() and any(p.name != LOCK_NAME for p in out_dir.iterdir()):
        raise RunError(f"{out_dir} is not empty: pass --resume auto to continue that run (or "
                       "to start it over if it never reached a checkpoint), or choose another "
                       "--output-dir")
    return None


def build_run(args: argparse.Namespace, device: torch.device, model, task: Task, out_dir: Path,
              resume_dir: Path | None, tokenizer: Any = None) -> Run:
    """Data, adapters (fresh or resumed), optimizer, schedule and logs of a run."""
    rank, world = distributed.rank_and_world()
    amp_dtype, use_scaler = resolve_precision(args.precision, device)
    # Data: samples -> seeded train/val split -> datasets (the order is ours, per epoch).
    train_samples = load_samples(task, args.train_file, args)
    args.vqa_targets_used = task.choose_vqa_targets(args.vqa_targets, train_samples)
    if args.val_file:
        val_samples = load_samples(task, args.val_file, args)
    elif args.val_fraction > 0:
        train_samples, val_samples = split_by_image(train_samples, args.val_fraction, args.seed)
    else:
        val_samples = []
    selection.check_selection(args.select_best, task.name, val_samples)
    train_set = TaskDataset(train_samples, task)
    # Each rank scores every world-th validation sample; validation_loss sums over ranks.
    val_loader = DataLoader(TaskDataset(val_samples[rank::world], task),
                            batch_size=args.eval_batch_size, collate_fn=task.collate,
                            num_workers=args.num_workers, generator=quiet_rng())

    targets = resolve_lora_targets(args.targets, model)
    args.targets = ",".join(targets)  # the presets used, recorded and compared on resume
    lora_cfg = LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, rslora=args.rslora,
                          dora=args.dora, targets=targets,
                          rank_pattern=parse_patterns(args.rank_pattern, int),
                          alpha_pattern=parse_patterns(args.alpha_pattern, float),
                          trainable_tokens=trainable_tokens(args, task, train_samples, tokenizer),
                          init=args.init)
    # A damaged checkpoint fails here, in load_state, before the model changes.
    state, pos = load_state(resume_dir) if resume_dir else (None, Position())
    try:
        if resume_dir:
            injection = load_adapter(model, resume_dir / ADAPTER, name="default")
            to_training_form(injection, "default", read_metadata(resume_dir / ADAPTER))  # PiSSA
        else:
            injection = inject_lora(model, lora_cfg)
    except ValueError as e:  # a pattern that selects nothing; --init pissa on a quantized base
        raise RunError(str(e)) from None
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    adapter_loss = distributed.wrap(distributed.AdapterLoss(injection, lambda batch: forward_loss(
        task, model, batch, device, amp_dtype, args.label_smoothing)), device)
    optimizer = make_optimizer(injection, "default", args.lr, args.weight_decay,
                               args.loraplus_lr_ratio, args.optimizer)
    n_micro = -(-len(train_set) // (args.batch_size * world))  # global micro-batches per epoch
    total_steps = args.epochs * steps_per_epoch(n_micro, args.grad_accum)
    scheduler = make_scheduler(optimizer, round(args.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    config = {**vars(args), "task": task.name, "output_dir": str(out_dir),
              "device": str(device), "amp_dtype": str(amp_dtype), "grad_scaler": use_scaler,
              "world_size": world, "total_steps": total_steps,
              "global_batch": args.batch_size * args.grad_accum * world,
              "train_samples": len(train_samples), "val_samples": len(val_samples),
              "git_commit": git_commit(), "versions": library_versions()}
    if state is not None:
        check_resume_settings(state["run"], config, resume_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (epoch %d)", resume_dir, pos.step, pos.epoch)
    metrics_path = out_dir / "metrics.jsonl"
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run_config.json").write_text(json.dumps(config, indent=2) + "\n")
        # Records past the checkpoint (a crash, an older --resume) are replayed: log them once.
        if dropped := truncate_to(metrics_path, pos.step, pos.epoch):
            log.info("metrics.jsonl: %d records after step %d dropped (they are replayed)",
                     dropped, pos.step)
    # The id as given plus its absolute path: the adapter finds its base from any directory.
    adapter_meta = {**base_model_metadata(args.model), "task": task.name, "prompt": args.prompt,
                    "trained_on_quantization": args.quantize,
                    "loraplus_lr_ratio": str(args.loraplus_lr_ratio)}
    log.info("%s | %d train / %d val samples | global batch %d (%d per process × %d accumulated "
             "× %d processes) | %d optimizer steps | %s", injection.describe(), len(train_samples),
             len(val_samples), config["global_batch"], args.batch_size, args.grad_accum, world,
             total_steps, f"autocast {amp_dtype}" if amp_dtype else "fp32 (no autocast)")
    return Run(args, device, task, injection, optimizer, scheduler, scaler, adapter_loss,
               train_set, val_loader if val_samples else None, out_dir, config, adapter_meta,
               amp_dtype, pos, MetricsLog(metrics_path, enabled=distributed.is_main(), mirror=(
                   TensorBoardLog(out_dir, pos.step)
                   if args.log_to == "tensorboard" and distributed.is_main() else None)),
               tqdm(total=total_steps, initial=pos.step, desc="train", dynamic_ncols=True,
                    disable=not distributed.is_main()),
               val_samples=val_samples, start_step=pos.step, main_rank=distributed.is_main(),
               world=world)


def trainable_tokens(args: argparse.Namespace, task: Task, samples: list,
                     tokenizer: Any) -> tuple[int, ...]:
    """--trainable-tokens as token ids (none without the flag), logged."""
    if not args.trainable_tokens:
        return ()
    try:
        ids = resolve_trainable_tokens(args.trainable_tokens, tokenizer,
                                       lambda: task_target_labels(task, samples))
    except ValueError as e:
        raise RunError(str(e)) from None
    log.info("trainable token rows: %d (%s)", len(ids), " ".join(
        tokenizer.convert_ids_to_tokens(list(ids[:40]))) + (" ..." if len(ids) > 40 else ""))
    return ids


def resolve_lora_targets(flag: str, model: torch.nn.Module) -> tuple[str, ...]:
    """--targets with ``auto`` resolved for this model, logged with the Linears they select; a
    target that selects nothing is a RunError naming the presets that would."""
    given = tuple(t.strip() for t in flag.split(",") if t.strip())
    try:
        targets = resolve_targets(model, given)
    except ValueError as e:
        raise RunError(str(e)) from None
    if not targets:
        raise RunError("--targets is empty: name presets, module suffixes or 're:' regexes")
    auto = f"auto ({model_family(model)}) → " if "auto" in given else ""
    log.info("LoRA targets: %s%s: %d Linear layers", auto, ", ".join(targets),
             len(select_targets(model, targets)))
    return targets


def check_resume_settings(saved: dict[str, Any], now: dict[str, Any], resume_dir: Path) -> None:
    """Refuse to continue a run whose result-changing settings differ from the checkpoint's."""
    defaults = vars(parse_args([]))  # a setting the saved run predates had its default value
    keys = [k for k in (*defaults, *DERIVED_SETTINGS) if k not in MAY_CHANGE_ON_RESUME]
    diff = {k: (saved.get(k, defaults.get(k)), now[k]) for k in keys
            if saved.get(k, defaults.get(k)) != now[k]}
    if diff:
        listing = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
        raise RunError(f"cannot resume {resume_dir}: settings differ ({listing}); pass the "
                       "settings of the run it continues, or start a new run")


def train_epochs(run: Run) -> Path | None:
    """Train until the last epoch ends; returns the checkpoint folder if --stop-after-steps
    stopped it first. Ctrl-C or SIGTERM checkpoints the last finished step and exits 130/143."""
    args = run.args
    run.injection.model.train()
    with graceful_interrupts() as interrupts:  # SIGTERM too; a second signal leaves at once
        try:
            for epoch in range(run.pos.epoch, args.epochs):
                batches = rank_batches(len(run.train_set), args.batch_size, args.seed, epoch)
                start = run.pos.micro if epoch == run.pos.epoch else 0
                loader = iter(DataLoader(run.train_set,
                                         batch_sampler=[b for b in batches[start:] if b],
                                         collate_fn=run.task.collate,
                                         num_workers=args.num_workers, generator=quiet_rng()))
                for window in windows(len(batches), args.grad_accum):
                    if window.start < start:
                        continue
                    run.window_rng = rng_state()
                    micro = [next(loader) if batches[i] else None for i in window]  # None: no share
                    optimizer_step(run, epoch, micro, window.stop)
                    run.window_rng = rng_state()  # between windows: where the next one starts
                    if args.save_every and run.pos.step % args.save_every == 0:
                        run.checkpoint(rng_state())
                    if args.stop_after_steps and run.pos.step >= args.stop_after_steps:
                        folder = run.checkpoint(rng_state())
                        run.bar.close()  # the message below starts its own line
                        log.info("stopped after %d steps; resume with --resume %s",
                                 run.pos.step, folder)
                        return folder
                end_of_epoch(run, epoch)
        except KeyboardInterrupt:
            # A resumed run replays an interrupted window from its start. No barrier: under
            # torchrun every rank got the signal and the others may be gone already.
            run.checkpoint(run.window_rng, sync=False)
            run.bar.close()
            if run.main_rank:
                log.warning("interrupted: checkpoint at step %d saved; continue with --resume "
                            "auto --output-dir %s", run.pos.step, run.out_dir)
            raise SystemExit(interrupts.exit_code) from None
    return None


def optimizer_step(run: Run, epoch: int, micro: list[dict | None], micro_end: int) -> None:
    """One accumulation window: exact token-mean gradient, clip, AdamW step, schedule, log."""
    world = run.world
    if world > 1:
        distributed.seed_step(run.args.seed, run.pos.step)
    # The window's target tokens on all ranks: the denominator of the exact mean.
    n_tokens = sum(run.task.count_targets(b) for b in micro if b is not None)
    n_tokens = distributed.sum_across_ranks([n_tokens], run.device)[0]
    lr = run.scheduler.get_last_lr()[0]
    record: dict[str, Any]
    if n_tokens == 0:  # every target masked or truncated away: nothing to learn, no 0/0
        log.warning("step %d (epoch %d): no target tokens in this window (all masked or "
                    "truncated): skipped", run.pos.step + 1, epoch)
        record = {"loss": None, "lr": lr, "grad_norm": None, "skipped": "no target tokens"}
    else:
        loss_total = 0.0
        for i, batch in enumerate(micro):  # each weighs its share of the window's tokens
            # DDP all-reduces once per window, in the last micro-batch's backward, and averages
            # over ranks: × world turns that average into the sum over ranks.
            with distributed.no_sync(run.adapter_loss, skip=i < len(micro) - 1):
                loss_sum, _ = run.adapter_loss(batch)
                run.scaler.scale(loss_sum * world / n_tokens).backward()
            loss_total += loss_sum.item()
        loss = distributed.sum_across_ranks([loss_total], run.device)[0] / n_tokens
        run.scaler.unscale_(run.optimizer)
        grads = [p.grad for p in run.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        if not run.scaler.is_enabled() and not (math.isfinite(loss) and grad_norm.isfinite()):
            stop_on_non_finite(run, epoch, loss, float(grad_norm))
        if run.args.max_grad_norm > 0:  # as clip_grad_norm_, reusing the norm just computed
            torch.nn.utils.clip_grads_with_norm_(run.params, run.args.max_grad_norm, grad_norm)
        run.scaler.step(run.optimizer)  # with fp16, GradScaler skips steps with inf/NaN grads
        run.scaler.update()
        record = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm)}
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped first window: the schedule still moves on
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler")
        run.scheduler.step()
    run.pos = dataclasses.replace(run.pos, step=run.pos.step + 1, epoch=epoch, micro=micro_end)
    run.metrics.write({"step": run.pos.step, "epoch": epoch, **record,
                       "time": round(time.time() - run.t0, 3)})
    run.bar.update()
    if record["loss"] is not None:
        run.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", epoch=epoch)


def stop_on_non_finite(run: Run, epoch: int, loss: float, grad_norm: float) -> None:
    """Stop before a NaN/inf update reaches the adapters; the last checkpoint stays the last."""
    last = latest_checkpoint(run.out_dir)
    keep = (f"the last good checkpoint is {last} (--resume auto continues from it)" if last
            else "no checkpoint was written yet")
    raise RunError(f"step {run.pos.step + 1} (epoch {epoch}): the loss ({loss}) or the gradient "
                   f"norm ({grad_norm}) is not finite, so training stopped before updating the "
                   f"adapters; {keep}. Try a lower --lr or --max-grad-norm, or check the data")


def end_of_epoch(run: Run, epoch: int) -> None:
    """Validation loss and the --select-best metric (best adapter kept), the epoch's record,
    then the epoch checkpoint.

    The epoch counter moves on only after both, so a run interrupted during validation
    validates that epoch again when resumed."""
    record: dict[str, Any] = {"step": run.pos.step, "epoch": epoch}
    if run.val_loader is not None:
        metric = run.args.select_best or selection.DEFAULT
        scores = {"val_loss": validation_loss(run.task, run.injection.model, run.val_loader,
                                              run.device, run.amp_dtype)}
        if metric != "val_loss":
            scores[metric] = selection.validation_score(
                metric, run.task, run.injection.model, run.val_samples, run.args.eval_batch_size,
                run.args.num_beams, autocast(run.device, run.amp_dtype))
        record.update({selection.record_key(m): v if math.isfinite(v) else None  # JSON has no NaN
                       for m, v in scores.items()})
        # The same value on every rank (all-reduced or all-gathered); a tie keeps the earlier.
        if (key := selection.selection_key(metric, scores[metric])) < run.pos.best_val:
            if run.main_rank:
                why = selection.best_metadata(metric, scores[metric], epoch)
                save_adapter(run.injection, run.out_dir / "best.safetensors",
                             base_model=run.args.model, extra={**run.adapter_meta, **why})
            run.pos = dataclasses.replace(run.pos, best_val=key)
        if run.main_rank:  # above the bar (main())
            log.info("epoch %d: %s", epoch, ", ".join(f"{selection.METRICS[m].title} {v:.4f}"
                                                      for m, v in scores.items()))
    run.metrics.write(record)
    run.pos = dataclasses.replace(run.pos, epoch=epoch + 1, micro=0)
    run.checkpoint(rng_state())


def finish(run: Run) -> Path:
    """Save the final adapter and curves; report exact match on --eval-file (rank 0)."""
    run.bar.close()
    final = run.out_dir / ADAPTER
    to_plain(run.injection, "default")  # PiSSA/OLoRA: the original base back, for the report
    if run.main_rank:
        save_adapter(run.injection, final, base_model=run.args.model, extra=run.adapter_meta)
        try:
            plot_curves(run.out_dir / "metrics.jsonl")
        except ValueError as e:  # e.g. every step skipped: nothing to draw
            log.warning("no curves.png: %s", e)
        ran = run.pos.step - run.start_step
        resumed = f" (resumed at step {run.start_step})" if run.start_step else ""
        log.info("%d of %d optimizer steps ran in this process%s, in %.1f s", ran,
                 run.config["total_steps"], resumed, time.time() - run.t0)
    distributed.barrier()  # the adapter is on disk before any rank returns
    if not run.main_rank:
        return final  # the exact-match report below is rank 0's alone
    if run.task.truncations is not None and run.task.truncations.count:
        log.info("%d training/validation samples were longer than --max-length %d tokens "
                    "and were truncated (the first ones are named above)",
                    run.task.truncations.count, run.task.max_length)
    if (source := eval_source(run)) is not None:
        report_exact_match(run.task, run.injection, run.args, run.amp_dtype, run.device,
                           run.out_dir, *source)
    list_outputs(run.out_dir)
    print(f"adapter: {final}")  # stdout: the one line a script needs; the log is on stderr
    return final


def eval_source(run: Run) -> tuple[list, dict[str, Any]] | None:
    """(samples, what they are) for the exact-match report: --eval-file; else, for a user's
    --train-file, its validation samples; None (said so) when there is nothing to score."""
    args = run.args
    if args.eval_file is not None and args.eval_file.lower() == "none":
        return None
    if args.eval_file is not None:
        samples = load_samples(run.task, args.eval_file, args)
        return samples, {"file": args.eval_file, "split": "test", "samples": len(samples)}
    if not run.val_samples:
        log.info("no exact-match report: no --eval-file and no validation split (--val-file "
                 "or --val-fraction > 0) to score %s on", args.train_file)
        return None
    held_out = args.val_file or args.train_file
    return run.val_samples, {"file": held_out, "split": "validation",
                             "samples": len(run.val_samples)}


def report_exact_match(task: Task, injection: LoRAInjection, args, amp_dtype, device,
                       out_dir: Path, samples: list, evaluated_on: dict[str, Any]) -> None:
    """Exact match on ``samples`` with the adapter (and the base), logged and saved as JSON
    with ``evaluated_on`` (which file and split)."""
    injection.model.eval()
    results: dict[str, Any] = {
        "adapter": exact_match_report(task, samples, args, amp_dtype, device)}
    if args.eval_base:
        injection.set_active([])
        results["base"] = exact_match_report(task, samples, args, amp_dtype, device)
        injection.set_active(["default"])
    where = f"{Path(evaluated_on['file']).name} ({evaluated_on['split']})"
    for who, scores in results.items():
        log.info("exact match (%s) on %s: %s", who, where,
                 ", ".join(f"{k} {100 * v:.1f}%" for k, v in scores.items()))
    results["evaluated_on"] = evaluated_on
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")


# What each output of a run is, in the order the end-of-run listing shows them.
OUTPUTS = {ADAPTER: "the final adapter: use this (infer.py / eval.py --adapter)",
           "best.safetensors": "the adapter of the epoch with the best --select-best metric "
                               "(default: lowest validation loss; its metadata says which)",
           "eval.json": "exact match of the adapter (and the base) and what it was measured on",
           "curves.png": "loss, validation loss and learning rate per step",
           "metrics.jsonl": "one record per optimizer step and per epoch",
           "tensorboard": "the same numbers for TensorBoard (tensorboard --logdir <this>)",
           "run_config.json": "every setting of the run, versions and git commit",
           "checkpoints": "training state to continue from (--resume auto)"}


def list_outputs(out_dir: Path) -> None:
    """Log every file the run folder holds, and which one to use."""
    lines = [f"  {out_dir / name}  {what}" for name, what in OUTPUTS.items()
             if (out_dir / name).exists()]
    log.info("outputs:\n%s", "\n".join(lines))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main(sys.argv[1:])
