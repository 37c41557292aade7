"""A sweep's comparison table as Markdown, JSON and an HTML page with the plot.

Rows are the finished cells in grid order; columns are the axes, then exact match (eval.json),
best validation loss, trainable parameters, training time and peak memory of each run.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from sweeps.plot import Point, plot_sweep

COLUMNS = {  # header -> how a record's value is shown
    "exact match": lambda r: _pct(r["exact_match"]),
    "best val loss": lambda r: _num(r["best_val_loss"], ".4f"),
    "trainable params": lambda r: f"{r['trainable_params']:,}",
    "train time (s)": lambda r: _num(r["train_s"], ".1f"),
    "peak RSS (MiB)": lambda r: _num(r["peak_rss_mib"], ".0f"),
}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def table_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the comparison table: one row per cell."""
    keys = list(records[0]["settings"])
    rows = [[r["settings"][k] for k in keys] + [show(r) for show in COLUMNS.values()]
            for r in records]
    return [*keys, *COLUMNS], rows


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The table in GitHub Markdown."""
    header, rows = table_rows(records)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_metric(records: list[dict[str, Any]]) -> tuple[str, str]:
    """(record key, label) of the plotted metric: exact match when every cell has one (an eval
    set was scored), else the best validation loss."""
    if all(r["exact_match"] is not None for r in records):
        return "exact_match", "exact match (%)"
    return "best_val_loss", "best validation loss"


def series(records: list[dict[str, Any]], key: str) -> dict[str, list[Point]]:
    """Plot series: cells grouped by every axis value but the first, which labels the points."""
    out: dict[str, list[Point]] = {}
    for r in records:
        if r[key] is None:
            continue
        first, *rest = r["settings"].items()
        name = ", ".join(f"{k}={v}" for k, v in rest) or "all cells"
        y = 100 * r[key] if key == "exact_match" else r[key]
        out.setdefault(name, []).append((r["trainable_params"], y, f"{first[0]}={first[1]}"))
    return out


def write_reports(records: list[dict[str, Any]], sweep_dir: Path, command: str) -> list[Path]:
    """sweep.md, sweep.json, sweep.png and index.html (table + plot) in ``sweep_dir``."""
    md = sweep_dir / "sweep.md"
    md.write_text(f"`{command}`\n\n" + markdown_table(records))
    js = sweep_dir / "sweep.json"
    js.write_text(json.dumps({"command": command, "cells": records}, indent=2) + "\n")
    key, label = plot_metric(records)
    png = plot_sweep(series(records, key), label, sweep_dir / "sweep.png",
                     (0.0, 100.0) if key == "exact_match" else None)
    page = write_html(records, sweep_dir / "index.html", command, png.name)
    return [md, js, png, page]


def write_html(records: list[dict[str, Any]], path: Path, command: str, image: str) -> Path:
    """One page: the command, the table (each cell links to its training curves) and the plot."""
    header, rows = table_rows(records)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for record, row in zip(records, rows, strict=True):
        cells = "".join(f"<td>{html.escape(v)}</td>" for v in row)
        link = f"<a href='{html.escape(record['cell'])}/curves.png'>curves</a>"
        body.append(f"<tr>{cells}<td>{link}</td></tr>")
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>sweep</title>"
        "<style>body{font-family:sans-serif}td,th{padding:3px 8px;text-align:right}</style>\n"
        f"<h1>Sweep</h1><p><code>{html.escape(command)}</code></p>\n"
        f"<table><tr>{head}<th></th></tr>\n" + "\n".join(body) + "</table>\n"
        f"<p><img src='{html.escape(image)}' alt='metric against trainable parameters'></p>\n",
        encoding="utf-8")
    return path
