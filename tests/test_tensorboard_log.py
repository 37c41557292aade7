"""--log-to tensorboard: the event file read back holds metrics.jsonl's numbers, once per step
also after a resume; without the package, one line at start."""

import json
import shutil
import sys

import numpy as np
import pytest
from tiny_runs import train_args, write_tiny_run

import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("tensorboard"))


def read_events(run) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag, as TensorBoard shows them (events a resume purged left out)."""
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_scalars(run) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers under the tags the run should write, as float32 (TensorBoard's)."""
    tags = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
            "val_loss": "val/loss", "val_exact_match": "val/exact_match"}
    out: dict[str, list[tuple[int, float]]] = {tag: [] for tag in tags.values()}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, tag in tags.items():
            if key in record:
                out[tag].append((record["step"], float(np.float32(record[key]))))
    return out


def test_event_file_holds_the_metrics_of_each_step_and_epoch(setup, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    flags = ("--log-to", "tensorboard", "--select-best", "exact_match")
    train.main(train_args(setup, out, *flags))
    events = read_events(out)
    expected = expected_scalars(out)
    assert events == expected
    assert [s for s, _ in events["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in events["val/exact_match"]] == [2, 4, 6]  # each epoch's last step

    # Killed after logging step 3 but before its checkpoint (that checkpoint removed), resumed
    # from step 2: step 3 is replayed, and appears once, with the same values.
    resumed = tmp_path / "resumed"
    train.main(train_args(setup, resumed, *flags, "--stop-after-steps", "3"))
    shutil.rmtree(resumed / "checkpoints/step-000003")
    train.main(train_args(setup, resumed, *flags, "--resume", "auto"))
    assert len(list((resumed / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert read_events(resumed) == events


def test_missing_package_is_one_line_before_anything_runs(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(setup, out, "--log-to", "tensorboard"))
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("train.py: error: --log-to tensorboard needs the "
                                       "tensorboard package: pip install tensorboard\n")
    assert not out.exists()  # no model loaded, no folder made
