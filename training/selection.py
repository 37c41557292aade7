"""--select-best: the validation number that picks best.safetensors, computed every epoch.

The validation loss needs no generation, but it does not track what a run reports here (the
README notes a loss near 1.7 nats/token with exact captions). The other metrics generate on the
validation split, batched as train.py's final report (``--eval-batch-size``, ``--num-beams``),
and score as eval.py does:

* ``exact_match``: evaluation.is_correct per image (captions) or question (VQA), averaged;
* ``cider``: CIDEr-D of the split (captions only; its idf comes from the split's references);
* ``vqa_acc``: official VQA accuracy (VQA only, on questions with VQA v2's 10 human answers:
  with fewer, its leave-one-out average is not the published metric).

Higher is better except for ``val_loss``; on a tie the earliest epoch stays best. Under torchrun
each rank generates every world-th validation unit and every rank scores all predictions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from evaluation import is_correct, ptb_tokenize, vqa_accuracy
from evaluation.caption_metrics import cider_d
from models.tasks import Sample, Task
from training import distributed
from training.errors import RunError

VQA_ANSWERS = 10  # answers per question the official VQA accuracy is defined on


@dataclass(frozen=True)
class Metric:
    """How one --select-best choice is read: its direction, tasks and name in messages."""

    higher_is_better: bool
    tasks: tuple[str, ...]
    title: str


METRICS = {
    "val_loss": Metric(False, ("caption", "vqa"), "val loss"),
    "exact_match": Metric(True, ("caption", "vqa"), "exact match"),
    "cider": Metric(True, ("caption",), "CIDEr-D"),
    "vqa_acc": Metric(True, ("vqa",), "VQA accuracy"),
}
DEFAULT = "val_loss"


def record_key(metric: str) -> str:
    """The metric's key in metrics.jsonl's epoch records: val_loss, val_exact_match, ..."""
    return metric if metric == "val_loss" else f"val_{metric}"


def check_selection(metric: str | None, task: str, val_samples: Sequence[Sample]) -> None:
    """Refuse, before training, a --select-best that this task or validation split cannot
    score. ``None`` (the flag not given) selects by validation loss when there is a split."""
    if metric is None:
        return
    fits = METRICS[metric].tasks
    if task not in fits:
        others = ", ".join(m for m, spec in METRICS.items() if task in spec.tasks)
        raise RunError(f"--select-best {metric} ({METRICS[metric].title}) scores "
                       f"{' and '.join(fits)} runs, this one trains {task}: choose one of "
                       f"{others}")
    if not val_samples:
        raise RunError(f"--select-best {metric} needs a validation split: pass --val-file, or "
                       "--val-fraction above 0")
    if metric == "vqa_acc":
        short = sum(len(s.answers) != VQA_ANSWERS for s in val_samples)
        if short:
            raise RunError(f"--select-best vqa_acc needs {VQA_ANSWERS} answers per question "
                           f"(VQA v2's human answers); {short} of {len(val_samples)} validation "
                           "questions have another number: select by exact_match instead")


def selection_key(metric: str, value: float) -> float:
    """The value to minimise: the loss as it is, a score negated; NaN becomes +inf (never
    best)."""
    if math.isnan(value):
        return math.inf
    return -value if METRICS[metric].higher_is_better else value


def best_metadata(metric: str, value: float, epoch: int) -> dict[str, str]:
    """What best.safetensors records of why it is the best: metric, value and epoch."""
    return {"best_metric": metric, "best_value": repr(value), "best_epoch": str(epoch)}


def score(metric: str, task: str, units: Sequence[tuple[Sample, list[str]]],
          predictions: Sequence[str]) -> float:
    """``metric`` of one prediction per evaluation unit ((sample, references) pairs)."""
    if len(units) != len(predictions) or not units:
        raise ValueError(f"need one prediction per unit: {len(predictions)} for {len(units)}")
    refs = [r for _, r in units]
    if metric == "exact_match":
        hits = [is_correct(task, p, r) for p, r in zip(predictions, refs, strict=True)]
        return sum(hits) / len(hits)
    if metric == "cider":
        return cider_d([ptb_tokenize(p) for p in predictions],
                       [[ptb_tokenize(x) for x in r] for r in refs])
    if metric == "vqa_acc":
        accs = [vqa_accuracy(p, r) for p, r in zip(predictions, refs, strict=True)]
        return sum(accs) / len(accs)
    raise ValueError(f"{metric!r} is not a generation metric: expected one of "
                     f"{[m for m in METRICS if m != 'val_loss']}")


def _gather(shares: list[str]) -> list[str]:
    """Every rank's predictions for units[rank::world], back in unit order (one process: as
    given)."""
    world = distributed.rank_and_world()[1]
    if world == 1:
        return shares
    gathered: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, shares)
    out: list[str] = []
    for i in range(max(len(g) for g in gathered)):  # unit i*world + r is rank r's i-th
        out += [g[i] for g in gathered if i < len(g)]
    return out


def validation_score(metric: str, task: Task, model: torch.nn.Module,
                     val_samples: Sequence[Sample], batch_size: int, num_beams: int,
                     amp: contextlib.AbstractContextManager) -> float:
    """``metric`` on the validation split, generated in eval mode under ``amp`` (autocast).

    Greedy or beam decoding draws no random numbers and eval mode turns dropout off, so
    the training RNG (and a resumed run's bit-identical adapters) is untouched."""
    rank, world = distributed.rank_and_world()
    units = task.eval_units(val_samples)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), amp:
            shares = task.predict_units(units[rank::world], batch_size, desc=f"val {metric}",
                                        show_progress=rank == 0, num_beams=num_beams)
    finally:
        model.train(was_training)
    return score(metric, task.name, units, _gather(shares))
