"""--log-to tensorboard: metrics.jsonl's numbers, also as TensorBoard scalars in <run>/tensorboard.

Step records give ``train/loss``, ``train/lr`` and ``train/grad_norm``; epoch records give
``val/loss`` and the --select-best metric (``val/exact_match``, ...), all against the optimizer
step (an epoch's numbers at the step it ended), so validation lines up with training. The
``tensorboard`` package is needed only with this flag: ``require_tensorboard`` says so before the
run starts. A resumed run purges the events past its checkpoint, which it replays (as
metrics_log.truncate_to does for metrics.jsonl).

    tensorboard --logdir runs/caption-lora/tensorboard
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.errors import RunError
from training.metrics_log import is_step_record

DIRNAME = "tensorboard"
NOT_SCALARS = frozenset({"step", "epoch", "time", "skipped"})


def require_tensorboard() -> None:
    """Raise a one-line RunError now, not after training, if ``tensorboard`` is missing."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError:
        raise RunError("--log-to tensorboard needs the tensorboard package: pip install "
                       "tensorboard") from None


def scalar_tag(key: str, step_record: bool) -> str:
    """A metrics.jsonl key's tag: loss -> train/loss, val_loss -> val/loss, val_cider ->
    val/cider."""
    if key.startswith("val_"):
        return f"val/{key[len('val_'):]}"
    return f"train/{key}" if step_record else f"epoch/{key}"


class TensorBoardLog:
    """Writes each metrics record's numbers as scalars into ``run_dir``/tensorboard."""

    def __init__(self, run_dir: Path, start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # Events of steps after ``start_step`` (the checkpoint's) that an earlier process wrote
        # are replayed now: purge_step hides them (a SessionLog.START event TensorBoard reads).
        self.writer = SummaryWriter(str(Path(run_dir) / DIRNAME), purge_step=start_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Add the record's numeric fields (None: a skipped step, an undefined loss: left out)."""
        step_record = is_step_record(record)
        for key, value in record.items():
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            self.writer.add_scalar(scalar_tag(key, step_record), value, record["step"])
        self.writer.flush()  # as metrics.jsonl: what is logged survives a crash

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
