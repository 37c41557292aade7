"""Pictures of an evaluation: a self-contained HTML page and a PNG contact sheet.

Each row is one test query: the image, its reference(s), and every system's output marked
right or wrong. Rows are grouped: the adapters right and the base wrong first (what the
adapter taught), then all right, then the rest. Images are embedded as base64 PNG, so the page
is one file that opens anywhere.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

GROUPS = ("learned: adapter right, base wrong", "all right", "other")


@dataclass
class Row:
    """One test query and what each system answered."""

    image: Path
    query: str  # the question, or "" for captioning
    references: list[str]
    outputs: dict[str, tuple[str, bool]]  # system -> (text, right?)

    def group(self) -> str:
        """Which of GROUPS the row belongs to."""
        base_ok = self.outputs["base"][1]
        others = [ok for s, (_, ok) in self.outputs.items() if s != "base"]
        if others and all(others) and not base_ok:
            return GROUPS[0]
        return GROUPS[1] if base_ok and all(others) else GROUPS[2]


def _png_b64(path: Path, size: int) -> str:
    image = Image.open(path).convert("RGB").resize((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_html(rows: list[Row], path: Path, title: str, image_px: int = 96) -> Path:
    """A single-file HTML report, rows grouped by GROUPS."""
    systems = list(rows[0].outputs)
    head = "".join(f"<th>{html.escape(s)}</th>" for s in systems)
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px}"
             ".ok{color:#070}.bad{color:#b00}</style>", f"<h1>{html.escape(title)}</h1>"]
    for group in GROUPS:
        members = [r for r in rows if r.group() == group]
        parts.append(f"<h2>{html.escape(group)} ({len(members)})</h2>")
        if not members:
            continue
        parts.append(f"<table><tr><th>image</th><th>query</th><th>reference</th>{head}</tr>")
        for r in members:
            cells = "".join(
                f"<td class='{'ok' if ok else 'bad'}'>{'✓' if ok else '✗'} {html.escape(t)}</td>"
                for t, ok in r.outputs.values())
            refs = "<br>".join(html.escape(x) for x in r.references)
            parts.append(f"<tr><td><img alt='{html.escape(r.image.name)}' "
                         f"src='data:image/png;base64,{_png_b64(r.image, image_px)}'></td>"
                         f"<td>{html.escape(r.query)}</td><td>{refs}</td>{cells}</tr>")
        parts.append("</table>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def write_contact_sheet(rows: list[Row], path: Path, columns: int = 6, image_px: int = 96,
                        max_rows: int = 60) -> Path:
    """A PNG grid: each tile is the image with each system's output, green right, red wrong."""
    rows = sorted(rows, key=lambda r: GROUPS.index(r.group()))[:max_rows]
    line_h, n_lines = 12, 1 + len(rows[0].outputs)
    tile_w, tile_h = 2 * image_px + 16, image_px + line_h * n_lines + 8
    n_rows = -(-len(rows) // columns)
    sheet = Image.new("RGB", (columns * tile_w, n_rows * tile_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(rows):
        x, y = (i % columns) * tile_w, (i // columns) * tile_h
        sheet.paste(Image.open(r.image).convert("RGB").resize((image_px, image_px)), (x + 4, y + 4))
        draw.text((x + 4, y + image_px + 6), (r.query or r.references[0])[:40], fill="black")
        for j, (system, (text, ok)) in enumerate(r.outputs.items(), start=1):
            draw.text((x + 4, y + image_px + 6 + j * line_h), f"{system}: {text}"[:40],
                      fill=(0, 120, 0) if ok else (180, 0, 0))
    sheet.save(path)
    return path
