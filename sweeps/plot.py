"""A sweep's metric against trainable parameters (log x), drawn with PIL like evaluation/curves.

One line per series (the cells that share every axis value but the first), its points in order
of parameters and labelled with their first-axis value: for ``--r ... --targets ...`` one line
per target set, with a point per rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT = 760, 460
LEFT, RIGHT, TOP, BOTTOM = 70, 200, 40, 50  # margins; the legend sits in the right one
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]

Point = tuple[float, float, str]  # (trainable parameters, metric, label)


class LogXAxes:
    """Pixel positions of the plot area: x on a log10 scale, y linear."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float],
                 y_range: tuple[float, float] | None = None) -> None:
        lo, hi = math.log10(min(xs)), math.log10(max(xs))
        pad = max((hi - lo) * 0.08, 0.15)  # a single x still gets a visible range
        self.x_lo, self.x_hi = lo - pad, hi + pad
        y_lo, y_hi = y_range or (min(ys), max(ys))
        pad = (y_hi - y_lo) * 0.04 or max(abs(y_hi) * 0.1, 0.05)
        self.y_lo, self.y_hi = y_lo - pad, y_hi + pad
        self.y_ticks = [y_lo + i * (y_hi - y_lo) / 4 for i in range(5)] if y_hi > y_lo \
            else [y_lo]
        self.left, self.right = LEFT, WIDTH - RIGHT
        self.top, self.bottom = TOP, HEIGHT - BOTTOM

    def px(self, x: float, y: float) -> tuple[float, float]:
        """Pixel of the data point (x, y)."""
        fx = (math.log10(x) - self.x_lo) / (self.x_hi - self.x_lo)
        fy = (y - self.y_lo) / (self.y_hi - self.y_lo)
        return (self.left + fx * (self.right - self.left),
                self.bottom - fy * (self.bottom - self.top))

    def x_ticks(self) -> list[float]:
        """1, 2 and 5 × powers of ten inside the x range."""
        ticks = []
        for power in range(math.floor(self.x_lo), math.ceil(self.x_hi) + 1):
            ticks += [m * 10.0**power for m in (1, 2, 5)]
        return [t for t in ticks if self.x_lo <= math.log10(t) <= self.x_hi]


def short_count(n: float) -> str:
    """12000 -> '12k', 3e6 -> '3M'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:g}{suffix}"
    return f"{n:g}"


def plot_sweep(series: dict[str, list[Point]], y_label: str, out: Path,
               y_range: tuple[float, float] | None = None) -> Path:
    """Write the PNG: each series a coloured line through its points, a legend on the right;
    the y axis spans ``y_range`` (default: the data's range)."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        raise ValueError("no finished cells to plot")
    axes = LogXAxes([p[0] for p in points], [p[1] for p in points], y_range)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((axes.left, axes.top, axes.right, axes.bottom), outline="black")
    draw.text((axes.left, 12), f"{y_label} against trainable parameters (log scale)",
              fill="black")
    for tick in axes.x_ticks():
        x, _ = axes.px(tick, axes.y_lo)
        draw.line((x, axes.bottom, x, axes.bottom + 5), fill="black")
        draw.text((x - 10, axes.bottom + 8), short_count(tick), fill="black")
    draw.text((axes.right - 130, axes.bottom + 28), "trainable parameters", fill="black")
    for y_val in axes.y_ticks:
        _, y = axes.px(10.0**axes.x_lo, y_val)
        draw.line((axes.left, y, axes.right, y), fill=(225, 225, 225))
        draw.text((6, y - 6), f"{y_val:.3g}", fill="black")
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pixels = [axes.px(x, y) for x, y, _ in sorted(pts)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for (px, py), (_, _, label) in zip(pixels, sorted(pts), strict=True):
            draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=colour)
            draw.text((px + 6, py - 14), label, fill=colour)
        legend_y = axes.top + 16 * i
        draw.rectangle((axes.right + 12, legend_y + 3, axes.right + 22, legend_y + 11),
                       fill=colour)
        draw.text((axes.right + 28, legend_y), name[:28], fill="black")
    image.save(out)
    return out
