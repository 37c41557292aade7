"""Data parallelism under torchrun: the process group, rank helpers and DDP over adapters only.

``torchrun --nproc_per_node=N train.py ...`` starts N copies of train.py with RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT in their environment. Without them (or with
WORLD_SIZE=1) every helper here is a no-op and train.py runs as the single process it always was.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def launched_world_size() -> int:
    """Processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files, logs and progress bars (rank 0)."""
    return rank_and_world()[0] == 0


def _exit_on_sigterm(signum: int, frame) -> None:
    # torchrun stops the surviving ranks with SIGTERM when one fails: unwind through `finally`
    # (metrics closed, process group destroyed) instead of dying on the spot.
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group for the block (nccl on CUDA, gloo on CPU); yields the device.

    One device per local rank: ``cuda`` becomes ``cuda:LOCAL_RANK``. The group is destroyed on
    the way out, also on an exception, Ctrl-C (SIGINT, which torchrun forwards to every rank) or
    SIGTERM.
    """
    if launched_world_size() <= 1:
        yield device
        return
    if device.type == "cuda":
        if device.index is not None:
            raise SystemExit(f"--device {device}: under torchrun each process uses "
                             "cuda:LOCAL_RANK; pass --device cuda (choose GPUs with "
                             "CUDA_VISIBLE_DEVICES)")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield device
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over all ranks, in float64 (unchanged in one process)."""
    if rank_and_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def seed_step(seed: int, step: int) -> None:
    """Seed dropout for optimizer step ``step`` of this rank: a function of (seed, step, rank).

    Ranks draw different masks, and a resumed run draws the same ones without collecting every
    rank's RNG state into the checkpoint (a Ctrl-C handler cannot safely talk to other ranks).
    """
    rank = rank_and_world()[0]
    digest = hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little"))


class AdapterLoss(nn.Module):
    """The module DDP wraps: the adapters are its only parameters, the task loss its forward.

    The base model is reached through the injection's hooks and is not registered here, so DDP
    neither broadcasts its frozen weights at start nor gives them gradient buckets; only adapter
    gradients are all-reduced. ``forward(None)`` stands for an empty share of the epoch's last,
    short micro-batch: a zero loss that touches every adapter, so this rank still joins the
    gradient all-reduce (with zeros).
    """

    def __init__(self, adapters: nn.Module, loss: Callable[[dict], tuple[torch.Tensor, int]]):
        super().__init__()
        self.adapters = adapters  # a LoRAInjection: parameters() are the adapters only
        self.loss = loss

    def forward(self, batch: dict | None) -> tuple[torch.Tensor, int]:
        if batch is None:
            return sum(p.sum() for p in self.parameters()) * 0.0, 0
        return self.loss(batch)


def wrap(module: AdapterLoss, device: torch.device) -> nn.Module:
    """DistributedDataParallel over ``module`` when several processes run, else ``module``."""
    if rank_and_world()[1] == 1:
        return module
    # Adapters have no buffers, so DDP's per-forward buffer broadcast has nothing to send.
    return DistributedDataParallel(module,
                                   device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(module: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync()`` (accumulate locally, all-reduce later) when ``skip``, else nothing."""
    if skip and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()
