"""sweep.py: a grid of train.py runs, resumable, compared in one table and a log-x plot."""

import json
import math

import pytest
from PIL import Image
from tiny_runs import train_args, write_tiny_run

import sweep
from cli import train_flags
from sweeps.cells import MARKER, training_seconds
from sweeps.grid import GridError, make_axes, make_cells, safe_name
from sweeps.plot import COLOURS, LogXAxes, plot_sweep
from sweeps.report import plot_metric, series


def shared_flags(setup, eval_file) -> list[str]:
    """tiny_runs' train.py flags without --output-dir (sweep.py owns it), scored on a file."""
    flags = train_args(setup, "unused")
    i = flags.index("--output-dir")
    return [*flags[:i], *flags[i + 2:], "--eval-file", str(eval_file)]


def qkv_params(model_dir, r: int) -> int:
    """LoRA parameters on every vision qkv Linear (hidden -> 3 hidden): r × (in + out) each."""
    vision = json.loads((model_dir / "config.json").read_text())["vision_config"]
    return vision["num_hidden_layers"] * r * (vision["hidden_size"] + 3 * vision["hidden_size"])


def test_sweep_two_tiny_cells_table_plot_and_resume(tmp_path, capsys):
    setup = write_tiny_run(tmp_path)
    out = tmp_path / "sweep"
    argv = ["--sweep-dir", str(out), "--r", "1", "2", "--targets", "self_attn.qkv", "--",
            *shared_flags(setup, setup[1])]
    assert sweep.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1/2] r=1_targets=self_attn.qkv: exact match ")
    assert lines[1].startswith("[2/2] r=2_targets=self_attn.qkv: exact match ")

    records = json.loads((out / "sweep.json").read_text())["cells"]
    assert [r["settings"] for r in records] == [{"r": "1", "targets": "self_attn.qkv"},
                                                {"r": "2", "targets": "self_attn.qkv"}]
    for record, r in zip(records, (1, 2), strict=True):
        folder = out / record["cell"]
        assert json.loads((folder / MARKER).read_text()) == record
        assert record["trainable_params"] == qkv_params(setup[0], r)
        scores = json.loads((folder / "eval.json").read_text())
        assert record["exact_match"] == scores["adapter"]["all"]
        val = [json.loads(ln).get("val_loss") for ln in (folder / "metrics.jsonl").open()]
        assert record["best_val_loss"] == min(v for v in val if v is not None)
        assert 0 < record["train_s"] <= record["wall_s"]
        assert 50 < record["peak_rss_mib"] < 64 * 1024  # a real process's RSS, in MiB
        assert record["resumed"] is False

    md = (out / "sweep.md").read_text().splitlines()
    assert md[2] == ("| r | targets | exact match | best val loss | trainable params | "
                     "train time (s) | peak RSS (MiB) |")
    assert md[4].startswith(f"| 1 | self_attn.qkv | {100 * records[0]['exact_match']:.1f}% | "
                            f"{records[0]['best_val_loss']:.4f} | "
                            f"{records[0]['trainable_params']:,} |")
    assert len(md) == 6
    page = (out / "index.html").read_text()
    assert "<img src='sweep.png'" in page and page.count("<tr>") == 3
    assert Image.open(out / "sweep.png").size == (760, 460)

    # Again: both cells are finished, so nothing runs and nothing changes.
    adapter = out / records[0]["cell"] / "adapter.safetensors"
    logs = {p: p.read_text() for p in (out / "logs").iterdir()}
    stamp = adapter.stat().st_mtime_ns
    assert sweep.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(": ")[1] for ln in lines[:2]] == ["done earlier"] * 2
    assert adapter.stat().st_mtime_ns == stamp
    assert {p: p.read_text() for p in (out / "logs").iterdir()} == logs

    # A cell without its marker (interrupted after its last checkpoint) resumes from it.
    (out / records[1]["cell"] / MARKER).unlink()
    assert sweep.main(argv) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("(resumed)")
    again = json.loads((out / records[1]["cell"] / MARKER).read_text())
    assert again["resumed"] is True
    assert again["trainable_params"] == records[1]["trainable_params"]
    assert "resumed from" in (out / "logs" / f"{records[1]['cell']}.log").read_text()

    # The same folder with other shared flags: refused, naming the folder.
    with pytest.raises(SystemExit) as stop:
        sweep.main([*argv, "--seed", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other train.py flags" in err and str(out) in err


def test_failed_cell_is_reported_with_train_error(tmp_path, capsys):
    setup = write_tiny_run(tmp_path)
    out = tmp_path / "sweep"
    code = sweep.main(["--sweep-dir", str(out), "--targets", "no.such.layer", "--",
                       *shared_flags(setup, setup[1])])
    assert code == sweep.EXIT_CELLS_FAILED
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("[1/1] targets=no.such.layer: FAILED: train.py exited 2: ")
    assert "no.such.layer" in line.split("exited 2: ")[1]
    assert not (out / "targets=no.such.layer" / MARKER).exists()
    assert not (out / "sweep.md").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--rr", "1"], "--rr is not a train.py flag (did you mean --r?)"),
    (["--r"], "--r has no values"),
    (["--r", "4", "4"], "--r lists a value twice"),
    (["--r", "4", "--r", "8"], "--r is given twice"),
    (["--rslora", "yes"], "--rslora takes no value in train.py"),
    (["--output-dir", "a", "b"], "--output-dir cannot be swept"),
    (["--r", "4", "--", "--output-dir", "x"], "--output-dir cannot be passed to train.py"),
    (["--r", "4", "--", "--r", "8"], "--r is both an axis and a shared train.py flag"),
    (["--eval-base", "off", "--", "--no-eval-base"], "--eval-base is both an axis"),
    (["--r", "4", "x"], "cell r=x: train.py would refuse its flags: argument --r: invalid int"),
    (["--r", "0"], "cell r=0: train.py would refuse its flags: --r must be positive"),
    ([], "no axes"),
])
def test_bad_grid_is_one_line_before_anything_runs(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        sweep.main(["--sweep-dir", str(tmp_path / "s"), *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sweep.py: error: ")
    assert message in err
    assert not (tmp_path / "s").exists()


def test_grid_order_values_with_commas_and_boolean_flags():
    parser = train_flags.build_parser()
    axes = make_axes(["--targets", "vision", "vision,text", "--rslora", "on", "off",
                      "--eval-base", "off"], parser)
    cells = make_cells(axes, ["--epochs", "2"], parser)
    assert [c.train_args for c in cells] == [
        ["--targets", "vision", "--rslora", "--no-eval-base", "--epochs", "2"],
        ["--targets", "vision", "--no-eval-base", "--epochs", "2"],
        ["--targets", "vision,text", "--rslora", "--no-eval-base", "--epochs", "2"],
        ["--targets", "vision,text", "--no-eval-base", "--epochs", "2"]]
    assert cells[2].name == "targets=vision,text_rslora=on_eval-base=off"
    with pytest.raises(GridError, match="before any axis"):
        make_axes(["4", "--r", "8"], parser)


def test_folder_names_are_plain_and_distinct():
    assert safe_name("vision,text") == "vision,text"
    odd = [safe_name(v) for v in ("data/a.jsonl", "data:a.jsonl", "re:.*fc1", "re:.*fc2")]
    assert len(set(odd)) == 4
    assert all("/" not in n and ":" not in n and "*" not in n for n in odd)
    assert odd[0].startswith("data-a.jsonl-")


def test_training_seconds_adds_up_resumed_stretches(tmp_path):
    records = [{"step": 1, "loss": 1.0, "time": 1.0}, {"step": 2, "loss": 1.0, "time": 2.5},
               {"step": 2, "epoch": 0, "val_loss": 0.9},  # epoch records have no time
               {"step": 3, "loss": 1.0, "time": 0.75},  # a resumed process starts its clock
               {"step": 4, "loss": None, "time": 2.0}]  # a skipped step still took time
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert training_seconds(path) == 2.5 + 2.0


def test_plot_x_axis_is_logarithmic(tmp_path):
    axes = LogXAxes([10, 100, 1000], [0.0, 1.0, 0.5])
    x10, x100, x1000 = (axes.px(x, 0.5)[0] for x in (10, 100, 1000))
    assert x100 - x10 == pytest.approx(x1000 - x100)
    frac = (math.log10(300) - math.log10(100)) / (math.log10(1000) - math.log10(100))
    assert axes.px(300, 0.5)[0] == pytest.approx(x100 + frac * (x1000 - x100))
    assert axes.px(10, 1.0)[1] < axes.px(10, 0.0)[1]  # up is more
    assert 1000 in axes.x_ticks() and 20 in axes.x_ticks()

    png = plot_sweep({"a": [(10, 0.0, "r=1"), (1000, 1.0, "r=4")],
                      "b": [(100, 0.5, "r=2")]}, "exact match (%)", tmp_path / "p.png")
    image = Image.open(png).convert("RGB")
    for x, y, colour in ((10, 0.0, COLOURS[0]), (1000, 1.0, COLOURS[0]), (100, 0.5, COLOURS[1])):
        px, py = axes.px(x, y)
        assert image.getpixel((round(px), round(py))) == colour


def test_series_group_by_the_other_axes_and_fall_back_to_val_loss():
    def record(r, targets, em, val):
        return {"settings": {"r": r, "targets": targets}, "exact_match": em,
                "best_val_loss": val, "trainable_params": 10 * int(r)}

    records = [record("1", "text", 0.5, 2.0), record("4", "text", 0.75, 1.0),
               record("1", "vision", 0.25, 3.0)]
    assert plot_metric(records) == ("exact_match", "exact match (%)")
    assert series(records, "exact_match") == {
        "targets=text": [(10, 50.0, "r=1"), (40, 75.0, "r=4")],
        "targets=vision": [(10, 25.0, "r=1")]}
    records[2]["exact_match"] = None  # a cell scored on no eval set: every cell plots val loss
    assert plot_metric(records) == ("best_val_loss", "best validation loss")
    assert series(records, "best_val_loss")["targets=vision"] == [(10, 3.0, "r=1")]
