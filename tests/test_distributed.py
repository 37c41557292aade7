"""Data parallelism on CPU (gloo, 2 processes): the adapters of one process, rank 0 alone writes,
Ctrl-C and resume, a failing rank ends the run.

One test launches the real torchrun CLI (15-25 s on 2 shared cores: each of its 3 processes
imports torch and transformers). The others fork this test process, torch already imported, into
2 children with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) that call
train.main: 1-4 s per test. In every forked run, an audit hook makes rank 1 fail on any write
under the output directory.
"""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from blip2_tiny import tiny_blip2
from conftest import tiny_blip, write_tiny_dataset, write_tiny_model_dir, write_tiny_vqa_dataset
from safetensors.torch import load_file
from torch.utils.data.distributed import DistributedSampler

import train
from lora import LoRAConfig, inject_lora
from training import distributed

ROOT = Path(__file__).resolve().parents[1]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
WRITE_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return write_tiny_model_dir(root / "model"), write_tiny_dataset(root / "data", n=12)


def _args(setup, out, *extra):
    # 12 samples, 3 held out: 9 train. 2 processes × batch 2 = global micro-batches of 4, 4, 1
    # (rank 1 has no share of the last), windows of 2 micro-batches: 2 optimizer steps per epoch.
    model_dir, data = setup
    return ["--model", str(model_dir), "--train-file", str(data), "--eval-file", "none",
            "--epochs", "2", "--grad-accum", "2", "--lr", "1e-2", "--val-fraction", "0.25",
            "--output-dir", str(out), "--threads", "1", *extra]


def _refuse_writes_under(folder: Path):
    """An audit hook that raises on any file opened for writing, created, renamed or removed
    under ``folder`` (safetensors writes from Rust, but into a mkstemp file it then renames)."""
    prefix = str(folder.resolve())

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if mode else bool(flags & WRITE_FLAGS)
        elif event in WRITE_EVENTS:
            path, writes = args[0], True
        else:
            return
        if writes and isinstance(path, str | bytes | os.PathLike) and os.path.abspath(
                os.fsdecode(path)).startswith(prefix):
            raise PermissionError(f"rank {os.environ.get('RANK')}: {event} {path}")

    return hook


def _child(rank: int, world: int, port: int, argv: list[str], before) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if rank > 0:
        sys.addaudithook(_refuse_writes_under(Path(argv[argv.index("--output-dir") + 1])))
    if before:
        before(rank)
    # A forked child of the (threaded) pytest process leaves through os._exit: interpreter
    # shutdown after fork can hang on state inherited from the parent's threads (seen once:
    # a rank that had raised never exited, so its peer waited in all_reduce).
    code = 1
    try:
        train.main(argv)
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def launch(argv: list[str], before=None, world: int = 2, timeout: float = 60) -> list[int | None]:
    """Exit codes of ``train.main(argv)`` run by ``world`` forked ranks (None: still running at
    the timeout, then killed). ``before(rank)`` runs first in each child."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_child, args=(r, world, port, argv, before))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = [None if p.is_alive() else p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


def _assert_same_metrics(one: Path, two: Path, rel: float) -> None:
    """The two runs logged the same steps with the same losses and gradient norms (before
    clipping: a wrong gradient scale shows here, while AdamW's updates hardly notice it)."""
    records = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
               for d in (one, two)]
    for a, b in zip(*records, strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for k in ("loss", "val_loss", "grad_norm"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=rel), (k, a["step"])


def _interrupt(at_call: dict[int, int], exc: type[BaseException]):
    """A ``before`` that raises ``exc`` in rank r's ``at_call[r]``-th loss computation."""
    def before(rank: int) -> None:
        if rank not in at_call:
            return
        real, calls = train.forward_loss, [0]

        def failing(*a, **kw):
            calls[0] += 1
            if calls[0] == at_call[rank]:
                raise exc("injected")
            return real(*a, **kw)

        train.forward_loss = failing  # a forked child: nothing to restore

    return before


@pytest.mark.parametrize("n", [16, 9])
def test_rank_shares_are_distributed_samplers_layout(monkeypatch, n):
    seed, epoch, batch, world = 3, 2, 2, 2
    shares = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank_and_world", lambda rank=rank: (rank, world))
        shares.append(train.rank_batches(n, batch, seed, epoch))
    # Together the ranks' k-th micro-batches are one process's k-th with batch × world.
    one = train.epoch_batches(n, batch * world, seed, epoch)
    assert [sorted(a + b) for a, b in zip(*shares, strict=True)] == [sorted(x) for x in one]
    if n % (batch * world) == 0:  # even: exactly what DistributedSampler hands each rank
        for rank, share in enumerate(shares):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank,
                                         seed=seed * 100_003)
            sampler.set_epoch(epoch)
            assert [i for b in share for i in b] == list(sampler)
    else:  # the last micro-batch (1 sample) is shared out as it is: no padding, nothing cut
        assert [len(s[-1]) for s in shares] == [1, 0]


def test_ddp_module_holds_only_the_adapters():
    model = tiny_blip()
    injection = inject_lora(model, LoRAConfig(r=2, alpha=4))
    module = distributed.AdapterLoss(injection, lambda batch: (torch.tensor(1.0), 1))
    # What DDP would bucket and broadcast: the adapters, none of the frozen base's weights.
    assert [id(p) for p in module.parameters()] == [id(p) for p in injection.adapter_parameters()]
    assert not {id(p) for p in model.parameters()} & {id(p) for p in module.parameters()}
    # An empty share: a zero loss whose backward reaches every adapter (all join the all-reduce).
    loss, n = module(None)
    loss.backward()
    assert n == 0 and all(p.grad is not None and not p.grad.any() for p in module.parameters())
    assert distributed.wrap(module, torch.device("cpu")) is module  # one process: no DDP


def test_write_guard_catches_writes(tmp_path):
    def write() -> None:
        sys.addaudithook(_refuse_writes_under(tmp_path))
        (tmp_path / "x").write_text("")

    p = multiprocessing.get_context("fork").Process(target=write)
    p.start()
    p.join(30)
    assert p.exitcode == 1 and not (tmp_path / "x").exists()


def test_torchrun_two_processes_match_one(setup, tmp_path):
    """torchrun, 2 processes × batch 2 against 1 process × batch 4: the same global batches.

    Dropout is off (each rank draws its own masks). The adapters still differ a little: DDP sums
    two partial gradients where one process sums over all samples at once, so float rounding
    differs (~1e-7 relative on gradients, losses and norms). AdamW then divides each gradient
    element by its own RMS, which lifts that rounding to up to ~1e-2 of the learning rate for the
    few elements whose gradient is itself near rounding level. Measured here (4 steps, lr 1e-2):
    6 of 39,936 elements differ by more than 1e-6, at most by 7.7e-5; one process with batch 2 ×
    accumulation 4 instead of batch 4 × 2 (the same sums, ordered differently) differs from it by
    as much (6.9e-5, 7 elements).
    """
    logs = tmp_path / "logs"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "--log-dir", str(logs), "--redirects", "3",
                          "train.py", *_args(setup, tmp_path / "two", "--batch-size", "2",
                                             "--dropout", "0")],
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    one = load_file(train.main(_args(setup, tmp_path / "one", "--batch-size", "4",
                                     "--dropout", "0")))
    two = load_file(tmp_path / "two" / "adapter.safetensors")
    assert one.keys() == two.keys()
    diff = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    assert diff.max() < 5e-4 and (diff > 1e-6).float().mean() < 1e-3
    assert any(t.abs().max() > 1e-2 for k, t in one.items() if "lora_B" in k)  # trained

    # The same steps, losses and run settings (the global batch counts every process).
    config = {n: json.loads((tmp_path / n / "run_config.json").read_text()) for n in ("one", "two")}
    assert [config["two"][k] for k in ("world_size", "batch_size", "global_batch")] == [2, 2, 8]
    assert [config["one"][k] for k in ("world_size", "batch_size", "global_batch")] == [1, 4, 8]
    assert config["one"]["total_steps"] == config["two"]["total_steps"] == 4
    _assert_same_metrics(tmp_path / "one", tmp_path / "two", rel=1e-5)
    assert sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*")) == \
        sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*"))

    # Rank 0 printed the global batch, the progress bar and the adapter path; rank 1 nothing.
    out = {r: "".join(f.read_text() for f in sorted(logs.rglob(f"attempt_0/{r}/*.log")))
           for r in (0, 1)}
    assert "global batch 8 (2 per process × 2 accumulated × 2 processes)" in out[0]
    assert "train: 100%" in out[0] and "adapter: " in out[0]
    assert "it/s" not in out[1] and "global batch" not in out[1] and "adapter" not in out[1]


@pytest.mark.parametrize(("family", "task", "extra"), [
    ("blip", "vqa", []), ("opt", "caption", []), ("t5", "vqa", ["--gradient-checkpointing"])],
    ids=["blip-vqa", "blip2-opt-caption", "blip2-t5-vqa-checkpointing"])
def test_every_family_and_task_matches_one_process(tmp_path, family, task, extra):
    # BLIP VQA (question encoder + answer decoder), BLIP-2 OPT and Flan-T5 with adapters on the
    # vision tower, the Q-Former and the language model; 2 processes × 2 against 1 × 4.
    if family == "blip":
        model_dir, targets = write_tiny_model_dir(tmp_path / "m", vqa=True), []
    else:
        model, processor = tiny_blip2(family)
        model_dir, targets = tmp_path / "m", ["--targets", "vision,qformer,language"]
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
    data = (write_tiny_vqa_dataset if task == "vqa" else write_tiny_dataset)(tmp_path / "d", n=9)
    common = ["--model", str(model_dir), "--task", task, "--train-file", str(data),
              "--eval-file", "none", "--epochs", "2", "--grad-accum", "2", "--lr", "1e-2",
              "--val-fraction", "0", "--dropout", "0", "--threads", "1", *targets, *extra]
    assert launch([*common, "--batch-size", "2", "--output-dir", str(tmp_path / "two")]) == [0, 0]
    one = load_file(train.main([*common, "--batch-size", "4", "--output-dir",
                                str(tmp_path / "one")]))
    two = load_file(tmp_path / "two" / "adapter.safetensors")
    _assert_same_metrics(tmp_path / "one", tmp_path / "two", rel=1e-4)
    # Tiny random BLIP-2s at lr 1e-2 clip every step (gradient norms 10-40), so rounding grows
    # faster than in the caption test: T5 VQA measured 5.2e-4 here, and 2.2e-4 for one process
    # with batch 2 × accumulation 4 against batch 4 × 2.
    assert max((one[k] - two[k]).abs().max() for k in one) < 2e-3


def test_ctrl_c_then_resume_under_two_processes(setup, tmp_path):
    # Dropout on: each rank reseeds its masks per optimizer step, so a resumed run draws the
    # same ones and ends bit-identical to the uninterrupted run.
    def args(out, *extra):
        return _args(setup, out, "--batch-size", "2", "--dropout", "0.1", *extra)

    assert launch(args(tmp_path / "full")) == [0, 0]
    # Loss calls (rank 1 makes none for its empty share of the last micro-batch): rank 0 =
    # 1, 2 (step 1), 3 (step 2), 4 (validation), 5, 6 (step 3); rank 1 = 1, 2, 3, then 4, 5.
    # Both are interrupted in the middle of step 3's window, as a Ctrl-C reaching each.
    assert launch(args(tmp_path / "b"), before=_interrupt({0: 6, 1: 5}, KeyboardInterrupt)) == [
        130, 130]
    state = torch.load(tmp_path / "b/checkpoints/step-000002/train_state.pt", weights_only=True)
    assert state["position"]["step"] == 2 and state["run"]["world_size"] == 2
    assert launch(args(tmp_path / "b", "--resume", "auto")) == [0, 0]
    full = load_file(tmp_path / "full/adapter.safetensors")
    resumed = load_file(tmp_path / "b/adapter.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    with pytest.raises(SystemExit, match="world_size"):  # one process cannot continue it
        train.main(args(tmp_path / "b", "--resume", "auto"))


def test_an_exception_in_one_rank_ends_the_run(setup, tmp_path):
    t0 = time.monotonic()
    codes = launch(_args(setup, tmp_path / "r", "--batch-size", "2"),
                   before=_interrupt({1: 3}, RuntimeError), timeout=60)
    # Rank 0 waits in the gradient all-reduce; gloo sees rank 1's connection close and raises.
    assert None not in codes and all(c != 0 for c in codes), codes
    assert time.monotonic() - t0 < 30
