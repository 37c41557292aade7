"""Run a grid of train.py settings, one run per cell, and compare them in one table and plot.

    python sweep.py --r 1 4 16 64 --targets vision text vision,text -- --threads 1
    python sweep.py --lr 1e-3 2e-3 --rslora on off -- --epochs 10 --threads 1

Each axis is a train.py flag followed by its values, one shell word per value, so a comma stays
inside its value: `--targets vision text vision,text` is three cells. A flag that takes no value
(--rslora, --gradient-checkpointing) is swept with `on` / `off`. Flags after `--` go to every
cell. The grid is every combination, the first axis varying slowest; each cell trains in its own
folder under --sweep-dir, named from its settings (r=4_targets=vision,text), its log in logs/.

Resumable: rerunning the same command skips finished cells (their sweep_cell.json exists) and
continues an interrupted cell from its newest checkpoint (train.py --resume auto). Ctrl-C stops
the running cell at a checkpoint and the sweep. A cell that fails is reported with train.py's
error and the others still run; the sweep then exits 1, and rerunning retries it.

Written to --sweep-dir: sweep.md and sweep.json (per cell: exact match on the eval set, best
validation loss, trainable parameters from the adapter file, training time from metrics.jsonl,
peak resident memory of the train.py process), sweep.png (exact match, or the best validation
loss when no eval set was scored, against trainable parameters on a log axis; one line per
combination of the other axes) and index.html with both.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from cli import ROOT, HelpFormatter
from cli.flags import add_debug_flag
from sweeps.cells import CellFailed, finished_record, run_cell
from sweeps.grid import Cell, GridError, check_cells, make_axes, make_cells
from sweeps.report import COLUMNS, write_reports
from training.errors import RunError, exit_on_user_errors

EXIT_CELLS_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    """sweep.py's own flags; the axes (train.py flags) and shared flags are parsed apart."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                allow_abbrev=False,  # --r must not abbreviate a sweep flag
                                usage="%(prog)s [--sweep-dir DIR] [--dry-run] --FLAG VALUE "
                                      "[VALUE ...] [--FLAG ...] [-- TRAIN_FLAGS ...]")
    p.add_argument("--sweep-dir", default=str(ROOT / "runs" / "sweep"), metavar="DIR",
                   help="folder of the cells and the reports; rerun with the same folder to "
                        "resume (default: runs/sweep)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells and their train.py flags, run nothing")
    add_debug_flag(p)  # sweep.py's own; after '--', --debug goes to every train.py
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(sweep.py's words, the train.py flags after '--' shared by every cell)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def plan(axis_words: list[str], shared: list[str]) -> list[Cell]:
    """The checked cells; a bad grid is a one-line RunError before anything runs."""
    # train.py's own parser checks every cell's flags. Imported here, as it loads torch.
    from cli.train_flags import build_parser, parse_args

    try:
        axes = make_axes(axis_words, build_parser())
        cells = make_cells(axes, shared, build_parser())
        check_cells(cells, parse_args)
    except GridError as e:
        raise RunError(str(e)) from None
    return cells


def progress(i: int, n: int, cell: Cell, text: str) -> None:
    """One line per cell on stdout."""
    print(f"[{i}/{n}] {cell.name}: {text}", flush=True)


def summary(record: dict) -> str:
    """A cell's results in one line."""
    return ", ".join(f"{k} {show(record)}" for k, show in COLUMNS.items())


def run_sweep(args: argparse.Namespace, cells: list[Cell], command: str) -> int:
    """Run the cells not yet finished, then write the reports; the exit status."""
    sweep_dir = Path(args.sweep_dir)
    records, failed = [], []
    for i, cell in enumerate(cells, 1):
        folder = sweep_dir / cell.name
        try:
            record = finished_record(folder, cell)
        except GridError as e:
            raise RunError(str(e)) from None
        if record is not None:
            progress(i, len(cells), cell, f"done earlier: {summary(record)}")
        else:
            try:
                record = run_cell(cell, folder, sweep_dir / "logs" / f"{cell.name}.log",
                                  ROOT / "train.py")
            except CellFailed as e:
                progress(i, len(cells), cell, f"FAILED: {e}")
                failed.append(cell)
                continue
            resumed = " (resumed)" if record["resumed"] else ""
            progress(i, len(cells), cell, f"{summary(record)}{resumed}")
        records.append(record)
    if records:
        for path in write_reports(records, sweep_dir, command):
            print(f"wrote {path}")
    if failed:
        print(f"{len(failed)} of {len(cells)} cells failed (their logs are in "
              f"{sweep_dir / 'logs'}); rerun the same command to retry them", file=sys.stderr)
        return EXIT_CELLS_FAILED
    return 0


def main(argv: list[str]) -> int:
    """Plan the grid, then run it (or list it with --dry-run)."""
    own, shared = split_argv(argv)
    args, axis_words = build_parser().parse_known_args(own)
    with exit_on_user_errors("sweep.py", debug=args.debug):
        cells = plan(axis_words, shared)
        if args.dry_run:
            for i, cell in enumerate(cells, 1):
                progress(i, len(cells), cell, shlex.join(["train.py", *cell.train_args]))
            return 0
        try:
            return run_sweep(args, cells, shlex.join(["python", "sweep.py", *argv]))
        except KeyboardInterrupt:
            print("interrupted: rerun the same command to continue (the interrupted cell "
                  "resumes from its checkpoint)", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
