"""Training curves from train.py's metrics.jsonl, drawn with PIL (no plotting dependency).

    python -m evaluation.curves runs/caption-lora/metrics.jsonl  # -> runs/caption-lora/curves.png

Top panel: training loss per optimizer step (blue) and validation loss per epoch (orange);
bottom panel: learning rate. Each axis is labelled with its range.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

Series = tuple[Sequence[float], Sequence[float], tuple[int, int, int]]  # (x, y, colour)
WIDTH, PANEL_H, MARGIN = 720, 240, 60


def read_metrics(path: Path) -> dict[str, list[tuple[float, float]]]:
    """(step, value) pairs of train loss, val loss and lr from a metrics.jsonl file."""
    out: dict[str, list[tuple[float, float]]] = {"loss": [], "val_loss": [], "lr": []}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a last line cut short by a crash
            continue
        for key, points in out.items():
            if record.get(key) is not None:  # null: a skipped step or an undefined val loss
                points.append((record["step"], record[key]))
    return out


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, series: list[Series],
           x_max: float) -> None:
    ys = [y for _, ys_, _ in series for y in ys_]
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1.0
    left, right, bottom = MARGIN, WIDTH - 20, top + PANEL_H - 30
    draw.rectangle((left, top + 20, right, bottom), outline="black")
    draw.text((left, top + 4), title, fill="black")
    draw.text((4, top + 20), f"{hi:.3g}", fill="black")
    draw.text((4, bottom - 10), f"{lo:.3g}", fill="black")
    draw.text((right - 60, bottom + 4), f"step {x_max:g}", fill="black")

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (right - left) * x / x_max,
                bottom - (bottom - top - 20) * (y - lo) / (hi - lo))

    for xs, ys_, colour in series:
        points = [to_px(x, y) for x, y in zip(xs, ys_, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points if len(points) < 60 else []:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)


def plot_curves(metrics_path: Path, out: Path | None = None) -> Path:
    """Write the two-panel PNG next to the metrics file (or to ``out``)."""
    m = read_metrics(metrics_path)
    if not m["loss"]:
        raise ValueError(f"{metrics_path}: no training-loss records")
    x_max = max(s for s, _ in m["loss"])
    image = Image.new("RGB", (WIDTH, 2 * PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    loss = [([s for s, _ in m["loss"]], [v for _, v in m["loss"]], (31, 119, 180))]
    if m["val_loss"]:
        loss.append(([s for s, _ in m["val_loss"]], [v for _, v in m["val_loss"]],
                     (255, 127, 14)))
    _panel(draw, 0, "loss: train (blue), validation (orange)", loss, x_max)
    _panel(draw, PANEL_H, "learning rate",
           [([s for s, _ in m["lr"]], [v for _, v in m["lr"]], (44, 160, 44))], x_max)
    out = out or metrics_path.with_name("curves.png")
    image.save(out)
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["--help"]:
        if arg.startswith("-"):
            print(__doc__)
        else:
            print(plot_curves(Path(arg)))
